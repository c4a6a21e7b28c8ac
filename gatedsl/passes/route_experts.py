"""Route experts: an accumulation y = base + Σ_i g[..., i] ⊙ E_i(x) over row-wise experts becomes one moe_dispatch op, which runs every expert on every token or each expert on the tokens its gate picks.

Recognised in the model's top-level graph from its structure, not from block names: a chain of
additions whose terms are each a product of one column of a gate tensor g (lead + [E], every
column once) with the output of an expert subgraph E_i that reads the tokens x (lead + [D]) and
nothing else computed outside it, is used only by its term, and treats every token on its own
(linear, element-wise math, norms, softmax and slices over the features; anything that mixes
tokens, draws random numbers or owns a module keeps the dense spec).

Routing skips, for each token, the experts whose gate is exactly zero, so the gradient with
respect to those gate entries is zero instead of the dense form's ⟨∂L/∂y, E_i(x)⟩. Every
gradient before g (the router's weights, its inputs) is unchanged as long as each exactly-zero
entry of g has a zero derivative with respect to everything g is computed from: the gate is
"flat at zero". This pass proves that structurally (top-k softmax and masks, softmax, sigmoid,
exp and relu, and products, quotients and selections of such) and leaves any other gate dense.
It also reads off the gate's form how many experts each token uses (`active`: k for a top-k,
all for a softmax; unknown for, e.g., a relu gate), for the cost rule of the kernels in
gatedsl/kernels/moe_dispatch/. Learned tensors keep their paths: each expert's body is emitted
as a sub-module at the common path of its weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from gatedsl.ir.graph import Graph, Port, copy_node
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import (
    REGISTRY,
    InputAttrs,
    MoeDispatchAttrs,
    MoeExpertAttrs,
    graph_flops,
    normalize_axis,
)
from gatedsl.ir.types import Poly, TensorType


def route_experts(unit: ModelIR) -> ModelIR:
    unit.graph = route_graph(unit.graph)
    return unit


@dataclass
class Term:
    mul: int  # the product g[..., column] * expert
    index: int  # the column's index node
    gate: Port
    column: int
    expert: Port


@dataclass
class Chain:
    """y = base + t_0 + t_1 + ...: the additions in order, the last one giving y."""

    base: Port | None
    terms: list[Term]
    adds: list[int]


@dataclass
class Mixture:
    """A chain that routes: its experts (node sets, in term order) and what the dispatch needs."""

    chain: Chain
    tokens: Port
    experts: list[set[int]]
    paths: list[str]
    active: int | None
    removed: set[int] = field(default_factory=set)


def route_graph(graph: Graph) -> Graph:
    """`graph` with every routable mixture replaced by a moe_dispatch node; `graph` itself where there is none."""
    users = _users(graph)
    mixtures = [m for m in (_mixture(graph, users, c) for c in _chains(graph, users)) if m is not None]
    # The report lists gates in program order: a mixture whose expert gates would move past another
    # gate keeps the dense form.
    mixtures = [m for m in mixtures if _rewrite(graph, [m]).gates() == graph.gates()]
    return _rewrite(graph, mixtures) if mixtures else graph


# ---------------------------------------------------------------- structure
_OUTSIDE = -1  # a user that is not a node: a graph output or an aux value


def _users(graph: Graph) -> dict[int, set[int]]:
    users: dict[int, set[int]] = {n: set() for n in graph.order()}
    for n in graph.order():
        for src, _ in graph.node(n)["inputs"]:
            users[src].add(n)
    for _, (node, _) in graph.outputs + graph.aux:
        users[node].add(_OUTSIDE)
    return users


def _is_add(data: dict) -> bool:
    a = data["attrs"]
    return data["op"] == "binary" and a.fn == "add" and a.left_scalar is None and a.right_scalar is None


def _term(graph: Graph, users: dict[int, set[int]], port: Port, add: int) -> Term | None:
    """The product g[..., i:i+1] * E(x) at `port`, used only by the addition `add`."""
    mul, out = port
    data = graph.node(mul)
    a = data["attrs"]
    if (out != 0 or data["op"] != "binary" or a.fn != "mul" or a.left_scalar is not None
            or a.right_scalar is not None or users[mul] != {add}):
        return None
    for column_side in (0, 1):
        index_port, expert = data["inputs"][column_side], data["inputs"][1 - column_side]
        column = _gate_column(graph, index_port)
        if column is None:
            continue
        gate = graph.node(index_port[0])["inputs"][0]
        expert_type, gate_type = graph.type_of(expert), graph.type_of(gate)
        lead = gate_type.shape[:-1]
        if (expert_type.rank == gate_type.rank and expert_type.shape[:-1] == lead and expert_type.dtype == "float"
                and data["types"][0] == expert_type and column < gate_type.shape[-1]):
            return Term(mul, index_port[0], gate, column, expert)
    return None


def _gate_column(graph: Graph, port: Port) -> int | None:
    """i where `port` is g[..., i:i+1] of a float g: every other axis whole, the last sliced to one entry."""
    data = graph.node(port[0])
    if data["op"] != "index":
        return None
    source = graph.type_of(data["inputs"][0])
    axes = _index_axes(data["attrs"].items, source.rank)
    if axes is None or source.dtype != "float" or not isinstance(source.shape[-1], int):
        return None
    *lead, (start, stop, step) = axes
    if any(not _whole(s) for s in lead) or step not in (None, 1) or start is None or start < 0:
        return None
    return start if stop == start + 1 else None


def _index_axes(items, rank: int) -> list[tuple] | None:
    """The slice (start, stop, step) an index takes on each axis; None where it drops or adds an axis."""
    if any(it[0] in ("int", "new") for it in items):
        return None
    explicit = [it for it in items if it[0] == "slice"]
    axes: list[tuple] = []
    for it in items:
        if it[0] == "ellipsis":
            axes += [(None, None, None)] * (rank - len(explicit))
        else:
            axes.append(it[1:])
    axes += [(None, None, None)] * (rank - len(axes))
    return axes if len(axes) == rank else None


def _whole(s: tuple) -> bool:
    start, stop, step = s
    return start in (None, 0) and stop is None and step in (None, 1)


def _chains(graph: Graph, users: dict[int, set[int]]) -> list[Chain]:
    chains: dict[int, Chain] = {}  # by the addition that ends it so far
    for n in graph.order():
        data = graph.node(n)
        if not _is_add(data):
            continue
        left, right = data["inputs"]
        term = _term(graph, users, right, n)
        acc = left
        if term is None:
            term, acc = _term(graph, users, left, n), right
        if term is None:
            continue
        before = chains.get(acc[0])
        if before is not None and acc[1] == 0 and users[acc[0]] == {n}:
            del chains[acc[0]]
            before.terms.append(term)
            before.adds.append(n)
            chains[n] = before
            continue
        first = _term(graph, users, acc, n)
        chains[n] = Chain(None, [first, term], [n]) if first is not None else Chain(acc, [term], [n])
    return list(chains.values())


# ------------------------------------------------------------------ experts
def _mixture(graph: Graph, users: dict[int, set[int]], chain: Chain) -> Mixture | None:
    gates = {t.gate for t in chain.terms}
    if len(gates) != 1:
        return None
    (gate,) = gates
    experts = graph.type_of(gate).shape[-1]
    if sorted(t.column for t in chain.terms) != list(range(experts)):
        return None
    result = graph.node(chain.adds[-1])["types"][0]
    if any(graph.node(n)["types"][0] != result for n in chain.adds) or (
            chain.base is not None and graph.type_of(chain.base) != result):
        return None
    bodies, tokens = [], set()
    for t in chain.terms:
        found = _expert_nodes(graph, users, t)
        if found is None:
            return None
        nodes, x = found
        bodies.append(nodes)
        tokens.add(x)
    if len(tokens) != 1:
        return None
    (x,) = tokens
    x_type = graph.type_of(x)
    if x_type.dtype != "float" or x_type.rank < 2 or x_type.shape[:-1] != graph.type_of(gate).shape[:-1]:
        return None
    if not all(_row_wise(graph, nodes, x) for nodes in bodies):
        return None
    active, flat = _gate_form(graph, gate)
    if not flat:
        return None
    paths = [_expert_path(graph, nodes) for nodes in bodies]
    if not _paths_usable(graph, paths):
        return None
    removed = set().union(*bodies) | {t.mul for t in chain.terms} | set(chain.adds)
    removed |= {t.index for t in chain.terms if users[t.index] <= removed}
    return Mixture(chain, x, bodies, paths, None if active is None else min(active, experts), removed)


def _expert_nodes(graph: Graph, users: dict[int, set[int]], term: Term) -> tuple[set[int], Port] | None:
    """The expert's own nodes (each used only by the expert, or by its term) and the one port it reads from outside."""
    out = term.expert[0]
    if users[out] != {term.mul} or graph.node(out)["op"] == "input":
        return None
    nodes = {out}
    for n in sorted(nx.ancestors(graph.g, out), reverse=True):  # users come after: decided before n
        if graph.node(n)["op"] != "input" and users[n] <= nodes:
            nodes.add(n)
    reads = {p for n in nodes for p in graph.node(n)["inputs"] if p[0] not in nodes}
    return (nodes, reads.pop()) if len(reads) == 1 else None


