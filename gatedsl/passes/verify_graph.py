"""Verify graph: every node's attributes match its op's schema, its recorded types re-derive from its inputs, and every gate mark is well-formed."""

from __future__ import annotations

from gatedsl.ir.graph import GATE_KINDS, Graph
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import REGISTRY


class GraphInvariantError(AssertionError):
    """A malformed graph: a bug in gatedsl, never in the spec."""


def verify_graph(unit: ModelIR) -> ModelIR:
    _verify(unit.graph)
    return unit


def _verify(graph: Graph) -> None:
    for n in graph.order():
        data = graph.node(n)
        opdef = REGISTRY.get(data["op"])
        if opdef is None:
            raise GraphInvariantError(f"node {n} has unknown op {data['op']}")
        if not isinstance(data["attrs"], opdef.attrs):
            raise GraphInvariantError(f"node {n} ({data['op']}) has attrs of type {type(data['attrs']).__name__}")
        for src, port in data["inputs"]:
            if src >= n or port >= len(graph.node(src)["types"]):
                raise GraphInvariantError(f"node {n} reads ({src}, {port}), which does not precede it")
        ins = [graph.type_of(p) for p in data["inputs"]]
        if opdef.infer(data["attrs"], ins) != data["types"]:
            raise GraphInvariantError(f"node {n} ({data['op']}): recorded types do not re-derive")
        gate = data["gate"]
        if gate is not None and (gate.kind not in GATE_KINDS or data["types"][0].dtype != "float"):
            raise GraphInvariantError(f"node {n} carries a malformed gate mark {gate}")
        body = getattr(data["attrs"], "body", None)
        if isinstance(body, Graph):
            _verify(body)
    for name, (node, port) in graph.outputs:
        if node not in graph or port >= len(graph.node(node)["types"]):
            raise GraphInvariantError(f"output {name} reads a missing node")
    for name, (node, port) in graph.aux:
        if node not in graph or port >= len(graph.node(node)["types"]) \
                or graph.type_of((node, port)).dtype != "float":
            raise GraphInvariantError(f"aux {name} reads a missing node or a non-float value")
