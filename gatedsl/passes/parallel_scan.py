"""Parallel scans: a scan whose cell updates its one state linearly, S_t = a_t ⊙ S_{t−1} + b_t with a decay a_t and drive b_t that do not depend on the state, and emits S_t or a readout linear in it, becomes one linear_scan op, whose kernels run it chunk-parallel or step by step.

The form is read off the (lowered) cell, not matched by name: the ops that depend on the state
must be exactly `a ⊙ S + b` (a product of state-independent factors times S, plus a signed sum
of state-independent terms, in any operand order) and the readout (an einsum or a product of the
new state with a state-independent operand); anything else (a nonlinearity on the state, a decay
or readout that reads the state, the delta rule's S k_t, a second state) keeps the loop. Every
state-independent value the cell computes per step is computed for all steps at once in the
graph around the scan, time first. The decay is handed over as its log where that is exact: the
argument of the exp (or logsigmoid of the sigmoid) that produced it, through layout ops, or
log a_t where an interval analysis of its producers proves a_t ≥ 1e-30 (finite logs that round
like any log); otherwise as a_t itself, and the log-space (chunked) form does not apply.

The cell stays in the op's attributes unrun, so its weights and gate marks are declared where the
report found them; results, learned tensors and their paths are unchanged. Runs at -O2: it
replaces the loop by another algorithm (sums reassociated across a chunk, like native_rnn's
kernels), while -O1 keeps each step as the spec wrote it.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Any, Callable

import networkx as nx

from gatedsl.errors import ShapeError
from gatedsl.ir.graph import Graph, Port, replace_scans
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import (
    REGISTRY,
    AxisAttrs,
    BinaryAttrs,
    EinsumAttrs,
    FillAttrs,
    IndexAttrs,
    LinearScanAttrs,
    PermuteAttrs,
    ReduceAttrs,
    ScanAttrs,
    UnaryAttrs,
)
from gatedsl.ir.types import Sym, TensorType, broadcast

MIN_DECAY = 1e-30  # a decay proven at least this is logged as log a_t: far above float32's smallest normal (1.2e-38)


def parallel_scan(unit: ModelIR) -> ModelIR:
    unit.graph = _rebuild(unit.graph)
    return unit


def _rebuild(graph: Graph) -> Graph:
    """`graph` with every linear scan in it (and in scan bodies) replaced; `graph` itself where it has no scan."""
    return replace_scans(graph, _parallelise)


# ------------------------------------------------------------ recognition
@dataclass
class LinearCell:
    """A cell found linear in its state: S ← (Π decay) ⊙ S + Σ sign · term, emitting S or readout(S, operand)."""

    decay: list[Port]  # state-independent factors (none: a_t = 1)
    drive: list[tuple[int, Port]]  # (+1 or −1, a state-independent term)
    readout: str  # "none", "einsum" or "mul"
    operand: Port | None = None
    equation: str = ""  # the readout einsum, the state's operand first


def recognise(a: ScanAttrs) -> LinearCell | None:
    """The linear form of a scan's cell, or None where the cell is not of that form."""
    body = a.body
    if a.kernel != "loop" or a.n_states != 1 or len(body.outputs) != 2:
        return None
    (state,) = [node for (_, node), role in zip(body.inputs, a.roles) if role == "state"]
    state_type = body.type_of((state, 0))
    if state_type.dtype != "float" or not state_type.shape:
        return None
    depends = {state} | nx.descendants(body.g, state)
    emitted, new_state = body.outputs[0][1], body.outputs[1][1]
    update: set[int] = set()
    affine = _affine(body, new_state, state, depends, update)
    if affine is None or not affine[1]:
        return None
    if any(body.type_of((n, 0)) != state_type for n in update):
        return None  # element-wise in the state throughout: nothing broadcasts it up
    cell = LinearCell(decay=affine[0], drive=affine[1], readout="none")
    if emitted != new_state:
        data = body.node(emitted[0])
        ins, op, attrs = data["inputs"], data["op"], data["attrs"]
        if emitted[1] != 0 or len(ins) != 2 or new_state not in ins:
            return None
        operand = ins[1] if ins[0] == new_state else ins[0]
        if operand[0] in depends:
            return None
        if op == "einsum":
            left, right = attrs.equation.split("->")[0].split(",")
            first_is_state = ins[0] == new_state
            equation = attrs.equation if first_is_state else f"{right},{left}->{attrs.equation.split('->')[1]}"
            cell.readout, cell.operand, cell.equation = "einsum", operand, equation
        elif op == "binary" and attrs.fn == "mul" and attrs.left_scalar is None and attrs.right_scalar is None:
            cell.readout, cell.operand = "mul", operand
        else:
            return None
        update.add(emitted[0])
    if depends - update - {state}:
        return None  # another op reads the state
    live = {p[0] for _, p in body.outputs}
    live |= set().union(*(nx.ancestors(body.g, n) for n in list(live)))
    inputs = {node for _, node in body.inputs}
    if any(n not in live and n not in inputs for n in body.order()):
        return None  # an op whose result nothing reads still runs every step (a dropout draws its noise)
    return cell


