"""Fuse gate chains: each connected chain of element-wise gate math of one shape (σ, tanh, SiLU, products, sums, 1 − z, interpolations) becomes one gate_chain op, in the top-level graph, step-by-step scan bodies and early-exit stages, wherever a fused kernel beats the ops as written on the compile target.

What a chain is. Its members are float element-wise ops (unary functions, + − × /, maximum,
minimum, a power with a constant base or exponent, where, clamp) that all have the same shape;
their operands from outside (the op's inputs) may be of any shape that broadcasts to it, a
scalar included, and a where's condition comes in as a bool input. Chains grow from consumers
toward producers: an op joins the chain of its consumers if the chain stays convex (no path
leaves it and comes back, so the fused op can run where its inputs are ready). A member whose
value is read outside the chain (or is a graph result) becomes an output of the fused op:
computed once, inside it, wherever it is read.

Where it pays. The kernel registry's cost rule decides, for the compile target (device, dtype,
training; symbolic sizes at NOMINAL_DIM): a chain the CPU has nothing to gain on (σ(a + b) and
f ⊙ h: no op to fuse away) is left as written, where fusing would only add a dispatch. On CUDA
one Triton launch beats any two ops: compile for that target to fuse every chain.

Gate marks stay visible. The fused node carries the mark of the chain's first gate-marked
member; each further gate-marked member is an output of the fused op, read through an
`index [...]` view node (no copy) that carries its mark and name. The report lists the same
gates in the same order: a chain whose op would move a gate past another is left unfused.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from gatedsl.errors import Span
from gatedsl.ir.graph import Graph, Port, copy_node
from gatedsl.ir.model import ModelIR, Target
from gatedsl.ir.ops import REGISTRY, GateChainAttrs, IndexAttrs
from gatedsl.kernels.gate_chain.program import UNARY, validate
from gatedsl.kernels.registry import Context, choose, fused_ops, plain_kernel

MIN_OPS = 2  # a chain of one op is that op
MAX_OPS = 64  # keeps the generated kernels small (registers, compile time)
MAX_INPUTS = 16

_BINARY = ("add", "sub", "mul", "div", "maximum", "minimum", "pow")


def fuse_gate_chains(unit: ModelIR) -> ModelIR:
    unit.graph = fuse_graph(unit.graph, unit.target)
    return unit


def fuse_graph(graph: Graph, target: Target) -> Graph:
    """`graph` with its gate chains, and those of the bodies it runs, fused; `graph` itself where nothing changes."""
    bodies = {}
    for n in graph.order():
        data = graph.node(n)
        a = data["attrs"]
        # A scan on a native kernel never runs its body; another fused op's body is its kernel's to read.
        if (data["op"] == "scan" and a.kernel == "loop") or data["op"] in ("cascade", "cascade_stage"):
            body = fuse_graph(a.body, target)
            if body is not a.body:
                bodies[n] = a.model_copy(update={"body": body})
    uses = _Uses.of(graph)
    chains = [c for c in find_chains(graph, uses) if pays(graph, c, uses, target)]
    if not chains and not bodies:
        return graph
    fused = _rebuild(graph, chains, bodies, uses)
    if fused.gates() == graph.gates():
        return fused
    # Some chain moves a gate mark past another: keep the chains, in order, that do not.
    kept: list[list[int]] = []
    for chain in chains:
        attempt = _rebuild(graph, kept + [chain], bodies, uses)
        if attempt.gates() == graph.gates():
            kept.append(chain)
    return _rebuild(graph, kept, bodies, uses)


@dataclass
class _Uses:
    readers: dict[int, list[int]]  # node -> the nodes reading it
    results: set[int]  # nodes whose value the graph returns (outputs, aux)

    @classmethod
    def of(cls, graph: Graph) -> "_Uses":
        readers: dict[int, list[int]] = {n: [] for n in graph.order()}
        for n in graph.order():
            for src, _ in graph.node(n)["inputs"]:
                readers[src].append(n)
        return cls(readers, {node for _, (node, _) in graph.outputs + graph.aux})

    def outside(self, chain: list[int]) -> set[int]:
        """The members read by a node outside the chain, or returned by the graph."""
        members = set(chain)
        return {m for m in chain if m in self.results or any(r not in members for r in self.readers[m])}


NOMINAL_DIM = 64  # a symbolic size (B, T) in the cost of a chain: a step of a scan is then small, a whole sequence large


def pays(graph: Graph, chain: list[int], uses: _Uses, target: Target) -> bool:
    """Whether, for the compile target, a fused kernel beats the chain's ops as written (the plain kernel)."""
    attrs, inputs, _ = chain_program(graph, chain, uses.outside(chain))
    shapes = [tuple(d if isinstance(d, int) else NOMINAL_DIM * d.coeff for d in graph.type_of(p).shape)
              for p in inputs]
    ctx = Context(target.device, target.dtype, target.training, fused_ops()["gate_chain"].sizes(attrs, shapes))
    return choose("gate_chain", ctx).kernel != plain_kernel("gate_chain").name