# Ops that treat each token on its own whatever their settings; the rest are checked below.
_ROW_OPS = {"linear", "unary", "clamp", "cast", "binary_gate", "norm", "fill"}
# Ops allowed on values that do not depend on the tokens (learned tensors, constants and math on them).
_CONSTANT_OPS = {"param", "fill", "unary", "binary", "cast", "clamp", "where"}


def _row_wise(graph: Graph, nodes: set[int], x: Port) -> bool:
    """Every node of the expert treats each token (each position of x's leading dims) independently of the others."""
    x_type = graph.type_of(x)
    lead, rank = x_type.shape[:-1], x_type.rank
    depends: dict[Port, bool] = {x: True}
    for n in sorted(nodes):
        data = graph.node(n)
        ins = data["inputs"]
        dep = any(depends.get(p, False) for p in ins)
        for i in range(len(data["types"])):
            depends[(n, i)] = dep
        if not dep:
            if data["op"] not in _CONSTANT_OPS:
                return False
            continue
        if any(t.rank != rank or t.shape[:-1] != lead for t in data["types"]):
            return False
        # A value that does not depend on the tokens may only broadcast over the features.
        constants = [graph.type_of(p) for p in ins if not depends.get(p, False)]
        if not _row_op(data, rank, [depends.get(p, False) for p in ins], constants):
            return False
    return True