def _affine(body: Graph, port: Port, state: int, depends: set[int], update: set[int]):
    """(decay factors, signed drive terms) with value = Π factors ⊙ S + Σ sign · term, or None."""
    node, index = port
    if node == state:
        return [], []
    if node not in depends or index != 0:
        return None
    data = body.node(node)
    a = data["attrs"]
    if data["op"] != "binary" or a.fn not in ("add", "sub", "mul") or a.left_scalar is not None \
            or a.right_scalar is not None:
        return None
    update.add(node)
    left, right = data["inputs"]
    if a.fn == "mul":
        carriers = [p for p in (left, right) if p[0] in depends]
        if len(carriers) != 1:
            return None
        factor = right if carriers[0] == left else left
        inner = _affine(body, carriers[0], state, depends, update)
        if inner is None or inner[1]:
            return None  # a factor times (a S + b): kept to one decay and one drive
        return inner[0] + [factor], []
    decay, drive = None, []
    for sign, side in ((1, left), (1 if a.fn == "add" else -1, right)):
        if side[0] not in depends:
            drive.append((sign, side))
            continue
        inner = _affine(body, side, state, depends, update)
        if inner is None or decay is not None or sign < 0:
            return None
        decay, terms = inner
        drive += terms
    return decay, drive


def _einsum_terms(equation: str, ranks: list[int]) -> tuple[list[tuple], tuple] | None:
    """The operands' and the result's dims as symbols, each '...' spelled out (right-aligned, as it broadcasts)."""
    lhs, rhs = equation.split("->")
    terms = lhs.split(",")
    spelled, widths = [], []
    for term, rank in zip(terms, ranks):
        before, dots, after = term.partition("...")
        width = rank - len(before) - len(after) if dots else 0
        widths.append(width)
        spelled.append(tuple(before) + tuple(("...", i) for i in range(width, 0, -1)) + tuple(after))
    before, dots, after = rhs.partition("...")
    width = max(widths) if dots else 0
    return spelled, tuple(before) + tuple(("...", i) for i in range(width, 0, -1)) + tuple(after)


def _is_outer(equation: str, ranks: list[int]) -> int | None:
    """Which operand is k where the einsum is the outer product k ⊗ v over the last dims (b..k, b..v -> b..kv)."""
    terms, out = _einsum_terms(equation, ranks)
    batch = out[:-2]
    for k_index in (0, 1):
        k, v = terms[k_index], terms[1 - k_index]
        if len(set(out)) == len(out) and k == batch + out[-2:-1] and v == batch + out[-1:]:
            return k_index
    return None


def _is_key_readout(equation: str, ranks: list[int]) -> bool:
    """Whether einsum(equation, S, q) is o = q S over the key dim of S = [b.., K, V] (b..kv, b..k -> b..v)."""
    (state, q), out = _einsum_terms(equation, ranks)
    return len(set(state)) == len(state) and q == state[:-1] and out == state[:-2] + state[-1:]


