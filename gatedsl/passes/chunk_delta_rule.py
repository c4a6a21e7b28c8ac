"""Chunk the delta rule: a scan whose cell is the (gated) delta rule, S_t = α_t (S_{t−1} − β_t (S_{t−1} k_t) k_tᵀ) + β_t v_t k_tᵀ with the readout o_t = S_t q_t, becomes one delta_rule_scan op, whose kernels run it in chunks or step by step.

The form is read off the lowered cell's ops, never its name. Every value the cell computes is
expanded into a sum of products (index notation: each product's factors with a label per axis,
the labels that are not the value's own axes summed over), through einsum, matmul, products and
sums with broadcasting, sums over axes, unsqueeze, squeeze and permute; a factor is the carried
state, a sliced input, or an element-wise function of one. The new state must then be exactly
three products, in any spelling that expands to them (operand order, (β v) kᵀ or β (v kᵀ), α
before or after the erase, S + β (v − α S k) kᵀ ...):
    α S  −  α β (S k) kᵀ  +  β v kᵀ
with the same k in all three, α and β one value per row of the state (or absent: α = 1 is plain
DeltaNet, β = 1 an unscaled write), q, k, v vectors over the state's last and first axes, and no
factor that reads the state but S itself; the emitted value must be the new state times q. A
different sign, β on one term only, a second k, a function of the state or a second state keeps
the loop.

α reaches the kernels as log α where that is exact: the argument of the exp that produced it
(through layout ops); else as α, whose logarithm the chunked kernel takes when every α_t > 0 and
otherwise it runs the step form. The cell stays in the op's attributes unrun, so its weights and
gate marks are declared where the report finds them; results, learned tensors and paths are
unchanged. Runs at -O2: the chunked form reassociates sums across a chunk (like native_rnn's
kernels), while -O1 keeps each step as the spec wrote it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import Hashable

from gatedsl.ir.graph import Graph, Port, replace_scans
from gatedsl.ir.model import ModelIR
from gatedsl.ir.ops import (
    REGISTRY,
    AxisAttrs,
    DeltaRuleScanAttrs,
    FlipAttrs,
    IndexAttrs,
    PermuteAttrs,
    ScanAttrs,
    UnaryAttrs,
)
from gatedsl.ir.types import Dim, TensorType

Label = int | None  # an axis's index label; None for an axis of size 1 (it broadcasts)
STATE = ("state",)
NEW_STATE = ("new state",)


def chunk_delta_rule(unit: ModelIR) -> ModelIR:
    unit.graph = _rebuild(unit.graph)
    return unit


def _rebuild(graph: Graph) -> Graph:
    """`graph` with every delta-rule scan in it (and in scan bodies) replaced; `graph` itself where it has no scan."""
    return replace_scans(graph, _replace_if_delta)


def _replace_if_delta(out: Graph, data: dict, ins: list[Port]) -> list[Port] | None:
    cell = recognise(data["attrs"])
    return None if cell is None else _replace(out, data, ins, cell)


# ------------------------------------------------------------- sums of products
@dataclass(frozen=True)
class Factor:
    atom: Hashable  # STATE, NEW_STATE, ("seq", body input index) or ("unary", fn, atom)
    labels: tuple[Label, ...]  # one per axis of the atom's step value


@dataclass(frozen=True)
class Term:
    coef: float
    factors: tuple[Factor, ...]
    out: tuple[Label, ...]  # the value's axes; a label the factors carry but `out` does not is summed over


Expr = tuple[Term, ...]  # a sum of terms


class _NotRead(Exception):
    """The value is not a sum of products of the atoms read here."""


class _Reader:
    """Expands a cell body's values into sums of products of its atoms, each use of a value with labels of its own."""

    def __init__(self, body: Graph, atoms: dict[int, Hashable]):
        self.body = body
        self.atoms = atoms  # body node -> the atom it stands for (the state, the sequences, the new state)
        self.labels = itertools.count()
        self.memo: dict[Port, Expr] = {}
        self.steps: dict[Hashable, TensorType] = {}  # each atom's type in one step

    def read(self, port: Port) -> Expr:
        if port not in self.memo:
            self.memo[port] = self._read(port)
        return self._fresh(self.memo[port])

    def _fresh(self, expr: Expr) -> Expr:
        names: dict[int, int] = {}

        def rename(label: Label) -> Label:
            return None if label is None else names.setdefault(label, next(self.labels))

        return tuple(Term(t.coef, tuple(Factor(f.atom, tuple(map(rename, f.labels))) for f in t.factors),
                          tuple(map(rename, t.out))) for t in expr)

    def atom(self, key: Hashable, ttype: TensorType) -> Expr:
        self.steps[key] = ttype
        labels = tuple(None if d == 1 else next(self.labels) for d in ttype.shape)
        return (Term(1.0, (Factor(key, labels),), labels),)

    def _read(self, port: Port) -> Expr:
        node, index = port
        data = self.body.node(node)
        op, a = data["op"], data["attrs"]
        if node in self.atoms:
            return self.atom(self.atoms[node], data["types"][0])
        if index != 0 or data["types"][0].dtype != "float":
            raise _NotRead
        types = [self.body.type_of(p) for p in data["inputs"]]
        if op == "einsum":
            return _einsum(a.equation, [self.read(p) for p in data["inputs"]], types)
        if op == "matmul":
            return _matmul([self.read(p) for p in data["inputs"]], types)
        if op == "binary":
            return self._binary(data, types)
        if op == "unary":
            (x,) = (self.read(p) for p in data["inputs"])
            if a.fn == "neg":
                return _scale(x, -1.0)
            if len(x) == 1 and len(x[0].factors) == 1 and x[0].coef == 1 and x[0].out == x[0].factors[0].labels \
                    and x[0].factors[0].atom[0] in ("seq", "unary"):  # an element-wise function of a sliced input
                return self.atom(("unary", a.fn, x[0].factors[0].atom), data["types"][0])
            raise _NotRead
        if len(data["inputs"]) != 1:
            raise _NotRead
        x = self.read(data["inputs"][0])
        if op == "unsqueeze":
            axis = a.dim % (types[0].rank + 1)
            return tuple(Term(t.coef, t.factors, t.out[:axis] + (None,) + t.out[axis:]) for t in x)
        if op == "squeeze":
            axis = a.dim % types[0].rank
            if any(t.out[axis] is not None for t in x):
                raise _NotRead
            return tuple(Term(t.coef, t.factors, t.out[:axis] + t.out[axis + 1:]) for t in x)
        if op == "permute":
            return tuple(Term(t.coef, t.factors, tuple(t.out[i] for i in a.dims)) for t in x)
        if op == "reduce" and a.fn == "sum":
            return _sum_over(x, {d % types[0].rank for d in a.dims}, types[0].shape, a.keepdim)
        raise _NotRead

    def _binary(self, data: dict, types: list[TensorType]) -> Expr:
        a = data["attrs"]
        scalar = a.left_scalar if a.left_scalar is not None else a.right_scalar
        if scalar is not None:
            if isinstance(scalar, bool):
                raise _NotRead
            (x,) = (self.read(p) for p in data["inputs"])
            constant = _pad((Term(float(scalar), (), ()),), types[0].rank)
            if a.fn == "mul":
                return _scale(x, float(scalar))
            if a.fn == "div" and a.right_scalar is not None and scalar != 0:
                return _scale(x, 1.0 / scalar)
            if a.fn == "add":
                return x + constant
            if a.fn == "sub":
                return x + _scale(constant, -1.0) if a.right_scalar is not None else constant + _scale(x, -1.0)
            raise _NotRead
        x, y = (self.read(p) for p in data["inputs"])
        rank = max(t.rank for t in types)
        if a.fn in ("add", "sub"):
            return _pad(x, rank) + _pad(y if a.fn == "add" else _scale(y, -1.0), rank)
        if a.fn == "mul":
            letters = [list(range(rank - t.rank, rank)) for t in types]
            return _product([x, y], letters, list(range(rank)), types)
        raise _NotRead


