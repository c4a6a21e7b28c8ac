"""Check budgets: every model-level `require` that reads param_count() or flop_count(...) holds, now that both are counted."""

from __future__ import annotations

from gatedsl.ir.graph import Graph
from gatedsl.ir.model import ModelIR
from gatedsl.passes.elaborate import Elaborator, Frame


def check_budgets(unit: ModelIR) -> ModelIR:
    if not unit.budget_requires:
        return unit
    el = Elaborator(unit.program, unit.limits)
    el.counted = unit
    for stmt, env in unit.budget_requires:
        # A scratch graph: a condition only compares numbers, and nothing it does may touch the counted graph.
        el.stack.append(Frame(unit.model, Graph(unit.model.name), "", env))
        try:
            el.check_require(stmt)
        finally:
            el.stack.pop()
    return unit