# ---------------------------------------------------------------- chains
def fusible(graph: Graph, n: int) -> bool:
    """Whether node n is element-wise float gate math a gate_chain can hold."""
    data = graph.node(n)
    op, a = data["op"], data["attrs"]
    if len(data["types"]) != 1 or data["types"][0].dtype != "float":
        return False
    operands = [graph.type_of(p).dtype for p in data["inputs"]]
    if op == "where":
        return operands == ["bool", "float", "float"]
    if any(d != "float" for d in operands):
        return False
    if op == "unary":
        return a.fn in UNARY
    if op == "clamp":
        return True
    if op != "binary" or a.fn not in _BINARY:
        return False
    scalar = a.left_scalar if a.left_scalar is not None else a.right_scalar
    if scalar is not None and (isinstance(scalar, bool) or not isinstance(scalar, (int, float))):
        return False
    if a.fn == "pow":  # a constant exponent, or a constant positive base
        return a.right_scalar is not None or (a.left_scalar is not None and a.left_scalar > 0)
    return True


def find_chains(graph: Graph, uses: _Uses) -> list[list[int]]:
    """The chains of `graph`, each as its member nodes in graph order."""
    order = graph.order()
    candidates = {n for n in order if fusible(graph, n)}
    consumers = uses.readers
    chain_of: dict[int, int] = {}
    members: dict[int, set[int]] = {}
    for n in reversed(order):  # consumers first: a producer joins the chain that reads it
        if n not in candidates:
            continue
        shape = graph.type_of((n, 0)).shape
        reading = [chain_of[c] for c in consumers[n] if c in chain_of
                   and graph.type_of((next(iter(members[chain_of[c]])), 0)).shape == shape]
        options = []
        distinct = sorted(set(reading), key=lambda c: -reading.count(c))
        if len(distinct) > 1:
            options.append(distinct)
        options += [[c] for c in distinct]
        for option in options:
            merged = set().union(*(members[c] for c in option)) | {n}
            if _small_enough(graph, merged) and _convex(graph, merged, consumers):
                target = option[0]
                for c in option[1:]:
                    del members[c]
                members[target] = merged
                for m in merged:
                    chain_of[m] = target
                break
        else:
            chain_of[n] = n
            members[n] = {n}
    chains = [sorted(m) for m in members.values() if len(m) >= MIN_OPS]
    return sorted(chains, key=lambda c: c[0])


def _small_enough(graph: Graph, merged: set[int]) -> bool:
    if len(merged) > MAX_OPS:
        return False
    outside = {p for m in merged for p in graph.node(m)["inputs"] if p[0] not in merged}
    return len(outside) <= MAX_INPUTS


def _convex(graph: Graph, merged: set[int], consumers: dict[int, list[int]]) -> bool:
    """No path leaves `merged` and re-enters it (so one node can stand for all of it)."""
    last = max(merged)
    seen: set[int] = set()
    frontier = [c for m in merged for c in consumers[m] if c not in merged and c < last]
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        for c in consumers[n]:
            if c in merged:
                return False
            if c < last and c not in seen:
                frontier.append(c)
    return True


# ------------------------------------------------------------- programs
def chain_program(graph: Graph, chain: list[int], used_outside: set[int]) -> tuple[GateChainAttrs, list[Port], list[int]]:
    """The chain as a program: its attrs, its input ports, and the member behind each output."""
    inputs: list[Port] = []
    input_ref: dict[Port, int] = {}
    ref: dict[int, int] = {}  # member -> its value in the program
    steps: list[tuple] = []
    members = set(chain)
    for n in chain:
        for p in graph.node(n)["inputs"]:
            if p[0] not in members and p not in input_ref:
                input_ref[p] = len(inputs)
                inputs.append(p)
    n_inputs = len(inputs)

    def emit(fn: str, args: tuple[int, ...], consts: tuple = ()) -> int:
        steps.append((fn, args, consts))
        return n_inputs + len(steps) - 1

    for n in chain:
        data = graph.node(n)
        a = data["attrs"]
        args = tuple(ref[p[0]] if p[0] in ref else input_ref[p] for p in data["inputs"])
        op = data["op"]
        if op == "unary":
            ref[n] = emit(a.fn, args)
        elif op == "where":
            ref[n] = emit("where", args)
        elif op == "clamp":
            ref[n] = emit("clamp", args, (a.min, a.max))
        elif a.left_scalar is None and a.right_scalar is None:
            ref[n] = emit(a.fn, args)
        else:
            scalar = a.left_scalar if a.left_scalar is not None else a.right_scalar
            if a.fn in ("maximum", "minimum"):  # what the backend runs for them: a clamp
                ref[n] = emit("clamp", args, (scalar, None) if a.fn == "maximum" else (None, scalar))
            else:
                const = emit("const", (), (scalar,))
                ref[n] = emit(a.fn, (const, *args) if a.left_scalar is not None else (*args, const))
    gated = [n for n in chain if graph.node(n)["gate"] is not None]
    # A chain whose values are all read inside it (a dead gate, say) still returns its last one.
    exposed = [n for n in chain if n in used_outside or n in gated[1:]] or [chain[-1]]
    if gated and gated[0] in exposed:  # the value whose mark the node carries comes first
        exposed.remove(gated[0])
        exposed.insert(0, gated[0])
    attrs = GateChainAttrs(n_inputs=n_inputs, steps=tuple(steps), outputs=tuple(ref[n] for n in exposed))
    return attrs, inputs, exposed


