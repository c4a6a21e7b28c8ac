"""The gate_chain op's program and its torch kernels: every kernel equals the chain's equations (float64, outputs and
gradients wrt every operand, broadcast ones included), derivative rules equal autograd on random programs, and the
cost rule's choices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gatedsl.errors import ShapeError
from gatedsl.ir.ops import REGISTRY, GateChainAttrs
from gatedsl.ir.types import Sym, TensorType
from gatedsl.kernels import registry
from gatedsl.kernels.gate_chain import reference, torch_fused
from gatedsl.kernels.gate_chain.program import Program, differentiate, fuse_algebra, text, validate
from gatedsl.kernels.registry import Context

# float64 throughout. The fused kernels compute the same expressions, some reassociated by the
# algebra ((1 - z) n + z h as lerp, a + b c as addcmul): a few ulps (1e-16 relative) apart.
# 1e-12 leaves a margin of 10^4 over that; a wrong rule or operand shows at 1e-3 or more.
TOL = {"rtol": 1e-12, "atol": 1e-12}
KERNELS = {"reference": reference.gate_chain, "torch": torch_fused.gate_chain, "autograd": torch_fused.recorded}


# ------------------------------------------------------------ programs from equations
class Traced:
    """A value of a program being recorded: the test's equations run on these build the program."""

    def __init__(self, rec: "Recorder", ref: int):
        self.rec, self.ref = rec, ref

    def _binary(self, fn, other, swap=False):
        other = other if isinstance(other, Traced) else Traced(self.rec, self.rec.emit("const", (), (other,)))
        a, b = (other, self) if swap else (self, other)
        return Traced(self.rec, self.rec.emit(fn, (a.ref, b.ref)))

    def __add__(self, o): return self._binary("add", o)
    def __radd__(self, o): return self._binary("add", o, swap=True)
    def __sub__(self, o): return self._binary("sub", o)
    def __rsub__(self, o): return self._binary("sub", o, swap=True)
    def __mul__(self, o): return self._binary("mul", o)
    def __rmul__(self, o): return self._binary("mul", o, swap=True)
    def __truediv__(self, o): return self._binary("div", o)
    def __rtruediv__(self, o): return self._binary("div", o, swap=True)
    def __pow__(self, o): return self._binary("pow", o)
    def __rpow__(self, o): return self._binary("pow", o, swap=True)
    def __neg__(self): return Traced(self.rec, self.rec.emit("neg", (self.ref,)))


class Recorder:
    def __init__(self, n_inputs: int):
        self.n_inputs, self.steps = n_inputs, []

    def emit(self, fn, args, consts=()):
        self.steps.append((fn, tuple(args), tuple(consts)))
        return self.n_inputs + len(self.steps) - 1


class TracedMath:
    """The math namespace for tracing: each function records one step."""

    def __getattr__(self, fn):
        def apply(*args, **consts):
            rec = args[0].rec
            if fn == "clamp":
                return Traced(rec, rec.emit("clamp", (args[0].ref,), (consts.get("min"), consts.get("max"))))
            return Traced(rec, rec.emit(fn, tuple(a.ref for a in args)))
        return apply


class TorchMath:
    """The same namespace on tensors: the independent formulation each kernel is checked against."""

    sigmoid, tanh, relu, exp, log, sqrt, rsqrt = torch.sigmoid, torch.tanh, torch.relu, torch.exp, torch.log, \
        torch.sqrt, torch.rsqrt
    abs, sin, cos, square, reciprocal, sign, erf = torch.abs, torch.sin, torch.cos, torch.square, \
        torch.reciprocal, torch.sign, torch.erf
    gelu, silu, softplus, logsigmoid, elu = F.gelu, F.silu, F.softplus, F.logsigmoid, F.elu
    maximum, minimum, where = torch.maximum, torch.minimum, torch.where

    @staticmethod
    def clamp(x, min=None, max=None):
        return torch.clamp(x, min, max)


def trace(equations, n_inputs: int) -> Program:
    rec = Recorder(n_inputs)
    outs = equations(TracedMath(), *[Traced(rec, i) for i in range(n_inputs)])
    outs = outs if isinstance(outs, tuple) else (outs,)
    return Program(n_inputs, tuple(rec.steps), tuple(o.ref for o in outs))