def _scale(expr: Expr, by: float) -> Expr:
    return tuple(Term(t.coef * by, t.factors, t.out) for t in expr)


def _pad(expr: Expr, rank: int) -> Expr:
    """The terms broadcast to `rank` axes: new leading axes of size 1."""
    return tuple(Term(t.coef, t.factors, (None,) * (rank - len(t.out)) + t.out) for t in expr)


def _letter_sizes(letters: list[list], types: list[TensorType]) -> dict:
    sizes: dict = {}
    for axes, t in zip(letters, types):
        for letter, d in zip(axes, t.shape):
            if sizes.get(letter, 1) == 1:
                sizes[letter] = d
    return sizes


def _product(operands: list[Expr], letters: list[list], out_letters: list, types: list[TensorType]) -> Expr:
    """The product of `operands`, operand i's axes named by letters[i]: equal letters are one index; the letters
    not in `out_letters` are summed over (an einsum, with size-1 axes broadcasting)."""
    sizes = _letter_sizes(letters, types)
    terms = []
    for combo in itertools.product(*operands):
        parent: dict[int, int] = {}

        def find(label: int) -> int:
            while parent.get(label, label) != label:
                label = parent[label]
            return label

        at: dict = {}
        for term, axes in zip(combo, letters):
            for label, letter in zip(term.out, axes):
                if label is None:
                    continue
                if letter in at:
                    first, second = find(at[letter]), find(label)
                    if first != second:
                        parent[second] = first
                else:
                    at[letter] = label
        coef = 1.0
        for term in combo:
            coef *= term.coef
        for letter, size in sizes.items():
            if letter not in out_letters and letter not in at and size != 1:
                if not isinstance(size, int):
                    raise _NotRead  # a sum over a broadcast axis of symbolic size
                coef *= size
        out = tuple(find(at[letter]) if letter in at else None for letter in out_letters)
        if len([label for label in out if label is not None]) != len({label for label in out if label is not None}):
            raise _NotRead  # two axes of one index: a diagonal, never the delta rule
        factors = tuple(Factor(f.atom, tuple(None if lab is None else find(lab) for lab in f.labels))
                        for term in combo for f in term.factors)
        terms.append(Term(coef, factors, out))
    return tuple(terms)


