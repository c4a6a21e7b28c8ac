"""A gate chain as a small program: element-wise steps over the op's inputs, its derivative program, and its algebra (torch-free).

A program has `n_inputs` inputs and `steps` in topological order; value i < n_inputs is input i,
value n_inputs + k is step k's result. A step is (fn, operand values, constants): constants are
a `const` step's number, a `clamp`'s bounds or an `addcmul`'s factor. Every kernel evaluates
this one representation: the reference with plain torch ops, torch_fused as generated Python,
triton as a generated Triton kernel.

Derivatives come from one table of per-fn rules (`RULES`), each writing its operands' gradients
as further steps of the same language, so the same generators turn the derivative program into
torch code and into a Triton backward kernel.

Shapes: operands broadcast as in torch. Every output must have the broadcast shape of all the
inputs (the pass fuses values of the chain's shape only): gradients then flow at that shape
and are summed to each input's own shape at the end.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

Step = tuple  # (fn: str, args: tuple[int, ...], consts: tuple)


class Program(NamedTuple):
    n_inputs: int
    steps: tuple[Step, ...]
    outputs: tuple[int, ...]


class Fn(NamedTuple):
    arity: int
    result: str  # "float" or "bool"
    operands: str = "float"  # the kind of every operand; "where" and "and" say per position below


UNARY = ("sigmoid", "tanh", "relu", "gelu", "silu", "softplus", "logsigmoid", "exp", "log", "sqrt", "rsqrt",
         "abs", "neg", "sin", "cos", "elu", "square", "reciprocal", "sign", "erf")
BINARY = ("add", "sub", "mul", "div", "maximum", "minimum", "pow")
COMPARISONS = ("gt", "ge", "lt", "le", "eq")
# Derivative helpers: (upstream gradient, the op's result or its operand) -> the operand's gradient.
GRADS = ("sigmoid_grad", "tanh_grad", "relu_grad", "silu_grad", "gelu_grad", "softplus_grad", "elu_grad",
         "logsigmoid_grad")

FNS: dict[str, Fn] = {
    "const": Fn(0, "float"),
    "clamp": Fn(1, "float"),
    "where": Fn(3, "float"),
    "lerp": Fn(3, "float"),  # lerp(a, b, w) = a + w (b - a) = (1 - w) a + w b
    "addcmul": Fn(3, "float"),  # addcmul(a, b, c; v) = a + v b c
    "and": Fn(2, "bool", "bool"),
    **{f: Fn(1, "float") for f in UNARY},
    **{f: Fn(2, "float") for f in BINARY},
    **{f: Fn(2, "bool") for f in COMPARISONS},
    **{f: Fn(2, "float") for f in GRADS},
}


# The operand positions that may hold a constant (a Python number) rather than a tensor: where
# torch's own ops take a number there.
CONST_OPERANDS: dict[str, tuple[int, ...]] = {
    **{f: (0, 1) for f in ("add", "sub", "mul", "div", "pow", *COMPARISONS)},
    "where": (1, 2),
    "lerp": (2,),
}


def operand_kind(fn: str, position: int) -> str:
    if fn == "where" and position == 0:
        return "bool"
    return FNS[fn].operands


# ------------------------------------------------------------------ reading
def value_kinds(p: Program, input_kinds: tuple[str, ...]) -> list[str]:
    """Each value's kind: "float" or "bool" (a tensor), or "const" (a Python number)."""
    kinds = list(input_kinds)
    for fn, _, _ in p.steps:
        kinds.append("const" if fn == "const" else FNS[fn].result)
    return kinds