class Config:
    """What the backend passes a kernel: an object with the program and its text."""

    def __init__(self, program: Program):
        self.program, self.text = program, text(program)


B, H = 3, 5
FULL, ROW, SCALAR, COLUMN = (B, H), (H,), (), (B, 1)
# (name, equations (math, *inputs) -> outputs, input shapes, kinds of value each input needs)
CASES = [
    ("gru update", lambda m, z_pre, n, h: ((1 - m.sigmoid(z_pre)) * n + m.sigmoid(z_pre) * h, m.sigmoid(z_pre)),
     [FULL, FULL, FULL]),
    ("lstm cell and hidden",
     lambda m, i, f, g, o, c: (m.sigmoid(o) * m.tanh(m.sigmoid(f) * c + m.sigmoid(i) * m.tanh(g)),
                               m.sigmoid(f) * c + m.sigmoid(i) * m.tanh(g)),
     [FULL] * 5),
    ("swiglu", lambda m, a, b: m.silu(a) * b, [FULL, FULL]),
    ("x times its sigmoid", lambda m, a, b: a * m.sigmoid(a) * b, [FULL, FULL]),
    ("geglu", lambda m, a, b: m.gelu(a) * b, [FULL, FULL]),
    ("highway with a broadcast bias", lambda m, t, bias, h, x: m.sigmoid(t + bias) * h + (1 - m.sigmoid(t + bias)) * x,
     [FULL, ROW, FULL, FULL]),
    ("scalar and column operands", lambda m, x, s, col: m.tanh(x * s - col) * 0.5 + col / 2, [FULL, SCALAR, COLUMN]),
    ("softplus, logsigmoid, elu, relu", lambda m, x, y: m.softplus(x) - m.logsigmoid(y) * m.elu(x) + m.relu(y),
     [FULL, FULL]),
    ("exp, log, sqrt, rsqrt of positives",
     lambda m, x, y: m.log(m.exp(x) + 1) * m.sqrt(m.sigmoid(y)) + m.rsqrt(m.softplus(x) + 0.5), [FULL, FULL]),
    ("abs, sign, erf, sin, cos, square, reciprocal, neg",
     lambda m, x, y: m.abs(x) * m.sign(y) + m.erf(x) - m.sin(y) * m.cos(x) + m.square(y) + m.reciprocal(
         m.exp(x) + 1) + (-y), [FULL, FULL]),
    ("division both ways", lambda m, x, y: x / (m.softplus(y) + 1) + 2 / (m.exp(x) + 1), [FULL, ROW]),
    ("powers with a constant exponent or base", lambda m, x, y: x ** 3 + 2.0 ** y + m.sigmoid(x) ** 0.5, [FULL, FULL]),
    ("clamp", lambda m, x, y: m.clamp(x, min=-0.5, max=0.5) + m.clamp(y, min=0.1) * m.clamp(x, max=0.2),
     [FULL, FULL]),
    ("maximum and minimum, ties included", lambda m, x, y: m.maximum(x, y) * m.minimum(y, x) + m.maximum(x, x),
     [FULL, ROW]),
]


def _inputs(shapes, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def _outputs_and_grads(fn, xs, seed: int):
    outs = fn(*xs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    gen = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, xs, allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_kernel_equals_the_equations(case, kernel):
    name, equations, shapes = case
    program = trace(equations, len(shapes))
    assert validate(program, ("float",) * len(shapes)) is None
    config = Config(program)
    xs = _inputs(shapes, seed=len(name))
    expected, expected_grads = _outputs_and_grads(lambda *t: equations(TorchMath, *t), xs, seed=7)
    got, grads = _outputs_and_grads(lambda *t: KERNELS[kernel](config, *t), xs, seed=7)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)
    for x, a, b in zip(xs, grads, expected_grads):
        assert a.shape == x.shape  # a broadcast operand's gradient is summed to its shape
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kernel", ["torch", "autograd"])
def test_fused_kernels_without_gradients_run_in_place_and_leave_operands_alone(kernel):
    program = trace(CASES[1][1], 5)  # the LSTM: tanh_, sigmoid_, addcmul_ ... on the chain's own buffers
    config = Config(program)
    xs = [x.detach() for x in _inputs([FULL] * 5, seed=3)]
    before = [x.clone() for x in xs]
    with torch.no_grad():
        got = KERNELS[kernel](config, *xs)
    expected = CASES[1][1](TorchMath, *xs)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, **TOL)
    for x, b in zip(xs, before):
        assert torch.equal(x, b)
    plan = torch_fused.plan_for(config, xs)
    assert "_(" in plan.infer.source  # in place: a step writes into a buffer the chain no longer needs