def _einsum(equation: str, operands: list[Expr], types: list[TensorType]) -> Expr:
    inputs, output = equation.split("->")
    letters = []
    widest = 0
    for term, t in zip(inputs.split(","), types):
        before, dots, after = term.partition("...")
        spread = t.rank - len(before) - len(after) if dots else 0
        widest = max(widest, spread)
        letters.append(list(before) + [("...", spread - i) for i in range(spread)] + list(after))
    before, dots, after = output.partition("...")
    out_letters = list(before) + ([("...", widest - i) for i in range(widest)] if dots else []) + list(after)
    return _product(operands, letters, out_letters, types)


def _matmul(operands: list[Expr], types: list[TensorType]) -> Expr:
    x, y = types
    batch = max(x.rank, y.rank) - 2

    def lead(t: TensorType) -> list:
        return [("b", batch - (t.rank - 2) + i) for i in range(t.rank - 2)]

    left = ["m"] if x.rank == 1 else lead(x) + ["n", "m"]
    right = ["m"] if y.rank == 1 else lead(y) + ["m", "p"]
    out = [("b", i) for i in range(max(batch, 0))] + (["n"] if x.rank > 1 else []) + (["p"] if y.rank > 1 else [])
    return _product(operands, [left, right], out, types)


def _sum_over(expr: Expr, axes: set[int], shape: tuple[Dim, ...], keepdim: bool) -> Expr:
    terms = []
    for t in expr:
        coef = t.coef
        for axis in axes:
            if t.out[axis] is None and shape[axis] != 1:
                if not isinstance(shape[axis], int):
                    raise _NotRead
                coef *= shape[axis]  # a term constant along the axis, summed
        out = tuple(None if i in axes else lab for i, lab in enumerate(t.out) if keepdim or i not in axes)
        terms.append(Term(coef, t.factors, out))
    return tuple(terms)


