"""Count FLOPs: a polynomial in the symbolic sizes (B, T, ...) summed over every op, a scan's body once per step."""

from __future__ import annotations

from gatedsl.ir.graph import Graph
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import REGISTRY, no_flops
from gatedsl.ir.types import Poly


def graph_flops(graph: Graph) -> Poly:
    terms: dict[tuple[str, ...], int] = {}  # summed in place: a new Poly per node was most of this pass's time
    for n in graph.order():
        data = graph.node(n)
        flops = REGISTRY[data["op"]].flops
        if flops is no_flops:  # inputs, parameters, fills, views: a quarter of the nodes
            continue
        ins = [graph.type_of(p) for p in data["inputs"]]
        for factors, coeff in flops(data["attrs"], ins, data["types"]).terms.items():
            terms[factors] = terms.get(factors, 0) + coeff
    return Poly(terms)


def count_flops(unit: ModelIR) -> ModelIR:
    unit.flops = graph_flops(unit.graph)
    return unit