def test_the_fused_form_has_fewer_ops():
    gru = fuse_algebra(trace(CASES[0][1], 3), ("float",) * 3)
    assert [fn for fn, _, _ in gru.steps] == ["sigmoid", "lerp"]
    swish = fuse_algebra(trace(CASES[3][1], 2), ("float",) * 2)
    assert [fn for fn, _, _ in swish.steps] == ["silu", "mul"]
    lstm = fuse_algebra(trace(CASES[1][1], 5), ("float",) * 5)
    assert "addcmul" in [fn for fn, _, _ in lstm.steps]
    # A product read twice stays: only what the rewrite removes may be dropped.
    kept = fuse_algebra(trace(lambda m, a, b, c: (a + b * c, b * c), 3), ("float",) * 3)
    assert "mul" in [fn for fn, _, _ in kept.steps]
    # torch.lerp takes tensors at both ends: (1 - z) 0.5 + z h keeps its products.
    half = fuse_algebra(trace(lambda m, z, h: (1 - z) * 0.5 + z * h, 2), ("float",) * 2)
    assert "lerp" not in [fn for fn, _, _ in half.steps] and validate(half, ("float",) * 2) is None


def test_torch_kernel_gives_second_derivatives():
    config = Config(trace(CASES[0][1], 3))

    def second(fn):
        xs = _inputs([FULL] * 3, seed=5)
        out = fn(*xs)[0]
        (g,) = torch.autograd.grad(out.sum(), xs[0], create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), xs[0])
        return g.detach(), gg

    expected = second(lambda *t: CASES[0][1](TorchMath, *t))
    for a, b in zip(second(lambda *t: torch_fused.gate_chain(config, *t)), expected):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kernel", ["torch", "autograd", "reference"])
def test_mixed_dtypes_non_contiguous_and_expanded_operands(kernel):
    program = trace(CASES[5][1], 4)  # highway: t, bias, h, x
    config = Config(program)
    gen = torch.Generator().manual_seed(11)
    t = torch.randn(H, B, dtype=torch.float64, generator=gen).t().requires_grad_()  # transposed
    bias = torch.randn(H, dtype=torch.float32, generator=gen).requires_grad_()  # float32 among float64
    h = torch.randn(1, H, dtype=torch.float64, generator=gen).expand(B, H).requires_grad_()  # expanded
    x = torch.randn(B, H, dtype=torch.float64, generator=gen).requires_grad_()
    xs = [t, bias, h, x]
    expected, expected_grads = _outputs_and_grads(lambda *v: CASES[5][1](TorchMath, *v), xs, seed=2)
    got, grads = _outputs_and_grads(lambda *v: KERNELS[kernel](config, *v), xs, seed=2)
    torch.testing.assert_close(got[0], expected[0], **TOL)
    for x_, a, b in zip(xs, grads, expected_grads):
        assert a.dtype == x_.dtype and a.shape == x_.shape
        # bias is float32: its gradient is rounded to float32 (1e-7 relative)
        torch.testing.assert_close(a, b, **(TOL if x_.dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}))


def test_where_takes_a_bool_condition_without_a_gradient():
    program = Program(3, (("where", (0, 1, 2), ()), ("tanh", (3,), ())), (4,))
    assert validate(program, ("bool", "float", "float")) is None
    config = Config(program)
    gen = torch.Generator().manual_seed(0)
    cond = torch.rand(B, H, generator=gen) > 0.5
    a, b = _inputs([FULL, ROW], seed=1)
    for kernel in KERNELS.values():
        out = kernel(config, cond, a, b)
        torch.testing.assert_close(out, torch.tanh(torch.where(cond, a, b)), **TOL)
        ga, gb = torch.autograd.grad(out.sum(), (a, b))
        ea, eb = torch.autograd.grad(torch.tanh(torch.where(cond, a, b)).sum(), (a, b))
        torch.testing.assert_close(ga, ea, **TOL)
        torch.testing.assert_close(gb, eb, **TOL)