# --------------------------------------------------------------- planning
class _Plan:
    """Nodes to add to `graph` just before the scan, numbered from graph's next id and added only once the
    whole rewrite is known to work (and only those the result reads)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.base = graph._next
        self.items: list[dict[str, Any]] = []

    def data(self, node: int) -> dict[str, Any]:
        return self.items[node - self.base] if node >= self.base else self.graph.node(node)

    def type_of(self, port: Port) -> TensorType:
        return self.data(port[0])["types"][port[1]]

    def add(self, op: str, attrs, inputs: list[Port], like: dict, expect: list[TensorType] | None = None,
            name: str | None = None) -> int | None:
        """A planned node (None where its shapes do not work out, or differ from `expect`)."""
        try:
            types = REGISTRY[op].infer(attrs, [self.type_of(p) for p in inputs])
        except ShapeError:
            return None
        if expect is not None and types != expect:
            return None
        self.items.append(dict(op=op, attrs=attrs, inputs=list(inputs), types=types, span=like["span"],
                               name=name or like["name"], gate=None))
        return self.base + len(self.items) - 1

    def emit(self, results: list[Port]) -> dict[int, int]:
        """Add the planned nodes `results` read to the graph; their ids there."""
        needed: set[int] = set()
        stack = [p[0] for p in results]
        while stack:
            n = stack.pop()
            if n >= self.base and n not in needed:
                needed.add(n)
                stack += [src for src, _ in self.data(n)["inputs"]]
        ids: dict[int, int] = {}
        for i, item in enumerate(self.items):
            if self.base + i in needed:
                ins = [(ids.get(src, src), port) for src, port in item["inputs"]]
                ids[self.base + i] = self.graph.add(item["op"], item["attrs"], ins, item["types"], item["span"],
                                                    item["name"])
        return ids


Value = tuple[Port, bool]  # a value for every step, and whether it has a time axis in front (else: the same each step)

_LAST_DIM_OPS = ("unary", "cast", "clamp", "binary_gate", "linear", "heads", "norm", "fill")
_DIM_OPS = ("softmax", "cumulative", "flip", "split", "topk")
_LAYOUT_OPS = ("unsqueeze", "squeeze", "permute", "heads", "index", "reshape", "flip")  # move values, change none


class _AllSteps:
    """The state-independent values of a scan's cell computed for all steps at once, around the scan, time first."""

    def __init__(self, plan: _Plan, scan: dict, ins: list[Port]):
        self.plan = plan
        self.scan = scan
        a: ScanAttrs = scan["attrs"]
        self.body = a.body
        self.memo: dict[Port, Value | None] = {}
        self.length = None
        axes = iter(a.axes)
        for (_, node), role, port in zip(a.body.inputs, a.roles, ins):
            if role == "seq":
                axis = next(axes)
                full = plan.type_of(port)
                self.length = full.shape[axis] if self.length is None else self.length
                if axis:
                    dims = (axis,) + tuple(i for i in range(full.rank) if i != axis)
                    port = (plan.add("permute", PermuteAttrs(dims=dims), [port], scan), 0)
                self.memo[(node, 0)] = (port, True)
            elif role == "const":
                self.memo[(node, 0)] = (port, False)

    def timed_type(self, step: TensorType) -> TensorType:
        return TensorType((self.length,) + step.shape, step.dtype)

    def add(self, op: str, attrs, inputs: list[Port], expect: list[TensorType] | None = None) -> Port | None:
        node = self.plan.add(op, attrs, inputs, self.scan, expect)
        return None if node is None else (node, 0)

    def value(self, port: Port) -> Value | None:
        """`port` of the cell for every step, or None where an op has no all-steps form here."""
        if port not in self.memo:
            self.memo[port] = self._compute(port)
        return self.memo[port]

    def _compute(self, port: Port) -> Value | None:
        node, index = port
        data = self.body.node(node)
        if data["op"] in ("input", "dropout", "noise") or isinstance(data["attrs"].__dict__.get("body"), Graph):
            return None  # the state; a draw of noise, fresh at every step; a nested scan or stage
        operands = [self.value(p) for p in data["inputs"]]
        if any(o is None for o in operands):
            return None
        steps = [self.body.type_of(p) for p in data["inputs"]]
        if not any(timed for _, timed in operands):  # the same at every step: computed once
            new = self.plan.add(data["op"], data["attrs"], [p for p, _ in operands], data, data["types"],
                                name=f"{self.scan['name']}_{data['name']}")
            return None if new is None else ((new, index), False)
        translated = self._translate(data, operands, steps)
        if translated is None:
            return None
        attrs, inputs = translated
        new = self.plan.add(data["op"], attrs, inputs, data, [self.timed_type(t) for t in data["types"]],
                            name=f"{self.scan['name']}_{data['name']}")
        return None if new is None else ((new, index), True)

    def align(self, value: Value, rank: int) -> Port | None:
        """A timed value as [T, 1.., *step] of `rank` step dims, so that it broadcasts as the step did."""
        port, timed = value
        if not timed:
            return port
        while port is not None and self.plan.type_of(port).rank < rank + 1:
            port = self.add("unsqueeze", AxisAttrs(dim=1), [port])
        return port

    def _translate(self, data: dict, operands: list[Value], steps: list[TensorType]):
        """(attrs, inputs) of op `data` applied to all steps at once: its step dims one further right."""
        op, a = data["op"], data["attrs"]
        ports = [p for p, _ in operands]

        def shift(dim: int) -> int:
            return dim + 1 if dim >= 0 else dim

        if op in ("binary", "where"):
            rank = data["types"][0].rank
            aligned = [self.align(v, rank) for v in operands]
            return None if None in aligned else (a, aligned)
        if op == "einsum":
            time = next(c for c in string.ascii_letters if c not in a.equation)
            lhs, rhs = a.equation.split("->")
            terms = [time + term if timed else term for term, (_, timed) in zip(lhs.split(","), operands)]
            return EinsumAttrs(equation=",".join(terms) + "->" + time + rhs), ports
        if not all(timed for _, timed in operands):
            return None  # mixing per-step and constant operands needs a rule of its own
        if op in _LAST_DIM_OPS:
            return a, ports
        if op in ("unsqueeze", "squeeze"):
            return AxisAttrs(dim=shift(a.dim)), ports
        if op == "permute":
            return PermuteAttrs(dims=(0,) + tuple(d + 1 for d in a.dims)), ports
        if op in _DIM_OPS or op in ("join", "gather"):
            return a.model_copy(update={"dim": shift(a.dim)}), ports
        if op == "reduce":
            return ReduceAttrs(fn=a.fn, dims=tuple(shift(d) for d in a.dims), keepdim=a.keepdim), ports
        if op == "index":
            return IndexAttrs(items=(("slice", None, None, None),) + a.items), ports
        return None

    def binary(self, fn: str, x: Value, y: Value) -> Value | None:
        types = [self.plan.type_of(p) for p, _ in (x, y)]
        steps = [t.shape[1:] if timed else t.shape for t, (_, timed) in zip(types, (x, y))]
        shape = broadcast(*steps)
        if shape is None:
            return None
        aligned = [self.align(v, len(shape)) for v in (x, y)]
        port = None if None in aligned else self.add("binary", BinaryAttrs(fn=fn), aligned)
        return None if port is None else (port, x[1] or y[1])

    def timed(self, value: Value, rank: int) -> Port | None:
        """A value as [T or 1, *step] with `rank` step dims (a constant gets a time axis of 1)."""
        port, timed = value
        if not timed:
            port = self.add("unsqueeze", AxisAttrs(dim=0), [port])
        return None if port is None else self.align((port, True), rank)

    # --------------------------------------------------------- log decay
    def log(self, value: Value) -> Value | None:
        """log of a decay value where it is exact, else None: the exp's argument (logsigmoid of the sigmoid's)
        through layout ops, or log a_t where a_t ≥ MIN_DECAY is proven."""
        port, timed = value
        chain = []
        source = port
        while self.plan.data(source[0])["op"] in _LAYOUT_OPS and source[1] == 0:
            chain.append(self.plan.data(source[0]))
            source = self.plan.data(source[0])["inputs"][0]
        producer = self.plan.data(source[0])
        fn = producer["attrs"].fn if producer["op"] == "unary" else None
        if fn == "exp":
            log = producer["inputs"][0]
        elif fn == "sigmoid":
            log = self.add("unary", UnaryAttrs(fn="logsigmoid"), producer["inputs"][:1])
        elif interval(self.plan.data, port)[0] >= MIN_DECAY:
            log, chain = self.add("unary", UnaryAttrs(fn="log"), [port]), []
        else:
            return None
        for layout in reversed(chain):
            log = None if log is None else self.add(layout["op"], layout["attrs"], [log], [layout["types"][0]])
        return None if log is None else (log, timed)


