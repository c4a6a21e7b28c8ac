"""Count FLOPs: a polynomial in the symbolic sizes (B, T, ...) summed over every op, a scan's body once per step."""

from __future__ import annotations

from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import graph_flops


def count_flops(unit: ModelIR) -> ModelIR:
    unit.flops = graph_flops(unit.graph)
    return unit
