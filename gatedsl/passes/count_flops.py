"""Count FLOPs: a polynomial in the symbolic sizes (B, T, ...) summed over every op, a scan's body once per step."""

from __future__ import annotations

from gatedsl.ir.graph import Graph
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import REGISTRY
from gatedsl.ir.types import Poly


def graph_flops(graph: Graph) -> Poly:
    total = Poly()
    for n in graph.order():
        data = graph.node(n)
        ins = [graph.type_of(p) for p in data["inputs"]]
        total = total + REGISTRY[data["op"]].flops(data["attrs"], ins, data["types"])
    return total


def count_flops(unit: ModelIR) -> ModelIR:
    unit.flops = graph_flops(unit.graph)
    return unit
