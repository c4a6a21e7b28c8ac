"""The graph IR: a networkx DiGraph of op nodes, each with validated attributes, output types, a gate mark and a span."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
from pydantic import BaseModel, ConfigDict

from gatedsl.errors import Span
from gatedsl.ir.types import TensorType

GATE_KINDS = ("sigmoid", "softmax", "topk", "binary", "learned", "silu", "gelu", "relu", "tanh", "linear")


class GateMark(BaseModel):
    """Marks a node's output as a multiplicative gate."""

    model_config = ConfigDict(frozen=True)

    kind: str
    name: str  # the statement path, e.g. layers.1.cell.z
    line: int
    file: str


class InitSpec(BaseModel):
    """How a learned tensor starts: a named scheme and its arguments."""

    model_config = ConfigDict(frozen=True)

    kind: str
    args: tuple[float, ...] = ()

    def __str__(self) -> str:
        return self.kind + (f"({', '.join(f'{a:g}' for a in self.args)})" if self.args else "")


@dataclass
class ParamSpec:
    """One learned tensor of the model, named by its instance path."""

    path: str  # e.g. layers.1.cell.z.x_proj.weight
    shape: tuple[int, ...]
    init: InitSpec
    span: Span
    block: str  # the block instance that owns it, for per-block counts ("" for the model)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModuleSpec:
    """A parameter-free torch module the graph calls (dropout, noise), so train/eval switches it."""

    path: str
    kind: str
    args: dict[str, Any]


Port = tuple[int, int]  # (node id, output index)


@dataclass(eq=False)  # a graph equals only itself
class Graph:
    """One graph of ops: a model's top level, or the body of a scanned cell.

    Nodes are read and added through the graph (node, type_of, order, add). `g` is its structure for networkx's
    algorithms (ancestors, successors), with an edge from each node to each node that reads it: built on first
    use and kept in step after. Elaboration and the analysis passes, which add and read every node of every
    candidate a search screens, never need it.
    """

    name: str
    inputs: list[tuple[str, int]] = field(default_factory=list)  # (name, node id)
    outputs: list[tuple[str, Port]] = field(default_factory=list)
    params: list[ParamSpec] = field(default_factory=list)
    modules: list[ModuleSpec] = field(default_factory=list)
    aux: list[tuple[str, Port]] = field(default_factory=list)  # `aux NAME = ...`: (instance path, value)
    _next: int = 0
    _nodes: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False)  # node id -> its data, by id
    _g: nx.DiGraph | None = field(default=None, repr=False)

    @property
    def g(self) -> nx.DiGraph:
        if self._g is None:
            self._g = nx.DiGraph()
            for node, data in self._nodes.items():
                self._add_to_g(node, data["inputs"])
        return self._g

    def _add_to_g(self, node: int, inputs: list[Port]) -> None:
        self._g.add_node(node)
        for src, port in inputs:
            self._g.add_edge(src, node, type=self._nodes[src]["types"][port])

    def __contains__(self, node: int) -> bool:
        return node in self._nodes

    def add(
        self,
        op: str,
        attrs: BaseModel,
        inputs: list[Port],
        types: list[TensorType],
        span: Span,
        name: str,
        gate: GateMark | None = None,
    ) -> int:
        node = self._next
        self._next += 1
        self._nodes[node] = {"op": op, "attrs": attrs, "inputs": list(inputs), "types": list(types),
                             "span": span, "name": name, "gate": gate}
        if self._g is not None:
            self._add_to_g(node, inputs)
        return node

    def node(self, node: int) -> dict[str, Any]:
        return self._nodes[node]

    def type_of(self, port: Port) -> TensorType:
        return self._nodes[port[0]]["types"][port[1]]

    def order(self) -> list[int]:
        # Node ids are handed out as nodes are built, after their inputs: a topological order.
        return sorted(self._nodes)

    def subgraphs(self) -> list["Graph"]:
        """Scanned cell bodies, recursively."""
        out = []
        for n in self.order():
            # The field read directly: getattr of a field an op's attrs lack takes pydantic's slow miss path.
            body = self._nodes[n]["attrs"].__dict__.get("body")
            if isinstance(body, Graph):
                out.append(body)
                out += body.subgraphs()
        return out

    def all_params(self) -> list[ParamSpec]:
        return self.params + [p for sub in self.subgraphs() for p in sub.params]

    def all_modules(self) -> list[ModuleSpec]:
        return self.modules + [m for sub in self.subgraphs() for m in sub.modules]

    def gates(self) -> list[GateMark]:
        """Gate marks in program order, a scanned cell's own gates where the scan is."""
        marks: list[GateMark] = []
        for n in self.order():
            data = self._nodes[n]
            if data["gate"] is not None:
                marks.append(data["gate"])
            body = getattr(data["attrs"], "body", None)
            if isinstance(body, Graph):
                marks += body.gates()
        return marks