def _parallelise(out: Graph, data: dict, ins: list[Port]) -> list[Port] | None:
    """The ports of a linear_scan (and the ops around it) that compute what scan `data` does, added to `out`;
    None (and `out` unchanged) where the scan is not linear in its state."""
    a: ScanAttrs = data["attrs"]
    cell = recognise(a)
    if cell is None:
        return None
    plan = _Plan(out)
    steps = _AllSteps(plan, data, ins)
    body = a.body
    state_port = next(port for port, role in zip(ins, a.roles) if role == "state")
    state = plan.type_of(state_port)
    rank = state.rank

    factors = [steps.value(p) for p in cell.decay]
    if None in factors:
        return None
    logs = [steps.log(f) for f in factors]
    if None not in logs:  # log a_t = Σ log factors (none: a_t = 1)
        decay = _fold(steps, "add", logs) if logs else \
            ((steps.add("fill", FillAttrs(value=0.0, shape=(1,) * (rank + 1)), []), True))
        log_decay = True
    else:
        decay, log_decay = _fold(steps, "mul", factors), False
    decay = steps.timed(decay, rank) if decay is not None and decay[0] is not None else None
    if decay is None or broadcast(plan.type_of(decay).shape[1:], state.shape) != state.shape:
        return None

    drive_kind, drive = "given", None
    if len(cell.drive) == 1 and cell.drive[0][0] == 1:
        drive = _outer_drive(steps, body, cell.drive[0][1], state)
        drive_kind = "outer" if drive is not None else "given"
    if drive is None:
        terms = [steps.value(p) for _, p in cell.drive]
        if None in terms:
            return None
        total = terms[0] if cell.drive[0][0] > 0 else _neg(steps, terms[0])
        for (sign, _), term in zip(cell.drive[1:], terms[1:]):
            total = None if total is None else steps.binary("add" if sign > 0 else "sub", total, term)
        port = None if total is None else steps.timed(total, rank)
        if port is None or plan.type_of(port).shape[1:] != state.shape:
            return None
        drive = [port]

    operand, key_readout = [], False
    if cell.readout != "none":
        value = steps.value(cell.operand)
        step_rank = body.type_of(cell.operand).rank
        if value is None or (cell.readout == "mul" and step_rank > rank):
            return None
        port = steps.timed(value, step_rank if cell.readout == "einsum" else rank)
        if port is None:
            return None
        operand = [port]
        key_readout = cell.readout == "einsum" and _is_key_readout(cell.equation, [rank, step_rank]) \
            and body.type_of(cell.operand).shape == state.shape[:-1]

    attrs = LinearScanAttrs(cell=a.cell, path=a.path, body=body, log_decay=log_decay, drive=drive_kind,
                            readout=cell.readout, equation=cell.equation, key_readout=key_readout,
                            reverse=a.reverse, last=a.last)
    emitted = body.type_of(body.outputs[0][1])
    first = emitted if a.last else steps.timed_type(emitted)
    node = plan.add("linear_scan", attrs, [decay, *drive, *operand, state_port], data, [first, state])
    if node is None:
        return None
    result = (node, 0)
    if not a.last:
        lead = min(a.axes[0], emitted.rank)
        if lead:
            dims = tuple(range(1, lead + 1)) + (0,) + tuple(range(lead + 1, emitted.rank + 1))
            result = steps.add("permute", PermuteAttrs(dims=dims), [result], [data["types"][0]])
            if result is None:
                return None
    ids = plan.emit([result, (node, 1)])
    scan_op, last_op = out.node(ids[node]), out.node(ids[result[0]])
    scan_op.update({key: value for key, value in data.items() if key == "out_names"})
    last_op["gate"] = data["gate"]  # a mark on the scan's result stays on the result
    return [(ids[result[0]], 0), (ids[node], 1)]