def _collect(expr: Expr) -> list[Term]:
    """Like terms added up (a term's form: its factors with the summed labels renamed in order), zeros dropped."""
    sums: dict[tuple, Term] = {}
    for t in expr:
        axis_of = {lab: i for i, lab in enumerate(t.out) if lab is not None}

        def shape(f: Factor) -> tuple:
            return repr(f.atom), tuple(("out", axis_of[lab]) if lab in axis_of else ("sum",) if lab is not None
                                       else None for lab in f.labels)

        summed: dict[int, int] = {}
        form = []
        for f in sorted(t.factors, key=shape):
            form.append((repr(f.atom), tuple(("out", axis_of[lab]) if lab in axis_of else None if lab is None
                                             else ("sum", summed.setdefault(lab, len(summed))) for lab in f.labels)))
        key = (tuple(form), tuple(lab is None for lab in t.out))
        if key in sums:
            sums[key] = Term(sums[key].coef + t.coef, sums[key].factors, sums[key].out)
        else:
            sums[key] = t
    return [t for t in sums.values() if t.coef != 0]


# ------------------------------------------------------------------ recognition
@dataclass(frozen=True)
class DeltaCell:
    """What a scan's cell was read as: the atom of each operand (alpha, beta None where absent)."""

    q: Hashable
    k: Hashable
    v: Hashable
    alpha: Hashable | None
    beta: Hashable | None
    steps: dict  # atom -> its type in one step


def recognise(a: ScanAttrs) -> DeltaCell | None:
    """The delta rule's operands where the scan's cell is the (gated) delta rule with the readout S_t q_t, else None."""
    body = a.body
    if a.kernel != "loop" or a.n_states != 1 or len(body.outputs) != 2 or a.roles.count("state") != 1:
        return None
    state_node = body.inputs[a.roles.index("state")][1]
    new_state, emitted = body.outputs[1][1], body.outputs[0][1]
    state_type = body.type_of((state_node, 0))
    if emitted[0] == new_state[0] or new_state[1] != 0 or state_type.rank < 2 or state_type.dtype != "float" \
            or 1 in state_type.shape[-2:]:
        return None
    atoms: dict[int, Hashable] = {state_node: STATE}
    for i, ((_, node), role) in enumerate(zip(body.inputs, a.roles)):
        if role == "seq":
            atoms[node] = ("seq", i)
    try:
        update = _Reader(body, atoms)
        terms = _collect(update.read(new_state))
        readout = _Reader(body, {**atoms, new_state[0]: NEW_STATE})
        emitted_terms = _collect(readout.read(emitted))
    except _NotRead:
        return None
    batch = state_type.rank - 2
    parts = _update_parts(terms, batch)
    q = _readout_operand(emitted_terms, batch)
    if parts is None or q is None:
        return None
    k, v, alpha, beta = parts
    steps = {**update.steps, **readout.steps}
    if any(steps[atom].dtype != "float" for atom in (q, k, v, alpha, beta) if atom is not None):
        return None
    return DeltaCell(q=q, k=k, v=v, alpha=alpha, beta=beta, steps=steps)


def _reads(f: Factor, out: tuple[Label, ...], batch: int):
    """How factor f lies against a value with axes `out` (the batch axes, then V and K): "row" (one number per
    row: α, β), ("V",) or ("K",) (a vector along that axis of the value), ("sum", label) (a vector along a summed
    index), "S" (the state, axis for axis) or ("S sum", label) (the state, its K axis summed); None otherwise."""
    labels = f.labels
    if len(labels) < batch or labels[:batch] != out[:batch]:
        return None
    rest = [lab for lab in labels[batch:] if lab is not None]
    if f.atom in (STATE, NEW_STATE):
        if labels[batch:] == out[batch:batch + 2]:
            return "S"
        if len(labels) == batch + 2 and labels[batch] == out[batch] and labels[batch + 1] not in out \
                and labels[batch + 1] is not None:
            return ("S sum", labels[batch + 1])
        return None
    if not rest:
        return "row"
    if len(rest) == 1:
        lab = rest[0]
        if lab not in out:
            return ("sum", lab)
        if len(out) == batch + 2:
            return ("V",) if lab == out[batch] else ("K",) if lab == out[batch + 1] else None
        return ("V",) if len(out) == batch + 1 and lab == out[batch] else None
    return None