# ------------------------------------------------------------ derivative rules on random programs
_UNARY_SAFE = ("sigmoid", "tanh", "relu", "gelu", "silu", "softplus", "logsigmoid", "exp", "abs", "neg", "sin", "cos",
               "elu", "square", "sign", "erf")
_NEEDS_POSITIVE = ("log", "sqrt", "rsqrt", "reciprocal")
_SHAPES = [FULL, ROW, SCALAR, COLUMN]


@st.composite
def programs(draw):
    """A random well-formed program: full-shape first input, others that broadcast, a bool condition, and every fn."""
    n_float = draw(st.integers(2, 4))
    shapes = [FULL] + [draw(st.sampled_from(_SHAPES)) for _ in range(n_float - 1)]
    with_cond = draw(st.booleans())
    kinds = ["float"] * n_float + (["bool"] if with_cond else [])
    shapes += [FULL] if with_cond else []
    n = len(kinds)
    steps: list = []
    floats = list(range(n_float))  # values a float operand can be

    def emit(fn, args, consts=()):
        steps.append((fn, tuple(args), tuple(consts)))
        return n + len(steps) - 1

    def positive(v):  # log, sqrt, ... read softplus(v) + 0.5
        return emit("add", (emit("softplus", (v,)), emit("const", (), (0.5,))))

    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["unary", "positive", "binary", "scalar", "clamp", "pow", "where", "lerp",
                                     "addcmul"]))
        a, b, c = (draw(st.sampled_from(floats)) for _ in range(3))
        if kind == "unary":
            v = emit(draw(st.sampled_from(_UNARY_SAFE)), (a,))
        elif kind == "positive":
            v = emit(draw(st.sampled_from(_NEEDS_POSITIVE)), (positive(a),))
        elif kind == "binary":
            fn = draw(st.sampled_from(["add", "sub", "mul", "div", "maximum", "minimum"]))
            v = emit(fn, (a, positive(b) if fn == "div" else b))
        elif kind == "scalar":
            fn = draw(st.sampled_from(["add", "sub", "mul", "div"]))
            const = emit("const", (), (draw(st.sampled_from([1, 0.5, -2.0, 3])),))
            v = emit(fn, (const, positive(a)) if fn == "div" else draw(st.sampled_from([(const, a), (a, const)])))
        elif kind == "clamp":
            v = emit("clamp", (a,), draw(st.sampled_from([(-0.5, 0.5), (0.0, None), (None, 0.3)])))
        elif kind == "pow":
            if draw(st.booleans()):
                exponent = draw(st.sampled_from([2, 3, -1, 0.5, 1.5]))
                base = a if exponent in (2, 3) else positive(a)  # a negative or fractional power of a positive
                v = emit("pow", (base, emit("const", (), (exponent,))))
            else:
                v = emit("pow", (emit("const", (), (draw(st.sampled_from([2.0, 0.5])),)), a))
        elif kind == "where":
            if not with_cond:
                continue
            v = emit("where", (n - 1, a, b))
        elif kind == "lerp":
            v = emit("lerp", (a, b, emit("sigmoid", (c,))))
        else:
            v = emit("addcmul", (a, b, c), (draw(st.sampled_from([1, -1, 0.5])),))
        floats.append(v)
    # Outputs have the chain's full shape: the last value plus input 0, and maybe one more.
    last = emit("add", (floats[-1], 0))
    outputs = [last]
    if draw(st.booleans()) and len(floats) > n_float:
        outputs.insert(0, emit("mul", (draw(st.sampled_from(floats[n_float:])), 0)))
    return Program(n, tuple(steps), tuple(outputs)), tuple(kinds), shapes


def _random_inputs(kinds, shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(s, generator=gen) > 0.5) if k == "bool" else
            torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_() for k, s in zip(kinds, shapes)]