def validate(p: Program, input_kinds: tuple[str, ...]) -> str | None:
    """Why `p` is malformed for inputs of these kinds, or None."""
    if len(input_kinds) != p.n_inputs:
        return f"{p.n_inputs} inputs declared, {len(input_kinds)} given"
    kinds = list(input_kinds)
    for k, step in enumerate(p.steps):
        if len(step) != 3:
            return f"step {k} is not (fn, args, consts)"
        fn, args, consts = step
        if fn not in FNS:
            return f"step {k}: unknown fn {fn!r}"
        if len(args) != FNS[fn].arity:
            return f"step {k}: {fn} takes {FNS[fn].arity} operands, got {len(args)}"
        expected_consts = {"const": 1, "clamp": 2, "addcmul": 1}.get(fn, 0)
        if len(consts) != expected_consts:
            return f"step {k}: {fn} takes {expected_consts} constants, got {len(consts)}"
        for i, a in enumerate(args):
            if not 0 <= a < len(kinds):
                return f"step {k}: operand {a} is not an earlier value"
            want, got = operand_kind(fn, i), kinds[a]
            if got == "const" and i not in CONST_OPERANDS.get(fn, ()):
                return f"step {k}: {fn} operand {i} must be a tensor, got a constant"
            if got != want and got != "const":
                return f"step {k}: {fn} operand {i} must be {want}, got {got}"
        if fn == "pow" and kinds[args[0]] != "const" and kinds[args[1]] != "const":
            return f"step {k}: pow needs a constant base or exponent"
        if fn == "pow" and kinds[args[0]] == "const" and not consts_of(p, args[0]) > 0:
            return f"step {k}: pow of a constant base needs the base > 0"
        if any(not isinstance(c, (int, float)) for c in consts if not (fn == "clamp" and c is None)):
            return f"step {k}: {fn} constants must be numbers, got {consts}"
        if fn == "clamp" and consts[0] is None and consts[1] is None:
            return f"step {k}: clamp needs a bound"
        if fn != "const" and args and all(kinds[a] == "const" for a in args):
            return f"step {k}: {fn} of constants only"
        kinds.append("const" if fn == "const" else FNS[fn].result)
    if not p.outputs:
        return "no outputs"
    for o in p.outputs:
        if not 0 <= o < len(kinds) or kinds[o] != "float":
            return f"output {o} is not a float value"
    return None


def consts_of(p: Program, ref: int):
    """The number a const value holds."""
    return p.steps[ref - p.n_inputs][2][0]


def name(p: Program, ref: int) -> str:
    return f"x{ref}" if ref < p.n_inputs else f"v{ref}"


def text(p: Program) -> str:
    """The program as one line, e.g. `v2 = add(x0, x1); v3 = sigmoid(v2) -> v3`: its kernel-cache key."""
    parts = []
    for k, (fn, args, consts) in enumerate(p.steps):
        ref = p.n_inputs + k
        if fn == "const":
            parts.append(f"v{ref} = {consts[0]!r}")
            continue
        operands = [name(p, a) for a in args] + [repr(c) for c in consts]
        parts.append(f"v{ref} = {fn}({', '.join(operands)})")
    return f"({p.n_inputs} inputs) " + "; ".join(parts) + " -> " + ", ".join(name(p, o) for o in p.outputs)


def uses(p: Program) -> list[int]:
    """How many times each value is read (by steps and as an output)."""
    count = [0] * (p.n_inputs + len(p.steps))
    for _, args, _ in p.steps:
        for a in args:
            count[a] += 1
    for o in p.outputs:
        count[o] += 1
    return count


def shapes(p: Program, input_shapes: list, broadcast: Callable) -> list:
    """Each value's shape; a const is (); `broadcast(a, b)` joins two shapes (None where they do not)."""
    out = list(input_shapes)
    for fn, args, _ in p.steps:
        shape = ()
        for a in args:
            shape = broadcast(shape, out[a])
            if shape is None:
                return out + [None]
        out.append(shape)
    return out


# ----------------------------------------------------------------- building
class Builder:
    """Appends steps with common-subexpression sharing; the derivative rules and the algebra write through it."""

    def __init__(self, n_inputs: int, input_kinds: tuple[str, ...]):
        self.n_inputs = n_inputs
        self.steps: list[Step] = []
        self.kinds = list(input_kinds)
        self._memo: dict[tuple, int] = {}

    def emit(self, fn: str, args: tuple[int, ...] = (), consts: tuple = ()) -> int:
        # Keyed by the constants' types too: 1 and 1.0 are equal in Python but not the same torch scalar.
        key = (fn, args, consts, tuple(type(c).__name__ for c in consts))
        ref = self._memo.get(key)
        if ref is None:
            ref = self._memo[key] = self.n_inputs + len(self.steps)
            self.steps.append((fn, tuple(args), tuple(consts)))
            self.kinds.append("const" if fn == "const" else FNS[fn].result)
        return ref

    def const(self, value) -> int:
        return self.emit("const", (), (value,))

    def value_of(self, ref: int):
        """The number a const value holds, or None for a tensor."""
        if ref >= self.n_inputs and self.kinds[ref] == "const":
            return self.steps[ref - self.n_inputs][2][0]
        return None

    # Arithmetic that folds the trivial cases the rules produce (a gradient of None is zero).
    def add(self, a: int | None, b: int | None) -> int | None:
        if a is None:
            return b
        if b is None:
            return a
        return self.emit("add", (a, b))

    def mul(self, a: int, b: int) -> int:
        if self.value_of(b) == 1:
            return a
        if self.value_of(a) == 1:
            return b
        return self.emit("mul", (a, b))

    def scale(self, a: int, factor: float) -> int:
        return self.mul(a, self.const(factor))

    def neg(self, a: int) -> int:
        if a >= self.n_inputs and self.steps[a - self.n_inputs][0] == "neg":
            return self.steps[a - self.n_inputs][1][0]
        return self.emit("neg", (a,))

    def where(self, cond: int, a: int, b: int) -> int:
        return self.emit("where", (cond, a, b))

    def program(self, outputs) -> Program:
        return prune(Program(self.n_inputs, tuple(self.steps), tuple(outputs)))