def _fold(steps: _AllSteps, fn: str, values: list[Value]) -> Value | None:
    total = values[0]
    for v in values[1:]:
        total = None if total is None else steps.binary(fn, total, v)
    return total


def _neg(steps: _AllSteps, value: Value) -> Value | None:
    port = steps.add("unary", UnaryAttrs(fn="neg"), [value[0]])
    return None if port is None else (port, value[1])


def _outer_drive(steps: _AllSteps, body: Graph, term: Port, state: TensorType) -> list[Port] | None:
    """[k, v] for all steps where the drive is the outer product k_tᵀ v_t of a [*, K, V] state, else None."""
    data = body.node(term[0])
    if data["op"] != "einsum" or len(data["inputs"]) != 2 or term[1] != 0 or state.rank < 2:
        return None
    step_types = [body.type_of(p) for p in data["inputs"]]
    k_index = _is_outer(data["attrs"].equation, [t.rank for t in step_types])
    if k_index is None:
        return None
    k, v = data["inputs"][k_index], data["inputs"][1 - k_index]
    if body.type_of(k).shape != state.shape[:-1] or body.type_of(v).shape != state.shape[:-2] + state.shape[-1:]:
        return None
    values = [steps.value(k), steps.value(v)]
    if None in values:
        return None
    ports = [steps.timed(x, state.rank - 1) for x in values]
    return None if None in ports else ports


