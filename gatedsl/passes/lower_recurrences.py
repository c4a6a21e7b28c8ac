"""Lower recurrences: ops of a scan body that read only the sliced sequences (or only constants) run once, for all steps, before the loop.

Input projections with their biases, and element-wise math on them, are hoisted out of the
loop and computed for every step in one product; the body reads the precomputed sequence
instead. Ops reading only the constant (unsliced) arguments run once and are passed as
constants. Results, learned tensors and their paths are unchanged; gate marks stay in the cell.
"""

from __future__ import annotations

from typing import NamedTuple

from gatedsl.ir.graph import Graph, Port, copy_node, rewrite_scans
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import REGISTRY, InputAttrs, ScanAttrs


def lower_recurrences(unit: ModelIR) -> ModelIR:
    unit.graph = lower_graph(unit.graph)
    return unit


def lower_graph(graph: Graph) -> Graph:
    """`graph` with every scan in it (and in scan bodies, recursively) lowered; the same graph where it has none."""
    return rewrite_scans(graph, _hoist)


def _invariant(body: Graph, a: ScanAttrs) -> dict[int, int | None]:
    """The body's nodes computed from the sliced sequences alone, each with the axis its steps stack at,
    or from the constant (unsliced) arguments alone, with None: the same at every step."""
    axis_of: dict[int, int | None] = {}
    seq_axes = iter(a.axes)
    for (_, node), role in zip(body.inputs, a.roles):
        if role != "state":
            axis_of[node] = next(seq_axes) if role == "seq" else None
    for n in body.order():
        data = body.node(n)
        ins = data["inputs"]
        if data["gate"] is not None or not ins or any(src not in axis_of for src, _ in ins):
            continue  # gate marks stay where the spec put them (the report lists them in the cell)
        axes = {axis_of[src] for src, _ in ins}
        if len(axes) != 1:
            continue
        (axis,) = axes
        step = body.type_of(ins[0])
        op = data["op"]
        if axis is None:  # computed once instead of once per step
            if op in ("unary", "linear", "binary"):
                axis_of[n] = None
        elif op == "unary":
            axis_of[n] = axis
        elif op == "linear" and axis < step.rank:  # the projected dim is not the scanned one
            axis_of[n] = axis
        elif op == "binary" and all(body.type_of(p).shape == step.shape for p in ins):
            axis_of[n] = axis  # same step shapes: the stacked operands broadcast exactly as the steps did
    return axis_of


def _hoist(outer: Graph, data: dict, ins: list[Port]) -> tuple[ScanAttrs, list[Port]]:
    a: ScanAttrs = data["attrs"]
    if a.kernel != "loop":
        return a, ins  # runs on a fused kernel, not step by step
    body = lower_graph(a.body)
    axis_of = _invariant(body, a)
    inputs = {node for _, node in body.inputs}
    needed = {src for n in body.order() if n not in axis_of for src, _ in body.node(n)["inputs"]}
    needed |= {node for _, (node, _) in body.outputs}
    frontier = [n for n in body.order() if n in axis_of and n not in inputs and n in needed]
    if not frontier:
        return a.model_copy(update={"body": body}), ins
    # The hoisted ops, over the whole sequences, in the outer graph just before the scan.
    full: dict[int, Port] = {node: port for (_, node), port in zip(body.inputs, ins)}

    def materialise(n: int) -> Port:
        if n not in full:
            node = body.node(n)
            srcs = [materialise(src) for src, _ in node["inputs"]]
            types = REGISTRY[node["op"]].infer(node["attrs"], [outer.type_of(p) for p in srcs])
            new = outer.add(node["op"], node["attrs"], srcs, types, node["span"], f"{data['name']}_{node['name']}")
            full[n] = (new, 0)
        return full[n]

    hoisted = [materialise(n) for n in frontier]
    # The old inputs the loop still reads: a sequence or constant read only by hoisted ops is no longer
    # passed (nor sliced every call). The first sequence also sets the loop's length and where its outputs
    # stack, so it stays unless a later sequence on the same axis can take its place.
    read = {src for n in body.order() if n not in axis_of for src, _ in body.node(n)["inputs"]}
    read |= {node for _, (node, _) in body.outputs}
    seq_axes = iter(a.axes)
    old_inputs = [_Input(name, node, role, next(seq_axes) if role == "seq" else None, port)
                  for (name, node), role, port in zip(body.inputs, a.roles, ins)]
    first_seq = next(i for i in old_inputs if i.role == "seq")
    later_axes = [i.axis for i in old_inputs if i.role == "seq" and i is not first_seq and i.node in read]
    later_axes += [axis_of[n] for n in frontier if axis_of[n] is not None]
    replaceable = bool(later_axes) and later_axes[0] == first_seq.axis
    kept = [i for i in old_inputs if i.role == "state" or i.node in read or (i is first_seq and not replaceable)]
    # The new body: the old inputs it reads, one more input per hoisted value, the rest of the step.
    new_body = Graph(body.name, params=body.params, modules=body.modules)
    ports: dict[Port, Port] = {}
    for i in kept:
        ports[(i.node, 0)] = (copy_node(new_body, body.node(i.node), body.node(i.node)["attrs"], []), 0)
    new_body.inputs = [(i.name, ports[(i.node, 0)][0]) for i in kept]
    taken = {name for name, _ in body.inputs}
    for n in frontier:
        step = body.type_of((n, 0))
        suffix = "once" if axis_of[n] is None else "all"
        name = base = f"{body.node(n)['name']}_{suffix}"  # a placeholder of the step function: one name each
        while name in taken:
            name = f"{base}_{len(taken)}"
        taken.add(name)
        node = new_body.add("input", InputAttrs(name=name, type=step), [], [step], body.node(n)["span"], name)
        new_body.inputs.append((name, node))
        ports[(n, 0)] = (node, 0)
    for n in body.order():
        if n in axis_of or n in inputs:
            continue
        node = body.node(n)
        new = copy_node(new_body, node, node["attrs"], [ports[p] for p in node["inputs"]])
        for i in range(len(node["types"])):
            ports[(n, i)] = (new, i)
    new_body.outputs = [(name, ports[p]) for name, p in body.outputs]
    attrs = a.model_copy(update={
        "body": new_body,
        "roles": tuple(i.role for i in kept) + tuple("const" if axis_of[n] is None else "seq" for n in frontier),
        "axes": tuple(i.axis for i in kept if i.role == "seq") + tuple(axis_of[n] for n in frontier
                                                                       if axis_of[n] is not None),
    })
    return attrs, [i.port for i in kept] + hoisted


class _Input(NamedTuple):
    """One of a scan's inputs: the body's placeholder, its role and scanned axis, and the value passed in."""

    name: str
    node: int
    role: str
    axis: int | None
    port: Port