def _row_op(data: dict, rank: int, dep: list[bool], constants: list[TensorType]) -> bool:
    op, a = data["op"], data["attrs"]
    last = rank - 1
    if op in _ROW_OPS or op in ("binary", "where"):
        return all(t.rank <= 1 for t in constants)
    if op in ("softmax", "topk"):
        return normalize_axis(a.dim, rank) == last
    if op == "reduce":
        return a.keepdim and {normalize_axis(d, rank) for d in a.dims} == {last}
    if op == "split":
        return normalize_axis(a.dim, rank) == last
    if op == "join":
        return not a.stack and normalize_axis(a.dim, rank) == last and all(dep)
    if op == "index":
        axes = _index_axes(a.items, rank)
        return axes is not None and all(_whole(s) for s in axes[:-1])
    if op == "matmul":  # tokens @ a learned matrix
        return dep == [True, False] and constants[0].rank == 2
    return False


# ---------------------------------------------------------------- the gate
_POSITIVE = {"sigmoid", "exp"}  # zero only by underflow, where the derivative (σ(1-σ), exp) underflows too


def _gate_form(graph: Graph, port: Port) -> tuple[int | None, bool]:
    """(the nonzero entries per row the gate's form implies, None where only its values tell; whether it is flat at zero).

    Top-k gates have k nonzero entries per row, softmax, sigmoid and exp gates all of them. Flat
    at zero: wherever an entry is exactly 0, its derivative with respect to every tensor it is
    computed from is 0, so the gradient a routed mixture leaves out there would have been
    multiplied by zero on its way back anyway."""
    data = graph.node(port[0])
    op, a = data["op"], data["attrs"]
    ttype = data["types"][port[1]]
    width = ttype.shape[-1] if ttype.rank and isinstance(ttype.shape[-1], int) else None
    if ttype.dtype != "float" or op == "fill":
        return None, True  # no gradient flows through bools, ints and constants
    if op == "topk" and a.mode in ("softmax", "mask") and normalize_axis(a.dim, ttype.rank) == ttype.rank - 1:
        return a.k, True  # softmax over the kept entries (its Jacobian rows are ∝ the entry) or a 0/1 mask
    if (op == "softmax" and not a.log) or (op == "unary" and a.fn in _POSITIVE):
        return width, True
    if op == "unary" and a.fn == "relu":
        return None, True  # relu'(z) = 0 wherever relu(z) = 0 (torch takes relu'(0) = 0)
    if op == "cast":
        return _gate_form(graph, data["inputs"][0])
    if op == "binary" and a.fn == "mul":
        # a·b is 0 where a or b is; its derivatives there, b·da and a·db, are 0 where both factors are flat.
        forms = [_gate_form(graph, p) for p in data["inputs"]]
        counts = [k for (k, _), p in zip(forms, data["inputs"]) if k is not None and graph.type_of(p) == ttype]
        return (min(counts) if counts else None), all(flat for _, flat in forms)
    if op == "binary" and a.fn == "div" and a.left_scalar is None:
        numerator = data["inputs"][0]  # a/b is 0 where a is, and d/db = -a/b² is then 0 too
        active, flat = _gate_form(graph, numerator)
        return (active if graph.type_of(numerator) == ttype else None), flat
    if op == "where":  # each entry is one branch's: flat where both branches are
        return None, all(_gate_form(graph, p)[1] for p in data["inputs"][1:])
    return None, False