# ------------------------------------------------------------- rebuild
def _rebuild(graph: Graph, chains: list[list[int]], bodies: dict, uses: _Uses) -> Graph:
    """A copy of `graph` with each chain as one gate_chain node (and its gate-mark views), in a topological order
    that keeps the others' as far as it can."""
    chain_of = {m: i for i, chain in enumerate(chains) for m in chain}
    # Items: ("node", n) for a node left as is, ("chain", i) for a chain; each keyed by its first node.
    def item(n: int) -> tuple[str, int]:
        return ("chain", chain_of[n]) if n in chain_of else ("node", n)

    deps: dict[tuple, set] = {}
    for n in graph.order():
        it = item(n)
        deps.setdefault(it, set())
        for src, _ in graph.node(n)["inputs"]:
            if item(src) != it:
                deps[it].add(item(src))
    first = {it: min(chains[it[1]]) if it[0] == "chain" else it[1] for it in deps}
    users: dict[tuple, list] = {it: [] for it in deps}
    waiting = {it: len(d) for it, d in deps.items()}
    for it, d in deps.items():
        for src in d:
            users[src].append(it)
    ready = [(first[it], it) for it, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    out = Graph(graph.name, params=graph.params, modules=graph.modules)
    ports: dict[Port, Port] = {}
    while ready:
        _, it = heapq.heappop(ready)
        if it[0] == "node":
            n = it[1]
            data = graph.node(n)
            attrs = bodies.get(n, data["attrs"])
            new = copy_node(out, data, attrs, [ports[p] for p in data["inputs"]])
            for i in range(len(data["types"])):
                ports[(n, i)] = (new, i)
        else:
            chain = chains[it[1]]
            _add_chain(graph, out, chain, uses.outside(chain), ports)
        for user in users[it]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, (first[user], user))
    assert all(count == 0 for count in waiting.values()), "a fused chain is not convex"
    out.inputs = [(name, ports[(node, 0)][0]) for name, node in graph.inputs]
    out.outputs = [(name, ports[p]) for name, p in graph.outputs]
    out.aux = [(name, ports[p]) for name, p in graph.aux]
    return out


def _add_chain(graph: Graph, out: Graph, chain: list[int], used_outside: set[int], ports: dict[Port, Port]) -> None:
    attrs, inputs, exposed = chain_program(graph, chain, used_outside)
    assert validate(attrs.program, tuple(graph.type_of(p).dtype for p in inputs)) is None, attrs.text
    nodes = [graph.node(m) for m in chain]
    gated = [m for m in chain if graph.node(m)["gate"] is not None]
    names = list(dict.fromkeys(graph.node(m)["name"] for m in gated + exposed))
    first, last = nodes[0]["span"], max((d["span"] for d in nodes if d["span"] is not None),
                                        key=lambda s: (s.line, s.column), default=None)
    span = None if first is None else Span(first.file, first.line, first.column,
                                           last.end_line or last.line, last.end_column)
    in_ports = [ports[p] for p in inputs]
    types = REGISTRY["gate_chain"].infer(attrs, [out.type_of(p) for p in in_ports])
    node = out.add("gate_chain", attrs, in_ports, types, span, "_".join(names) or nodes[-1]["name"],
                   graph.node(gated[0])["gate"] if gated else None)
    out.node(node)["out_names"] = {j: graph.node(m)["name"] for j, m in enumerate(exposed)}
    for j, m in enumerate(exposed):
        ports[(m, 0)] = (node, j)
    for m in gated[1:]:  # each further gate: a view of its value that carries the mark
        data = graph.node(m)
        view = out.add("index", IndexAttrs(items=(("ellipsis",),)), [ports[(m, 0)]], [data["types"][0]],
                       data["span"], data["name"], data["gate"])
        ports[(m, 0)] = (view, 0)
