"""Draw the graph IR with Graphviz: ops as boxes, shapes on the edges, gates highlighted, scanned cells as clusters."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydot

from gatedsl.fileio import atomic_write
from gatedsl.ir.graph import Graph
from gatedsl.ir.model import ModelIR

GATE_COLOR = "#f4a261"


def to_dot(unit: ModelIR) -> pydot.Dot:
    dot = pydot.Dot(unit.model.name, graph_type="digraph", rankdir="TB", fontname="Helvetica")
    dot.set_node_defaults(shape="box", style="rounded,filled", fillcolor="#eef2f7", fontname="Helvetica",
                          fontsize="10")
    dot.set_edge_defaults(fontname="Helvetica", fontsize="9")
    _add(dot, unit.graph, "n")
    for name, (node, port) in unit.graph.outputs:
        out = f"out_{name}"
        dot.add_node(pydot.Node(out, label=f"output {name}", shape="ellipse", fillcolor="#d8f3dc"))
        dot.add_edge(pydot.Edge(f"n{node}", out, label=str(unit.graph.type_of((node, port)))))
    return dot


def _label(data: dict) -> str:
    op, attrs = data["op"], data["attrs"]
    detail = getattr(attrs, "fn", None) or getattr(attrs, "kind", None) or ""
    head = f"{op} {detail}".strip() if op not in ("unary", "binary") else detail
    if op == "input":
        head = f"input {attrs.name}"
    text = f"{head}\\n{data['name']}" if data["name"] not in (op, detail) else head
    if data["gate"] is not None:
        text = f"gate {data['gate'].name} ({data['gate'].kind})\\n{head}"
    return text


def _add(container, graph: Graph, prefix: str) -> None:
    for n in graph.order():
        data = graph.node(n)
        node_id = f"{prefix}{n}"
        attrs = {"label": _label(data)}
        if data["gate"] is not None:
            attrs.update(fillcolor=GATE_COLOR, penwidth="2")
        if data["op"] == "input":
            attrs.update(shape="ellipse", fillcolor="#d8f3dc")
        container.add_node(pydot.Node(node_id, **attrs))
        body = getattr(data["attrs"], "body", None)
        if isinstance(body, Graph):
            what = f"scan {data['attrs'].cell}" if data["op"] == "scan" else data["op"]  # or a cascade and its stages
            cluster = pydot.Cluster(f"{prefix}{n}_body", label=f"{what} ({data['attrs'].path})",
                                    style="dashed", fontname="Helvetica")
            _add(cluster, body, f"{prefix}{n}_")
            container.add_subgraph(cluster)
        for src, port in data["inputs"]:
            container.add_edge(pydot.Edge(f"{prefix}{src}", node_id, label=str(graph.type_of((src, port)))))


def write_graph(unit: ModelIR, out: Path) -> None:
    """Write .dot text, or render .svg/.png with Graphviz's `dot`; the file appears whole or not at all."""
    text = to_dot(unit).to_string()
    data = text.encode() if out.suffix == ".dot" else render(text, out.suffix[1:])
    atomic_write(out, lambda f: f.write(data))


def render(text: str, fmt: str) -> bytes:
    """Graphviz's drawing of `text` in `fmt` (svg, png); FileNotFoundError if `dot` is not installed."""
    # Through dot's stdin and stdout (pydot's create goes through a temporary file): the drawing
    # needs no writable temporary directory, only the output's own.
    return subprocess.run(["dot", f"-T{fmt}"], input=text.encode(), capture_output=True, check=True).stdout