# ---------------------------------------------------------------- the paths
def _learned_paths(data: dict) -> list[str]:
    a = data["attrs"]
    if data["op"] == "param":
        return [a.path]
    return [getattr(a, role) for role in ("weight", "bias") if isinstance(getattr(a, role, None), str)]


def _expert_path(graph: Graph, nodes: set[int]) -> str | None:
    """The common instance path of the expert's learned tensors: where its sub-module goes."""
    paths = [path for n in nodes for path in _learned_paths(graph.node(n))]
    if not paths or any("." not in path for path in paths):
        return None  # nothing learned, or a tensor of the model's own: no path of its own to live at
    return _common_path([path.rsplit(".", 1)[0] for path in paths])


def _paths_usable(graph: Graph, paths: list[str | None]) -> bool:
    """Each expert has its own path, holding no module the graph calls elsewhere (a dropout, a scanned cell)."""
    if any(p is None for p in paths) or len(set(paths)) != len(paths):
        return False
    if any(a != b and b.startswith(a + ".") for a in paths for b in paths):
        return False
    taken = [m.path for m in graph.modules]
    taken += [graph.node(n)["attrs"].path for n in graph.order()
              if isinstance(getattr(graph.node(n)["attrs"], "body", None), Graph)]
    return not any(t == p or t.startswith(p + ".") for t in taken for p in paths)