def _check_derivative(program, kinds, shapes, recompute: bool, given_mask):
    assert validate(program, kinds) is None, text(program)
    xs = _random_inputs(kinds, shapes, seed=len(program.steps))
    outs = reference.evaluate(program, xs)
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    floats = [x for x, k in zip(xs, kinds) if k == "float"]
    loss = sum((o * w).sum() for o, w, g in zip(outs, weights, given_mask) if g)
    expected = torch.autograd.grad(loss, floats, allow_unused=True)
    wanted = tuple(k == "float" for k in kinds)
    d = differentiate(program, kinds, given_mask, wanted, recompute=recompute)
    assert validate(d.program, kinds + ("float",) * (len(d.saved) + sum(given_mask))) is None, text(d.program)
    with torch.no_grad():
        values = reference.evaluate(Program(program.n_inputs, program.steps, d.saved), xs) if d.saved else []
        results = reference.evaluate(d.program, [x.detach() for x in xs] + values +
                                     [w for w, g in zip(weights, given_mask) if g])
    got = iter(expected)
    for i, kind in enumerate(kinds):
        if kind != "float":
            assert d.grads[i] is None
            continue
        want = next(got)
        if d.grads[i] is None:
            assert want is None or not want.any(), (i, text(program))
            continue
        g = results[d.grads[i]]
        g = g.sum_to_size(xs[i].shape) if g.shape != xs[i].shape else g
        torch.testing.assert_close(g, torch.zeros_like(xs[i]) if want is None else want, equal_nan=True, **TOL,
                                   msg=lambda m: f"input {i} of {text(program)}: {m}")


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(programs(), st.booleans(), st.data())
def test_derivative_rules_equal_autograd_on_random_programs(drawn, recompute, data):
    program, kinds, shapes = drawn
    given_mask = tuple(data.draw(st.lists(st.booleans(), min_size=len(program.outputs),
                                          max_size=len(program.outputs)).filter(any)))
    _check_derivative(program, kinds, shapes, recompute, given_mask)


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(programs())
def test_the_algebra_and_the_fused_kernels_keep_random_programs_exact(drawn):
    program, kinds, shapes = drawn
    fused = fuse_algebra(program, kinds)
    assert validate(fused, kinds) is None
    xs = _random_inputs(kinds, shapes, seed=1)
    floats = [x for x, k in zip(xs, kinds) if k == "float"]
    expected, expected_grads = _outputs_and_grads(lambda *t: reference.evaluate(program, xs), floats, seed=4)
    for fn in (lambda: reference.evaluate(fused, xs), lambda: torch_fused.gate_chain(Config(program), *xs),
               lambda: torch_fused.recorded(Config(program), *xs)):
        got, grads = _outputs_and_grads(lambda *t: fn(), floats, seed=4)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, equal_nan=True, **TOL)  # exp of exp may overflow: alike
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, equal_nan=True, **TOL)


# ------------------------------------------------------------ the IR op
def test_malformed_programs_are_refused():
    assert "unknown fn" in validate(Program(1, (("frobnicate", (0,), ()),), (1,)), ("float",))
    assert "takes 2 operands" in validate(Program(1, (("add", (0,), ()),), (1,)), ("float",))
    assert "earlier value" in validate(Program(1, (("tanh", (2,), ()),), (1,)), ("float",))
    assert "must be bool" in validate(Program(2, (("where", (0, 0, 1), ()),), (2,)), ("float", "float"))
    assert "constant" in validate(Program(1, (("const", (), (1.0,)), ("tanh", (1,), ())), (2,)), ("float",))
    assert "pow needs a constant" in validate(Program(2, (("pow", (0, 1), ()),), (2,)), ("float", "float"))
    assert "base > 0" in validate(Program(1, (("const", (), (-2.0,)), ("pow", (1, 0), ())), (2,)), ("float",))
    assert "clamp needs a bound" in validate(Program(1, (("clamp", (0,), (None, None)),), (1,)), ("float",))
    assert "not a float value" in validate(Program(1, (("gt", (0, 0), ()),), (1,)), ("float",))