def prune(p: Program) -> Program:
    """`p` without the steps no output depends on, renumbered."""
    live = set(p.outputs)
    for k in range(len(p.steps) - 1, -1, -1):
        if p.n_inputs + k in live:
            live.update(p.steps[k][1])
    new_ref = {i: i for i in range(p.n_inputs)}
    steps = []
    for k, (fn, args, consts) in enumerate(p.steps):
        if p.n_inputs + k in live:
            new_ref[p.n_inputs + k] = p.n_inputs + len(steps)
            steps.append((fn, tuple(new_ref[a] for a in args), consts))
    return Program(p.n_inputs, tuple(steps), tuple(new_ref[o] for o in p.outputs))


# -------------------------------------------------------------- derivatives
# Each rule: (builder, operands, constants, result, upstream gradient) -> one gradient per operand
# (None where it has none: a constant, a condition, a piecewise-constant function). The formulas
# are torch's own (tools/autograd/derivatives.yaml), so gradients match autograd to rounding.
Rule = Callable[[Builder, tuple, tuple, int, int], tuple]


def _unary_rule(helper: str, reads: str) -> Rule:
    """A derivative torch computes with one fused helper of (gradient, the result y | the operand x)."""
    return lambda b, args, consts, y, g: (b.emit(helper, (g, y if reads == "y" else args[0])),)


def _pow_rule(b: Builder, args, consts, y, g):
    base, exponent = args
    if b.value_of(exponent) is not None:  # x ** s: s x^(s-1), zero for s == 0
        s = b.value_of(exponent)
        if s == 0:
            return None, None
        return b.mul(g, b.scale(b.emit("pow", (base, b.const(s - 1))), s)), None
    return None, b.mul(g, b.scale(y, math.log(b.value_of(base))))  # c ** x: c^x log c


def _extremum_rule(drop_self: str, drop_other: str) -> Rule:
    """maximum/minimum: the gradient goes to the larger (smaller) operand, half to each on a tie."""

    def rule(b, args, consts, y, g):
        a, c = args
        half = b.where(b.emit("eq", (a, c)), b.scale(g, 0.5), g)
        zero = b.const(0.0)
        return (b.where(b.emit(drop_self, (a, c)), zero, half),
                b.where(b.emit(drop_other, (a, c)), zero, half))

    return rule


def _clamp_rule(b: Builder, args, consts, y, g):
    (x,) = args
    low, high = consts
    inside = None
    for fn, bound in (("ge", low), ("le", high)):
        if bound is not None:
            test = b.emit(fn, (x, b.const(bound)))
            inside = test if inside is None else b.emit("and", (inside, test))
    return (b.where(inside, g, b.const(0.0)),)


def _div_rule(b: Builder, args, consts, y, g):
    a, c = args
    return b.emit("div", (g, c)), b.emit("div", (b.mul(b.neg(g), a), b.mul(c, c)))


def _lerp_rule(b: Builder, args, consts, y, g):
    a, end, w = args
    return (b.mul(g, b.emit("sub", (b.const(1), w))), b.mul(g, w), b.mul(g, b.emit("sub", (end, a))))


def _addcmul_rule(b: Builder, args, consts, y, g):
    a, c1, c2 = args
    (v,) = consts
    scaled = b.scale(g, v) if v != 1 else g
    return g, b.mul(scaled, c2), b.mul(scaled, c1)