NODE_KEYS = ("op", "attrs", "inputs", "types", "span", "name", "gate")  # every node has them; some have more


def copy_node(graph: Graph, data: dict[str, Any], attrs: BaseModel, inputs: list[Port]) -> int:
    """Add a copy of node `data` (with new attrs and inputs, and any extra keys it carries) to `graph`."""
    node = graph.add(data["op"], attrs, inputs, data["types"], data["span"], data["name"], data["gate"])
    for key, value in data.items():
        if key not in NODE_KEYS:
            graph.node(node)[key] = value
    return node


def rewrite_scans(graph: Graph, rewrite) -> Graph:
    """A copy of `graph` where each scan node takes the (attrs, inputs) that `rewrite(new_graph, node, inputs)`
    returns (it may add nodes before it); `graph` itself where it has no scan."""
    if not any(graph.node(n)["op"] == "scan" for n in graph.order()):
        return graph
    out = Graph(graph.name, params=graph.params, modules=graph.modules)
    ports: dict[Port, Port] = {}
    for n in graph.order():
        data = graph.node(n)
        attrs, ins = data["attrs"], [ports[p] for p in data["inputs"]]
        if data["op"] == "scan":
            attrs, ins = rewrite(out, data, ins)
        new = copy_node(out, data, attrs, ins)
        for i in range(len(data["types"])):
            ports[(n, i)] = (new, i)
    out.inputs = [(name, ports[(node, 0)][0]) for name, node in graph.inputs]
    out.outputs = [(name, ports[p]) for name, p in graph.outputs]
    out.aux = [(name, ports[p]) for name, p in graph.aux]
    return out


def replace_scans(graph: Graph, replace) -> Graph:
    """A copy of `graph` where each scan for which `replace(new_graph, node, inputs)` returns ports (one per
    result of the scan, after adding the nodes that compute them) is replaced by them, and every other
    scan's body has gone through the same, recursively; `graph` itself where it has no scan."""
    if not any(graph.node(n)["op"] == "scan" for n in graph.order()):
        return graph
    out = Graph(graph.name, params=graph.params, modules=graph.modules)
    ports: dict[Port, Port] = {}
    for n in graph.order():
        data = graph.node(n)
        ins = [ports[p] for p in data["inputs"]]
        attrs = data["attrs"]
        if data["op"] == "scan":
            replaced = replace(out, data, ins)
            if replaced is not None:
                ports.update({(n, i): port for i, port in enumerate(replaced)})
                continue
            body = replace_scans(attrs.body, replace)
            if body is not attrs.body:
                attrs = attrs.model_copy(update={"body": body})
        new = copy_node(out, data, attrs, ins)
        ports.update({(n, i): (new, i) for i in range(len(data["types"]))})
    out.inputs = [(name, ports[(node, 0)][0]) for name, node in graph.inputs]
    out.outputs = [(name, ports[p]) for name, p in graph.outputs]
    out.aux = [(name, ports[p]) for name, p in graph.aux]
    return out