# -------------------------------------------------------- value intervals
Interval = tuple[float, float]
UNKNOWN: Interval = (-math.inf, math.inf)


def interval(data: Callable[[int], dict], port: Port, memo: dict | None = None, depth: int = 0) -> Interval:
    """Bounds every element of the value at `port` lies within, from its producers (UNKNOWN where none are known).

    `data(node)` gives a node's op, attrs, inputs and types; inputs and learned tensors are unbounded."""
    memo = {} if memo is None else memo
    if port in memo:
        return memo[port]
    if depth > 200:  # a long chain of producers: give up rather than recurse further
        return UNKNOWN
    node = data(port[0])
    op, a, ins = node["op"], node["attrs"], node["inputs"]

    def of(i: int) -> Interval:
        return interval(data, ins[i], memo, depth + 1)

    def size(dims) -> int | None:
        shape = data(ins[0][0])["types"][ins[0][1]].shape
        sizes = [shape[d] for d in dims]
        return None if any(isinstance(s, Sym) for s in sizes) else math.prod(sizes)

    result = UNKNOWN
    if op == "fill":
        result = (a.value, a.value)
    elif op == "cast":
        source = data(ins[0][0])["types"][ins[0][1]]
        result = (0.0, 1.0) if source.dtype == "bool" else of(0)
    elif op in _LAYOUT_OPS or op in ("split", "gather"):
        result = of(0)
    elif op in ("join", "where"):
        parts = [of(i) for i in range(len(ins))][1 if op == "where" else 0:]
        result = (min(p[0] for p in parts), max(p[1] for p in parts))
    elif op == "clamp":
        lo, hi = of(0)
        low, high = (-math.inf if a.min is None else a.min), (math.inf if a.max is None else a.max)
        result = (min(max(lo, low), high), max(min(hi, high), low))
    elif op == "softmax":
        result = (-math.inf, 0.0) if a.log else (0.0, 1.0)
    elif op == "topk" and a.mode != "values_indices":
        result = (0.0, 1.0)
    elif op == "unary":
        result = _unary_interval(a.fn, of(0))
    elif op == "binary":
        operands = [of(i) for i in range(len(ins))]
        if a.left_scalar is not None:
            operands.insert(0, (float(a.left_scalar), float(a.left_scalar)))
        if a.right_scalar is not None:
            operands.append((float(a.right_scalar), float(a.right_scalar)))
        result = _binary_interval(a.fn, *operands)
    elif op == "cumulative" and a.fn == "sum":
        result = _sum_interval(of(0), size([a.dim]), at_least_one=True)
    elif op == "reduce" and a.fn in ("sum", "mean", "max", "min"):
        result = of(0) if a.fn != "sum" else _sum_interval(of(0), size(a.dims), at_least_one=False)
    memo[port] = result
    return result


