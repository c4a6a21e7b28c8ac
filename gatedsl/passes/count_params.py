"""Count parameters: total learned elements and per block instance, rejecting a model over the limit before anything is allocated."""

from __future__ import annotations

from collections import defaultdict

from gatedsl.errors import LimitError, Note
from gatedsl.ir.model import ModelIR


def count_params(unit: ModelIR) -> ModelIR:
    params = unit.graph.all_params()
    total = 0
    by_block: dict[str, int] = defaultdict(int)
    seen: dict[str, object] = {}
    for p in params:
        if p.path in seen:
            raise AssertionError(f"two learned tensors share the path {p.path}")
        seen[p.path] = p
        total += p.numel
        by_block[p.block or "(model)"] += p.numel
    if total > unit.limits.max_params:
        largest = sorted(params, key=lambda p: -p.numel)[:3]
        raise LimitError(
            f"model {unit.model.name} has {total:,} parameters, over the limit of {unit.limits.max_params:,}",
            unit.model.span,
            notes=[Note(f"{p.path} has {p.numel:,} elements {list(p.shape)}", p.span) for p in largest],
            help="reduce the sizes, or raise the limit (max_params= / --max-params)",
        )
    unit.param_count = total
    unit.params_by_block = dict(by_block)
    return unit