def test_the_ir_op_types_its_outputs_and_refuses_what_it_cannot_run():
    b = Sym.named("B")
    attrs = GateChainAttrs(n_inputs=2, steps=(("sigmoid", (0,), ()), ("mul", (2, 1), ())), outputs=(3, 2))
    infer = REGISTRY["gate_chain"].infer
    assert infer(attrs, [TensorType((b, 4)), TensorType((4,))]) == [TensorType((b, 4)), TensorType((b, 4))]
    with pytest.raises(ShapeError, match="smaller"):  # sigmoid of the [4] operand is not of the chain's shape
        infer(attrs, [TensorType((4,)), TensorType((b, 4))])
    with pytest.raises(ShapeError, match="int"):
        infer(attrs, [TensorType((b, 4), "int"), TensorType((4,))])
    with pytest.raises(ShapeError, match="broadcast"):
        infer(attrs, [TensorType((b, 4)), TensorType((3,))])
    with pytest.raises(ShapeError, match="malformed"):
        infer(GateChainAttrs(n_inputs=1, steps=(("nope", (0,), ()),), outputs=(1,)), [TensorType((4,))])
    assert "v2 = sigmoid(x0); v3 = mul(v2, x1) -> v3, v2" in attrs.text


# ------------------------------------------------------------ kernel choice
def _ctx(device="cpu", dtype="float32", training=True, elements=8192, ops=6, fused=3, backward=8):
    return Context(device, dtype, training, (("elements", elements), ("ops", ops), ("fused_ops", fused),
                                             ("backward_ops", backward)))


def test_the_cpu_never_picks_triton_and_cuda_picks_it_where_it_computes():
    for training in (True, False):
        for dtype in ("float32", "float64"):
            choice = registry.choose("gate_chain", _ctx("cpu", dtype, training))
            assert choice.kernel != "triton"
            assert any(c.kernel == "triton" and not c.applies and "CUDA" in c.why for c in choice.candidates)
        assert registry.choose("gate_chain", _ctx("cuda", "float32", training)).kernel == "triton"
        assert registry.choose("gate_chain", _ctx("cuda", "bfloat16", training)).kernel == "triton"
        assert registry.choose("gate_chain", _ctx("cuda", "float64", training)).kernel != "triton"


def test_the_cost_rule_follows_the_measurements():
    # An RNN step's chain (B=32, H=256): recorded ops in training (a Python autograd node costs more than it saves),
    # the in-place fused form in inference.
    assert registry.choose("gate_chain", _ctx(training=True)).kernel == "autograd"
    assert registry.choose("gate_chain", _ctx(training=False)).kernel == "torch"
    # Nothing to fuse away (sigmoid and a product): the chain as written.
    assert registry.choose("gate_chain", _ctx(training=False, ops=3, fused=3)).kernel == "reference"
    # SwiGLU's product over 2048 x 2816: in place, one node.
    big = dict(elements=2048 * 2816, ops=2, fused=2, backward=3)
    assert registry.choose("gate_chain", _ctx(training=True, **big)).kernel == "torch"
    assert registry.choose("gate_chain", _ctx(training=False, **big)).kernel == "torch"
    # A size known only per call is costed at a nominal size and chosen again for each call's tensors.
    assert registry.choose("gate_chain", _ctx(elements=None)).kernel in ("torch", "autograd")


def test_dispatch_runs_the_kernel_chosen_for_each_call():
    program = trace(CASES[0][1], 3)
    attrs = GateChainAttrs(n_inputs=program.n_inputs, steps=program.steps, outputs=program.outputs)
    xs = _inputs([FULL] * 3, seed=9)
    expected = CASES[0][1](TorchMath, *xs)
    got = registry.dispatch("gate_chain", attrs, attrs.text, *xs)
    with torch.no_grad():
        inferred = registry.dispatch("gate_chain", attrs, attrs.text, *xs)
    for a, b, c in zip(got, inferred, expected):
        torch.testing.assert_close(a, c, **TOL)
        torch.testing.assert_close(b, c, **TOL)
    sizes = registry.fused_ops()["gate_chain"].sizes(attrs, [(B, H)] * 3)
    # As written: σ three times, 1 - z, two products, a sum; fused: σ once and a lerp.
    assert dict(sizes)["elements"] == B * H and dict(sizes)["ops"] == 7 and dict(sizes)["fused_ops"] == 2