def _monotone(fn: Callable[[float], float], iv: Interval) -> Interval:
    def safe(x: float) -> float:
        try:
            return fn(x)
        except OverflowError:
            return math.inf if x > 0 else -math.inf

    return safe(iv[0]), safe(iv[1])


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


_INCREASING: dict[str, Callable[[float], float]] = {
    "exp": lambda x: 0.0 if x == -math.inf else math.exp(x),
    "sigmoid": lambda x: 0.0 if x == -math.inf else 1.0 if x == math.inf else _sigmoid(x),
    "logsigmoid": lambda x: x if x < -30 else min(0.0, -math.log1p(math.exp(-x))) if x != math.inf else 0.0,
    "softplus": lambda x: x if x > 30 else 0.0 if x == -math.inf else math.log1p(math.exp(x)),
    "tanh": math.tanh,
    "relu": lambda x: max(x, 0.0),
    "erf": math.erf,
    "elu": lambda x: x if x > 0 else math.expm1(x) if x != -math.inf else -1.0,
}


def _unary_interval(fn: str, iv: Interval) -> Interval:
    lo, hi = iv
    if fn in _INCREASING:
        return _monotone(_INCREASING[fn], iv)
    if fn == "neg":
        return -hi, -lo
    if fn in ("sqrt", "log") and lo >= (0 if fn == "sqrt" else 1e-300):
        return _monotone(math.sqrt if fn == "sqrt" else math.log, iv)
    if fn in ("abs", "square"):
        low = lo if lo >= 0 else -hi if hi <= 0 else 0.0
        high = max(abs(lo), abs(hi))
        return (low, high) if fn == "abs" else (low * low, high * high)
    if fn in ("reciprocal", "rsqrt") and lo > 0:
        power = -1.0 if fn == "reciprocal" else -0.5
        return hi ** power, lo ** power
    if fn in ("sin", "cos", "sign"):
        return -1.0, 1.0
    if fn in ("silu", "gelu"):  # their least values: about -0.2785 and -0.1700
        return -0.28 if fn == "silu" else -0.18, max(hi, 0.0)
    return UNKNOWN


def _products(pairs) -> Interval:
    values = [x * y for x, y in pairs]
    return UNKNOWN if any(math.isnan(v) for v in values) else (min(values), max(values))


def _binary_interval(fn: str, left: Interval, right: Interval) -> Interval:
    (l1, h1), (l2, h2) = left, right
    if fn == "add":
        return l1 + l2, h1 + h2
    if fn == "sub":
        return l1 - h2, h1 - l2
    if fn == "mul":
        return _products([(l1, l2), (l1, h2), (h1, l2), (h1, h2)])
    if fn == "div" and (l2 > 0 or h2 < 0):
        return _products([(l1, 1 / l2), (l1, 1 / h2), (h1, 1 / l2), (h1, 1 / h2)])
    if fn == "maximum":
        return max(l1, l2), max(h1, h2)
    if fn == "minimum":
        return min(l1, l2), min(h1, h2)
    if fn == "pow" and l1 == h1 and l1 > 0:  # a positive constant base: monotone in the exponent
        ends = _monotone(lambda e: l1 ** e, right)
        return (min(ends), max(ends))
    if fn == "pow" and l2 == h2 and l1 >= 0:  # a non-negative base to a constant power
        if l2 >= 0 or l1 > 0:
            ends = _monotone(lambda x: x ** l2, left)
            return (min(ends), max(ends))
    if fn in ("lt", "le", "gt", "ge", "eq", "ne", "and", "or"):
        return 0.0, 1.0
    return UNKNOWN


def _sum_interval(iv: Interval, n: int | None, at_least_one: bool) -> Interval:
    """Bounds of a sum of n terms in `iv` (a running sum: of 1 to n terms); n None where it is symbolic."""
    lo, hi = iv
    if n is None:
        return (lo if lo >= 0 and at_least_one else 0.0 if lo >= 0 else -math.inf,
                hi if hi <= 0 and at_least_one else 0.0 if hi <= 0 else math.inf)
    few = 1 if at_least_one else n
    return min(lo * few, lo * n), max(hi * few, hi * n)