def _update_parts(terms: list[Term], batch: int):
    """(k, v, α or None, β or None) where the new state is α S − α β (S k) kᵀ + β v kᵀ, else None."""
    decay = erase = write = None
    for t in terms:
        if len(t.out) != batch + 2 or None in t.out[batch:]:
            return None
        ways = [_reads(f, t.out, batch) for f in t.factors]
        if None in ways:
            return None
        states = [w for w in ways if w == "S" or isinstance(w, tuple) and w[0] == "S sum"]
        rows = Counter(f.atom for f, w in zip(t.factors, ways) if w == "row")
        vectors = [(w, f.atom) for f, w in zip(t.factors, ways) if w != "row" and w not in states]
        if states == ["S"] and not vectors and t.coef == 1 and decay is None:
            decay = rows
        elif len(states) == 1 and states[0] != "S" and t.coef == -1 and erase is None:
            summed = states[0][1]
            keys = dict(vectors)
            if len(vectors) != 2 or ("sum", summed) not in keys or ("K",) not in keys:
                return None
            erase = (rows, keys[("sum", summed)], keys[("K",)])
        elif not states and t.coef == 1 and write is None:
            keys = dict(vectors)
            if len(vectors) != 2 or set(keys) != {("V",), ("K",)}:
                return None
            write = (rows, keys[("K",)], keys[("V",)])
        else:
            return None
    if decay is None or erase is None or write is None:
        return None
    erase_rows, k_read, k_erased = erase
    write_rows, k, v = write
    if not (k_read == k_erased == k) or decay.total() > 1 or write_rows.total() > 1 \
            or erase_rows != decay + write_rows:
        return None
    alpha = next(iter(decay), None)
    beta = next(iter(write_rows), None)
    if any(atom[0] not in ("seq", "unary") for atom in (k, v, alpha, beta) if atom is not None):
        return None
    return k, v, alpha, beta


def _readout_operand(terms: list[Term], batch: int) -> Hashable | None:
    """q where the emitted value is the new state times q (over its K axis), else None."""
    if len(terms) != 1:
        return None
    (t,) = terms
    if t.coef != 1 or len(t.out) != batch + 1 or t.out[batch] is None or len(t.factors) != 2:
        return None
    ways = {f.atom: _reads(f, t.out, batch) for f in t.factors}
    state = ways.get(NEW_STATE)
    if not isinstance(state, tuple) or state[0] != "S sum" or len(ways) != 2:
        return None
    (q,) = (atom for atom in ways if atom != NEW_STATE)
    if ways[q] != ("sum", state[1]) or q[0] not in ("seq", "unary"):
        return None
    return q


# --------------------------------------------------------------- the new graph
_LAYOUT_OPS = ("heads", "unsqueeze", "squeeze", "permute", "reshape", "flip", "index")  # move values, compute nothing