# ------------------------------------------------------------------ rewrite
def _rewrite(graph: Graph, mixtures: list[Mixture]) -> Graph:
    """A copy of `graph` with each mixture's nodes replaced by one moe_dispatch node, placed where its first node
    was (or as soon after as its inputs exist)."""
    out = Graph(graph.name, params=graph.params, modules=graph.modules)
    ports: dict[Port, Port] = {}
    pending = list(mixtures)
    for n in graph.order():
        for m in list(pending):
            if n >= min(m.removed) and _ready(m, ports):
                pending.remove(m)
                final = m.chain.adds[-1]
                ports[(final, 0)] = (_emit_dispatch(out, graph, m, ports), 0)
        if any(n in m.removed for m in mixtures):
            continue
        data = graph.node(n)
        new = copy_node(out, data, data["attrs"], [ports[p] for p in data["inputs"]])
        for i in range(len(data["types"])):
            ports[(n, i)] = (new, i)
    assert not pending, "a mixture's inputs never became available"
    out.inputs = [(name, ports[(node, 0)][0]) for name, node in graph.inputs]
    out.outputs = [(name, ports[p]) for name, p in graph.outputs]
    out.aux = [(name, ports[p]) for name, p in graph.aux]
    return out


def _inputs(m: Mixture) -> list[Port]:
    ins = [m.tokens, m.chain.terms[0].gate]
    return ins + [m.chain.base] if m.chain.base is not None else ins


def _ready(m: Mixture, ports: dict[Port, Port]) -> bool:
    return all(p in ports for p in _inputs(m))


def _emit_dispatch(out: Graph, graph: Graph, m: Mixture, ports: dict[Port, Port]) -> int:
    x_type = graph.type_of(m.tokens)
    body = Graph("experts")
    span = graph.node(m.chain.adds[-1])["span"]
    x = body.add("input", InputAttrs(name="x", type=x_type), [], [x_type], span, "x")
    body.inputs = [("x", x)]
    flops = Poly()
    for term, nodes, path in zip(m.chain.terms, m.experts, m.paths):
        expert = _expert_graph(graph, nodes, m.tokens, term.expert, path)
        attrs = MoeExpertAttrs(path=path, body=expert)
        node = body.add("moe_expert", attrs, [(x, 0)], REGISTRY["moe_expert"].infer(attrs, [x_type]),
                        graph.node(term.mul)["span"], f"expert_{term.column}")
        body.outputs.append((path, (node, 0)))
        flops = flops + graph_flops(expert)
    tokens = Poly.numel(x_type.shape[:-1]).evaluate() or 1
    final = graph.node(m.chain.adds[-1])
    attrs = MoeDispatchAttrs(path=_common_path(m.paths) or final["name"], body=body,
                             columns=tuple(t.column for t in m.chain.terms), active=m.active,
                             flops_per_token=flops.evaluate() // (tokens * len(m.experts)))
    ins = [ports[p] for p in _inputs(m)]
    types = REGISTRY["moe_dispatch"].infer(attrs, [out.type_of(p) for p in ins])
    return out.add("moe_dispatch", attrs, ins, types, final["span"], final["name"])


def _expert_graph(graph: Graph, nodes: set[int], x: Port, result: Port, path: str) -> Graph:
    """The expert's nodes as a graph of its own, reading the tokens as its input x."""
    x_type = graph.type_of(x)
    body = Graph(path)
    span = graph.node(result[0])["span"]
    ports: dict[Port, Port] = {x: (body.add("input", InputAttrs(name="x", type=x_type), [], [x_type], span, "x"), 0)}
    body.inputs = [("x", ports[x][0])]
    for n in sorted(nodes):
        data = graph.node(n)
        new = copy_node(body, data, data["attrs"], [ports[p] for p in data["inputs"]])
        for i in range(len(data["types"])):
            ports[(n, i)] = (new, i)
    body.outputs = [("y", ports[result])]
    return body


def _common_path(paths: list[str]) -> str | None:
    """The longest dotted prefix every path shares, None where they share none."""
    common = paths[0].split(".")
    for other in paths[1:]:
        parts = other.split(".")
        k = 0
        while k < min(len(common), len(parts)) and common[k] == parts[k]:
            k += 1
        common = common[:k]
    return ".".join(common) or None