RULES: dict[str, Rule] = {
    "sigmoid": _unary_rule("sigmoid_grad", "y"),
    "tanh": _unary_rule("tanh_grad", "y"),
    "relu": _unary_rule("relu_grad", "y"),
    "gelu": _unary_rule("gelu_grad", "x"),
    "silu": _unary_rule("silu_grad", "x"),
    "softplus": _unary_rule("softplus_grad", "x"),
    "elu": _unary_rule("elu_grad", "x"),
    "logsigmoid": _unary_rule("logsigmoid_grad", "x"),
    "exp": lambda b, args, consts, y, g: (b.mul(g, y),),
    "log": lambda b, args, consts, y, g: (b.emit("div", (g, args[0])),),
    "sqrt": lambda b, args, consts, y, g: (b.emit("div", (g, b.scale(y, 2))),),
    "rsqrt": lambda b, args, consts, y, g: (b.mul(b.scale(g, -0.5), b.emit("pow", (y, b.const(3)))),),
    "abs": lambda b, args, consts, y, g: (b.mul(g, b.emit("sign", (args[0],))),),
    "neg": lambda b, args, consts, y, g: (b.neg(g),),
    "sin": lambda b, args, consts, y, g: (b.mul(g, b.emit("cos", args)),),
    "cos": lambda b, args, consts, y, g: (b.mul(g, b.neg(b.emit("sin", args))),),
    "square": lambda b, args, consts, y, g: (b.mul(g, b.scale(args[0], 2)),),
    "reciprocal": lambda b, args, consts, y, g: (b.mul(b.neg(g), b.mul(y, y)),),
    "sign": lambda b, args, consts, y, g: (None,),
    "erf": lambda b, args, consts, y, g: (
        b.mul(g, b.scale(b.emit("exp", (b.neg(b.emit("square", args)),)), 2 / math.sqrt(math.pi))),),
    "add": lambda b, args, consts, y, g: (g, g),
    "sub": lambda b, args, consts, y, g: (g, b.neg(g)),
    "mul": lambda b, args, consts, y, g: (b.mul(g, args[1]), b.mul(g, args[0])),
    "div": _div_rule,
    "pow": _pow_rule,
    "maximum": _extremum_rule("lt", "gt"),
    "minimum": _extremum_rule("gt", "lt"),
    "clamp": _clamp_rule,
    "where": lambda b, args, consts, y, g: (None, b.where(args[0], g, b.const(0.0)),
                                             b.where(args[0], b.const(0.0), g)),
    "lerp": _lerp_rule,
    "addcmul": _addcmul_rule,
}


class Derivative(NamedTuple):
    """A backward program and how its inputs and outputs line up with the forward's.

    Inputs: the forward's inputs, then the `saved` forward values, then one gradient per
    forward output flagged in `out_grads`. Outputs: the gradient of each forward input that
    has one; `grads[i]` is its index among the outputs, None for no gradient (zero)."""

    program: Program
    saved: tuple[int, ...]
    grads: tuple[int | None, ...]


def differentiate(p: Program, input_kinds: tuple[str, ...], out_grads: tuple[bool, ...],
                  wanted: tuple[bool, ...], recompute: bool) -> Derivative:
    """The program computing the gradients of the `wanted` inputs from those of the outputs flagged in `out_grads`.

    recompute: the backward recomputes the forward values it needs from the inputs (saved is
    empty), else it reads each forward value a gradient formula uses from `saved`."""
    n = p.n_inputs
    n_grads = sum(out_grads)
    b = Builder(n + n_grads, tuple(input_kinds) + ("float",) * n_grads)
    forward = {i: i for i in range(n)}
    for k, (fn, args, consts) in enumerate(p.steps):
        forward[n + k] = b.emit(fn, tuple(forward[a] for a in args), consts)
    first, end = n + n_grads, n + n_grads + len(b.steps)  # the forward steps' values in the builder
    adjoint: dict[int, int] = {}
    grad_inputs = iter(range(n, n + n_grads))
    for o, flagged in zip(p.outputs, out_grads):
        if flagged:
            ref = forward[o]
            adjoint[ref] = b.add(adjoint.get(ref), next(grad_inputs))
    for ref in range(end - 1, first - 1, -1):  # reverse topological order
        g = adjoint.get(ref)
        fn, args, consts = b.steps[ref - b.n_inputs]
        if g is None or fn == "const":
            continue
        for arg, grad in zip(args, RULES[fn](b, args, consts, ref, g)):
            if grad is not None and b.kinds[arg] == "float":
                adjoint[arg] = b.add(adjoint.get(arg), grad)
    outputs, grads = [], []
    for i in range(n):
        if wanted[i] and adjoint.get(i) is not None:
            grads.append(len(outputs))
            outputs.append(adjoint[i])
        else:
            grads.append(None)
    if recompute:
        return Derivative(b.program(outputs), (), tuple(grads))
    return _read_saved(b, outputs, forward, n, n_grads, range(first, end), tuple(grads))