class _Builder:
    """Adds the fused op's operands to the graph around the scan: each atom over all steps, [*, T, d] or [*, T]."""

    def __init__(self, out: Graph, data: dict, ins: list[Port], cell: DeltaCell):
        self.out, self.data, self.ins, self.cell = out, data, ins, cell
        a: ScanAttrs = data["attrs"]
        seq = [i for i, role in enumerate(a.roles) if role == "seq"]
        self.axis_of = dict(zip(seq, a.axes))
        self.batch = a.body.type_of(a.body.outputs[1][1]).rank - 2
        self.memo: dict[Hashable, Port] = {}

    def add(self, op: str, attrs, inputs: list[Port], what: str) -> Port:
        types = REGISTRY[op].infer(attrs, [self.out.type_of(p) for p in inputs])
        node = self.out.add(op, attrs, inputs, types, self.data["span"], f"{self.data['name']}_{what}")
        return (node, 0)

    def full(self, atom: Hashable) -> tuple[Port, int]:
        """The atom at every step (the scanned axis where the scan's sequences have it), and that axis."""
        if atom[0] == "seq":
            return self.ins[atom[1]], self.axis_of[atom[1]]
        _, fn, inner = atom
        port, axis = self.full(inner)
        if atom not in self.memo:  # element-wise: over all steps at once it is the same function
            self.memo[atom] = self.add("unary", UnaryAttrs(fn=fn), [port], fn)
        return self.memo[atom], axis

    def operand(self, atom: Hashable, what: str, full: tuple[Port, int] | None = None) -> Port:
        """The atom as the kernels take it, [*, T, d] for a vector and [*, T] for one number per row, from its
        value over all steps (`full`, else the atom's own)."""
        port, axis = full or self.full(atom)
        step = self.cell.steps[atom]
        inside = [i if i < axis else i + 1 for i in range(step.rank)]  # each step axis among the full tensor's
        vector = [i for i in range(self.batch, step.rank) if step.shape[i] != 1]
        ones = [i for i in range(self.batch, step.rank) if step.shape[i] == 1]
        order = [inside[i] for i in range(self.batch)] + [axis] + [inside[i] for i in vector + ones]
        if order != list(range(step.rank + 1)):
            port = self.add("permute", PermuteAttrs(dims=tuple(order)), [port], f"{what}_steps")
        for _ in ones:
            port = self.add("squeeze", AxisAttrs(dim=-1), [port], f"{what}_steps")
        if self.data["attrs"].reverse:
            port = self.add("flip", FlipAttrs(dim=self.batch), [port], f"{what}_reversed")
        return port

    def gate(self, atom: Hashable) -> tuple[Port, str]:
        """(log α as the kernels take it, "log") where α is the exp of a value, through ops that only move
        values (layout(exp(z)) = exp(layout(z))); else (α, "alpha")."""
        if atom[0] == "unary" and atom[1] == "exp":
            return self.operand(atom, "log_alpha", self.full(atom[2])), "log"
        port, axis = self.full(atom)
        chain = []
        while self.out.node(port[0])["op"] in _LAYOUT_OPS:
            chain.append(self.out.node(port[0]))
            port = self.out.node(port[0])["inputs"][0]
        source = self.out.node(port[0])
        if not (source["op"] == "unary" and source["attrs"].fn == "exp"):
            return self.operand(atom, "alpha"), "alpha"
        log = source["inputs"][0]
        for data in reversed(chain):
            log = self.add(data["op"], data["attrs"], [log], "log_alpha")
        return self.operand(atom, "log_alpha", (log, axis)), "log"


def _replace(out: Graph, data: dict, ins: list[Port], cell: DeltaCell) -> list[Port]:
    """Add the delta_rule_scan that computes the scan's results to `out`; its result ports, in the scan's order."""
    a: ScanAttrs = data["attrs"]
    build = _Builder(out, data, ins, cell)
    operands = [build.operand(cell.q, "q"), build.operand(cell.k, "k"), build.operand(cell.v, "v")]
    gate = "none"
    if cell.alpha is not None:
        port, gate = build.gate(cell.alpha)
        operands.append(port)
    if cell.beta is not None:
        operands.append(build.operand(cell.beta, "beta"))
    operands.append(ins[a.roles.index("state")])
    attrs = DeltaRuleScanAttrs(cell=a.cell, path=a.path, body=a.body, gate=gate, beta=cell.beta is not None)
    types = REGISTRY["delta_rule_scan"].infer(attrs, [out.type_of(p) for p in operands])
    fused = out.add("delta_rule_scan", attrs, operands, types, data["span"], data["name"], data["gate"])
    for key, value in data.items():
        if key not in ("op", "attrs", "inputs", "types", "span", "name", "gate"):
            out.node(fused)[key] = value  # e.g. the names of its results
    steps = (fused, 0)  # [*, T, V]
    batch = build.batch
    if a.last:
        steps = build.add("index", IndexAttrs(items=(("ellipsis",), ("int", -1), ("slice", None, None, None))),
                          [steps], "last")
    else:
        if a.reverse:
            steps = build.add("flip", FlipAttrs(dim=batch), [steps], "reversed")
        at = min(a.axes[0], batch + 1)  # where the scan stacks its steps
        if at != batch:
            order = list(range(batch)) + [batch + 1]
            order.insert(at, batch)
            steps = build.add("permute", PermuteAttrs(dims=tuple(order)), [steps], "steps")
    results = [steps, (fused, 1)]
    if [out.type_of(p) for p in results] != data["types"]:
        raise AssertionError(f"delta_rule_scan for {a.path} gives {[str(out.type_of(p)) for p in results]}, "
                             f"the scan {[str(t) for t in data['types']]}")
    return results