def _read_saved(b: Builder, outputs: list[int], forward: dict[int, int], n: int, n_grads: int,
                forward_refs: range, grads: tuple) -> Derivative:
    """The backward program of builder `b` reading, as inputs, the forward values its gradient steps use."""
    live = set(outputs)
    for k in range(len(b.steps) - 1, -1, -1):
        if b.n_inputs + k in live:
            live.update(b.steps[k][1])

    def is_forward(ref: int) -> bool:
        return ref in forward_refs and b.kinds[ref] != "const"

    needed = {o for o in outputs if is_forward(o)}
    for k, (fn, args, _) in enumerate(b.steps):
        ref = b.n_inputs + k
        if ref in live and not is_forward(ref):
            needed.update(a for a in args if is_forward(a))
    saved_refs = sorted(needed)
    to_forward = {bref: fref for fref, bref in forward.items()}
    saved = tuple(to_forward[r] for r in saved_refs)
    n_saved = len(saved)
    rebuilt = Builder(n + n_saved + n_grads, tuple(b.kinds[:n]) + ("float",) * (n_saved + n_grads))
    remap = {i: i for i in range(n)}
    remap.update({n + j: n + n_saved + j for j in range(n_grads)})
    remap.update({r: n + j for j, r in enumerate(saved_refs)})
    for k, (fn, args, consts) in enumerate(b.steps):
        ref = b.n_inputs + k
        if ref in live and ref not in remap and not is_forward(ref):
            remap[ref] = rebuilt.emit(fn, tuple(remap[a] for a in args), consts)
    return Derivative(rebuilt.program([remap[o] for o in outputs]), saved, grads)


# -------------------------------------------------------------------- algebra
def deduplicate(p: Program, input_kinds: tuple[str, ...]) -> Program:
    """`p` with each repeated step computed once."""
    b = Builder(p.n_inputs, input_kinds)
    new = {i: i for i in range(p.n_inputs)}
    for k, (fn, args, consts) in enumerate(p.steps):
        new[p.n_inputs + k] = b.emit(fn, tuple(new[a] for a in args), consts)
    return b.program([new[o] for o in p.outputs])


def fuse_algebra(p: Program, input_kinds: tuple[str, ...]) -> Program:
    """The same function in fewer torch ops: (1 − z)·a + z·b → lerp(a, b, z), x·σ(x) → silu(x), a ± b·c → addcmul.

    Rewrites apply where the intermediate values they remove are read nowhere else. Repeated
    steps (σ(x) written twice) are computed once first."""
    p = deduplicate(p, input_kinds)
    b = Builder(p.n_inputs, input_kinds)
    new = {i: i for i in range(p.n_inputs)}
    count = uses(p)
    step = {p.n_inputs + k: s for k, s in enumerate(p.steps)}

    def single(ref: int, fn: str) -> bool:
        return ref in step and step[ref][0] == fn and count[ref] == 1

    def one_minus(ref: int) -> int | None:
        """z where ref is 1 − z."""
        if ref in step and step[ref][0] == "sub":
            one, z = step[ref][1]
            if one in step and step[one][0] == "const" and step[one][2][0] == 1:
                return z
        return None

    def lerp(first: int, second: int) -> tuple[int, int, int] | None:
        """(a, b, z) where first·… + second·… is (1 − z)·a + z·b."""
        if not (single(first, "mul") and single(second, "mul")):
            return None
        for u, a in (step[first][1], step[first][1][::-1]):
            z = one_minus(u)
            if z is None:
                continue
            for w, end in (step[second][1], step[second][1][::-1]):
                if w == z and b.kinds[new[a]] != "const" and b.kinds[new[end]] != "const":  # torch.lerp's ends
                    return a, end, z
        return None

    def rewrite(fn: str, args: tuple[int, ...]) -> tuple[str, tuple[int, ...], tuple] | None:
        if fn == "add":
            found = lerp(*args) or lerp(*args[::-1])
            if found is not None:
                return "lerp", found, ()
        if fn == "mul":
            for x, s in (args, args[::-1]):
                if single(s, "sigmoid") and step[s][1][0] == x:
                    return "silu", (x,), ()
        if fn in ("add", "sub"):
            # a + b·c, b·c + a, a − b·c; not where a factor is a constant (a scaled tensor, no product).
            for base, product in (args, args[::-1]) if fn == "add" else (args,):
                if single(product, "mul") and b.kinds[new[base]] != "const" and \
                        all(b.kinds[new[f]] != "const" for f in step[product][1]):
                    return "addcmul", (base, *step[product][1]), (1 if fn == "add" else -1,)
        return None

    for k, (fn, args, consts) in enumerate(p.steps):
        fn, args, consts = rewrite(fn, args) or (fn, args, consts)
        new[p.n_inputs + k] = b.emit(fn, tuple(new[a] for a in args), consts)
    return b.program([new[o] for o in p.outputs])
