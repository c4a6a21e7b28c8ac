"""Every primitive of the language against an independent plain-PyTorch formulation.

Each test writes a tiny model spec using one primitive, compiles it with `gatedsl.compile`,
converts it to float64 and compares its outputs, and the gradients of a random cotangent
with respect to every float input and every learned tensor, with a reference written
directly against torch (using the compiled module's learned tensors, fetched by name).
The statically inferred output shapes (`gatedsl.check(spec)`) are checked against the
runtime shapes, and the static dtypes against the runtime dtypes.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F

import gatedsl
import gatedsl.api
from gatedsl import SpecError

DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------ helpers
def model(body: str, *inputs: str, params: str = "", prelude: str = "") -> str:
    """A one-model spec: `input` declarations, then the body's statements."""
    lines = [prelude, f"model Spec({params}) {{"]
    lines += [f"  input {decl}" for decl in inputs]
    lines += ["  " + line.strip() for line in body.strip().splitlines()]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=_gen(seed), dtype=DT) * scale


def positive(*shape, seed=0):
    """Floats in [0.5, 2): safe for log, sqrt, reciprocal."""
    return torch.rand(shape, generator=_gen(seed), dtype=DT) * 1.5 + 0.5


def ints(*shape, high=5, low=0, seed=0):
    return torch.randint(low, high, shape, generator=_gen(seed))


def bools(*shape, seed=0):
    return torch.rand(shape, generator=_gen(seed)) > 0.5


def P(gm, name):
    return gm.get_parameter(name)


def compile_double(spec, params=None, *, randomize=True, seed=0):
    torch.manual_seed(seed)
    gm = gatedsl.compile(spec, params).double()
    if randomize:  # norms start at ones/zeros: random values make the comparison meaningful
        g = _gen(seed + 1)
        with torch.no_grad():
            for p in gm.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * 0.5)
    return gm


def _tuple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)


def _bind_dims(rep, xs) -> dict[str, int]:
    dims: dict[str, int] = {}
    for (name, shape), x in zip(rep.inputs.items(), xs):
        assert len(shape) == x.dim(), f"input {name}: static {shape}, given {tuple(x.shape)}"
        for d, actual in zip(shape, x.shape):
            if isinstance(d, int):
                assert d == actual, f"input {name}: static {shape}, given {tuple(x.shape)}"
            elif re.fullmatch(r"[A-Za-z_]\w*", d):
                assert dims.setdefault(d, actual) == actual, f"{d} bound to {dims[d]} and {actual}"
    return dims


def resolve(shape, dims) -> list[int]:
    out = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(math.prod(int(f) if f.isdigit() else dims[f] for f in d.split("*")))
    return out


_KIND = {"float": lambda t: t.is_floating_point(), "int": lambda t: t.dtype == torch.int64,
         "bool": lambda t: t.dtype == torch.bool}


def check_static(spec, params, xs, got):
    """Static output shapes and dtypes (gatedsl.check) against the runtime ones."""
    rep = gatedsl.check(spec, params)
    graph = gatedsl.api.analyse(spec, params).graph
    dims = _bind_dims(rep, xs)
    assert len(rep.outputs) == len(got)
    for (name, shape), (_, port), y in zip(rep.outputs.items(), graph.outputs, got):
        assert resolve(shape, dims) == list(y.shape), f"output {name}: static {shape}, runtime {tuple(y.shape)}"
        assert rep.shapes[name] == shape
        kind = graph.type_of(port).dtype
        assert _KIND[kind](y), f"output {name}: static dtype {kind}, runtime {y.dtype}"
    return rep


def compare_grads(gm, xs, got, want, seed=123, atol=1e-10, rtol=1e-10):
    """Gradients of <cotangent, output> w.r.t. every float input and learned tensor agree."""
    pairs = [(g, w) for g, w in zip(got, want) if g.is_floating_point()]
    for g, w in pairs:
        assert g.requires_grad == w.requires_grad, "one side is cut off from autograd"
    pairs = [(g, w) for g, w in pairs if g.requires_grad]
    wrt = [x for x in xs if x.requires_grad] + list(gm.parameters())
    if not pairs or not wrt:
        return
    gen = _gen(seed)
    cots = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g, _ in pairs]
    gg = torch.autograd.grad([g for g, _ in pairs], wrt, cots, allow_unused=True, retain_graph=True)
    gw = torch.autograd.grad([w for _, w in pairs], wrt, [c.to(w.dtype) for c, (_, w) in zip(cots, pairs)],
                             allow_unused=True, retain_graph=True)
    for t, a, b in zip(wrt, gg, gw):
        a = torch.zeros_like(t) if a is None else a
        b = torch.zeros_like(t) if b is None else b
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def check(spec, inputs, ref, params=None, *, atol=1e-10, rtol=1e-10, randomize=True, grad=True, seed=0):
    """Compile `spec` in float64 and compare outputs, static shapes and gradients with `ref(gm, *inputs)`."""
    gm = compile_double(spec, params, randomize=randomize, seed=seed)
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    got = _tuple(gm(*xs))
    want = _tuple(ref(gm, *xs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=True)
    rep = check_static(spec, params, xs, got)
    assert rep.params == sum(p.numel() for p in gm.parameters())
    if grad:
        compare_grads(gm, xs, got, want, atol=atol, rtol=rtol)
    return gm


def param_names(gm) -> set[str]:
    return {n for n, _ in gm.named_parameters()}


SIZES = [(2, 3, 4), (3, 5, 2)]


# ------------------------------------------------------------------ linear
@pytest.mark.parametrize("B,T,D,E", [(2, 3, 4, 5), (1, 6, 3, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(B, T, D, E, bias):
    spec = model(f"output y = linear(x, {E}, bias={str(bias).lower()})", f"x: [B, T, {D}]")

    def ref(gm, x):
        out = (x.unsqueeze(-2) * P(gm, "y.x_proj.weight")).sum(-1)
        return out + P(gm, "y.x_proj.bias") if bias else out

    gm = check(spec, [randn(B, T, D)], ref)
    expected = {"y.x_proj.weight"} | ({"y.x_proj.bias"} if bias else set())
    assert param_names(gm) == expected
    assert P(gm, "y.x_proj.weight").shape == (E, D)


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 4, 5)])
def test_linear_any_rank_and_roles(shape):
    # The role is the first argument's name, or `proj`; a second projection of x gets x_proj_1.
    spec = model("y = linear(x, 3) + linear(x, 3, bias=false) + linear(x * 2, 3)\noutput y",
                 f"x: [{', '.join(map(str, shape))}]")

    def ref(gm, x):
        lin = lambda v, w, b=None: v @ w.T + (0 if b is None else b)  # noqa: E731
        return (lin(x, P(gm, "y.x_proj.weight"), P(gm, "y.x_proj.bias")) + lin(x, P(gm, "y.x_proj_1.weight"))
                + lin(x * 2, P(gm, "y.proj.weight"), P(gm, "y.proj.bias")))

    gm = check(spec, [randn(*shape)], ref)
    assert param_names(gm) == {"y.x_proj.weight", "y.x_proj.bias", "y.x_proj_1.weight", "y.proj.weight",
                               "y.proj.bias"}


# ------------------------------------------------------------ matmul, einsum
MATMUL_CASES = [
    ("a @ b", ["a: [B, T, 4]", "b: [B, 4, S]"], [(2, 3, 4), (2, 4, 5)], lambda a, b: torch.einsum("btd,bds->bts", a, b)),
    ("matmul(a, b)", ["a: [B, T, 4]", "b: [4, 6]"], [(2, 3, 4), (4, 6)], lambda a, b: (a.unsqueeze(-1) * b).sum(-2)),
    ("a @ b", ["a: [4]", "b: [4, 3]"], [(4,), (4, 3)], lambda a, b: (a.unsqueeze(-1) * b).sum(0)),
    ("a @ b", ["a: [3, 4]", "b: [4]"], [(3, 4), (4,)], lambda a, b: (a * b).sum(-1)),
    ("a @ b", ["a: [4]", "b: [4]"], [(4,), (4,)], lambda a, b: (a * b).sum()),
    ("a @ b", ["a: [B, 1, T, 4]", "b: [H, 4, S]"], [(2, 1, 3, 4), (5, 4, 2)],
     lambda a, b: (a.unsqueeze(-1) * b.unsqueeze(0).unsqueeze(2)).sum(-2)),
    ("a @ b", ["a: [B, 4]", "b: [C, 4, 2]"], [(3, 4), (2, 4, 2)], lambda a, b: torch.einsum("bd,cde->cbe", a, b)),
]


@pytest.mark.parametrize("expr,decls,shapes,ref", MATMUL_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(MATMUL_CASES)])
def test_matmul(expr, decls, shapes, ref):
    inputs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    check(model(f"output y = {expr}", *decls), inputs, lambda gm, *xs: ref(*xs))


def test_matmul_with_learned():
    spec = model("w = learned([4, 6])\noutput y = x @ w", "x: [B, T, 4]")
    check(spec, [randn(2, 3, 4)], lambda gm, x: (x.unsqueeze(-1) * P(gm, "w")).sum(-2))


EINSUM_CASES = [
    ("btd,de->bte", ["a: [B, T, 4]", "b: [4, 3]"], [(2, 3, 4), (4, 3)],
     lambda a, b: (a.unsqueeze(-1) * b).sum(-2)),
    ("bhtd,bhsd->bhts", ["a: [B, H, T, 4]", "b: [B, H, S, 4]"], [(2, 3, 5, 4), (2, 3, 6, 4)],
     lambda a, b: (a.unsqueeze(-2) * b.unsqueeze(-3)).sum(-1)),
    ("ij,ij->i", ["a: [N, 4]", "b: [N, 4]"], [(3, 4), (3, 4)], lambda a, b: (a * b).sum(-1)),
    ("i,j->ij", ["a: [N]", "b: [M]"], [(3,), (5,)], lambda a, b: a.unsqueeze(1) * b.unsqueeze(0)),
    ("bij->bji", ["a: [B, N, M]"], [(2, 3, 4)], lambda a: a.transpose(1, 2)),
    ("bij->b", ["a: [B, N, M]"], [(2, 3, 4)], lambda a: a.sum((1, 2))),
    ("...d,ed->...e", ["a: [B, T, 4]", "b: [3, 4]"], [(2, 5, 4), (3, 4)], lambda a, b: (a.unsqueeze(-2) * b).sum(-1)),
    ("bd,...d->...b", ["a: [B, 4]", "b: [N, M, 4]"], [(2, 4), (3, 5, 4)],
     lambda a, b: (b.unsqueeze(-2) * a).sum(-1)),
]


@pytest.mark.parametrize("eq,decls,shapes,ref", EINSUM_CASES, ids=[c[0] for c in EINSUM_CASES])
def test_einsum(eq, decls, shapes, ref):
    inputs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    args = ", ".join(d.split(":")[0] for d in decls)
    check(model(f'output y = einsum("{eq}", {args})', *decls), inputs, lambda gm, *xs: ref(*xs))


def test_einsum_errors():
    with pytest.raises(SpecError, match="letters"):
        gatedsl.check(model('output y = einsum("btd->bt", x)', "x: [B, 4]"))
    with pytest.raises(SpecError, match="output letter"):
        gatedsl.check(model('output y = einsum("bd->bz", x)', "x: [B, 4]"))
    with pytest.raises(SpecError, match="'d'"):
        gatedsl.check(model('output y = einsum("bd,bd->b", x, z)', "x: [B, 4]", "z: [B, 3]"))


# ------------------------------------------------------------ element-wise
UNARY = {
    "sigmoid": (randn, lambda x: 1 / (1 + torch.exp(-x))),
    "tanh": (randn, lambda x: (torch.exp(2 * x) - 1) / (torch.exp(2 * x) + 1)),
    "relu": (randn, lambda x: torch.where(x > 0, x, torch.zeros_like(x))),
    "gelu": (randn, lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))),
    "silu": (randn, lambda x: x / (1 + torch.exp(-x))),
    "softplus": (randn, lambda x: torch.log(1 + torch.exp(x))),
    "logsigmoid": (randn, lambda x: -torch.log(1 + torch.exp(-x))),
    "exp": (randn, lambda x: math.e ** x),
    "log": (positive, lambda x: torch.log2(x) * math.log(2)),
    "sqrt": (positive, lambda x: x ** 0.5),
    "rsqrt": (positive, lambda x: x ** -0.5),
    "abs": (randn, lambda x: torch.where(x < 0, -x, x)),
    "sin": (randn, lambda x: torch.cos(x - math.pi / 2)),
    "cos": (randn, lambda x: torch.sin(x + math.pi / 2)),
    "elu": (randn, lambda x: torch.where(x > 0, x, torch.exp(x) - 1)),
    "square": (randn, lambda x: x * x),
    "reciprocal": (positive, lambda x: 1 / x),
    "sign": (randn, lambda x: (x > 0).to(x.dtype) - (x < 0).to(x.dtype) + 0 * x),  # zero gradient
    "erf": (randn, lambda x: torch.sign(x) * torch.special.gammainc(torch.full_like(x, 0.5), x * x)),
}


def test_every_unary_fn_is_covered():
    from gatedsl.ir.ops import UNARY_FNS

    assert set(UNARY_FNS) - {"neg", "not"} == set(UNARY)


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("fn", sorted(UNARY))
def test_unary(fn, shape):
    make, ref = UNARY[fn]
    check(model(f"output y = {fn}(x)", "x: [B, T, C]"), [make(*shape)], lambda gm, x: ref(x), atol=1e-12,
          rtol=1e-9)


def test_unary_gates_and_static_values():
    spec = model("gate z = sigmoid(x)\noutput y = z * exp(0.0) + sqrt(4)", "x: [B, 3]")
    check(spec, [randn(2, 3)], lambda gm, x: torch.sigmoid(x) * 1.0 + 2.0)
    assert [g.kind for g in gatedsl.check(spec).gates] == ["sigmoid"]


@pytest.mark.parametrize("fn", ["abs", "sign", "square"])
def test_unary_on_ints_keeps_int(fn):
    ref = {"abs": torch.abs, "sign": torch.sign, "square": lambda i: i * i}[fn]
    check(model(f"output y = {fn}(i)", "i: int[B, 4]"), [ints(3, 4, low=-4)], lambda gm, i: ref(i))


def test_neg_and_not():
    spec = model("output y = -x\noutput z = not (x > 0)\noutput w = -i", "x: [B, 3]", "i: int[B]")
    check(spec, [randn(4, 3), ints(4, low=-3)], lambda gm, x, i: (0 - x, x <= 0, 0 - i))


# ---------------------------------------------------------------- operators
X2 = ["x: [B, T, 4]", "y: [B, T, 4]"]
OPERATOR_CASES = [
    # (expression, declarations, input makers, reference)
    ("x + y", X2, [randn, randn], lambda x, y: x + y),
    ("x - y", X2, [randn, randn], lambda x, y: x + (-1) * y),
    ("x * y", X2, [randn, randn], lambda x, y: torch.mul(x, y)),
    ("x / y", X2, [randn, positive], lambda x, y: x * y.reciprocal()),
    ("x ** y", X2, [positive, randn], lambda x, y: torch.exp(y * torch.log(x))),
    ("x % y", X2, [randn, positive], lambda x, y: x - torch.floor(x / y) * y),
    ("x // y", X2, [randn, positive], lambda x, y: torch.floor(x / y)),
    ("x + b", ["x: [B, T, 4]", "b: [4]"], [randn, randn], lambda x, b: x + b.expand(x.shape)),
    ("x * b", ["x: [B, T, 4]", "b: [B, 1, 4]"], [randn, randn], lambda x, b: x * b.expand(x.shape)),
    ("x + 2", X2[:1], [randn], lambda x: x + 2),
    ("2 + x", X2[:1], [randn], lambda x: x + 2),
    ("x - 1.5", X2[:1], [randn], lambda x: x + (-1.5)),
    ("1.5 - x", X2[:1], [randn], lambda x: -x + 1.5),
    ("x * 3", X2[:1], [randn], lambda x: x + x + x),
    ("0.5 * x", X2[:1], [randn], lambda x: x / 2),
    ("x / 4", X2[:1], [randn], lambda x: x * 0.25),
    ("2 / x", X2[:1], [positive], lambda x: 2 * x.reciprocal()),
    ("x ** 2", X2[:1], [randn], lambda x: x * x),
    ("x ** 0.5", X2[:1], [positive], lambda x: torch.sqrt(x)),
    ("2 ** x", X2[:1], [randn], lambda x: torch.exp(x * math.log(2))),
    ("x % 0.7", X2[:1], [randn], lambda x: x - torch.floor(x / 0.7) * 0.7),
    ("0.7 % x", X2[:1], [positive], lambda x: 0.7 - torch.floor(0.7 / x) * x),
    ("x // 0.5", X2[:1], [randn], lambda x: torch.floor(x / 0.5)),
    ("3 // x", X2[:1], [positive], lambda x: torch.floor(3 / x)),
    ("-x + x * x - x / 2", X2[:1], [randn], lambda x: x * x - 1.5 * x),
    # comparisons and logic
    ("x < y", X2, [randn, randn], lambda x, y: (y - x) > 0),
    ("x <= y", X2, [randn, randn], lambda x, y: ~(x > y)),
    ("x > y", X2, [randn, randn], lambda x, y: (x - y) > 0),
    ("x >= y", X2, [randn, randn], lambda x, y: ~(x < y)),
    ("x == x", X2[:1], [randn], lambda x: torch.ones_like(x, dtype=torch.bool)),
    ("x != x", X2[:1], [randn], lambda x: torch.zeros_like(x, dtype=torch.bool)),
    ("x > 0.5", X2[:1], [randn], lambda x: (x - 0.5) > 0),
    ("0.5 < x", X2[:1], [randn], lambda x: (x - 0.5) > 0),
    ("0 >= x", X2[:1], [randn], lambda x: x <= 0),
    ("i == j", ["i: int[B, 4]", "j: int[B, 4]"], [ints, ints], lambda i, j: (i - j) == 0),
    ("i != 2", ["i: int[B, 4]"], [ints], lambda i: (i - 2) != 0),
    ("(x > 0) and (y > 0)", X2, [randn, randn], lambda x, y: (x > 0) & (y > 0)),
    ("(x > 0) or (y > 0)", X2, [randn, randn], lambda x, y: (x > 0) | (y > 0)),
    ("not (x > 0) or y > 1", X2, [randn, randn], lambda x, y: (x <= 0) | (y > 1)),
    # integer arithmetic
    ("i + j", ["i: int[B, 4]", "j: int[B, 4]"], [ints, ints], lambda i, j: torch.add(i, j)),
    ("i * 3 - 1", ["i: int[B, 4]"], [ints], lambda i: i + i + i - 1),
    ("i // 2", ["i: int[B, 4]"], [lambda *s, seed: ints(*s, low=-9, high=9, seed=seed)],
     lambda i: torch.div(i, 2, rounding_mode="floor")),
    ("i % 3", ["i: int[B, 4]"], [lambda *s, seed: ints(*s, low=-9, high=9, seed=seed)],
     lambda i: i - torch.div(i, 3, rounding_mode="floor") * 3),
    ("i ** 2", ["i: int[B, 4]"], [ints], lambda i: i * i),
    ("i * 0.5", ["i: int[B, 4]"], [ints], lambda i: i.to(torch.get_default_dtype()) / 2),
    ("x * i", ["x: [B, 4]", "i: int[B, 4]"], [randn, ints], lambda x, i: x * i.to(DT)),
    ("to_int(b) + to_int(b)", ["b: bool[B, 4]"], [bools], lambda b: b.long() * 2),
]


def _shape_for(decl: str, sizes: dict[str, int]) -> tuple[int, ...]:
    dims = decl.split("[", 1)[1].rstrip("]").split(",")
    return tuple(int(d) if d.strip().isdigit() else sizes[d.strip()] for d in dims)


def _run_expr(expr, decls, makers, ref, sizes, **kw):
    inputs = [make(*_shape_for(d, sizes), seed=k) for k, (d, make) in enumerate(zip(decls, makers))]
    return check(model(f"output out = {expr}", *decls), inputs, lambda gm, *xs: ref(*xs), **kw)


@pytest.mark.parametrize("sizes", [{"B": 2, "T": 3}, {"B": 1, "T": 4}], ids=["2x3", "1x4"])
@pytest.mark.parametrize("expr,decls,makers,ref", OPERATOR_CASES, ids=[c[0] for c in OPERATOR_CASES])
def test_operators(expr, decls, makers, ref, sizes):
    _run_expr(expr, decls, makers, ref, sizes, atol=1e-12, rtol=1e-9)


MINMAX_CASES = [
    ("maximum(x, y)", X2, [randn, randn], lambda x, y: torch.where(x > y, x, y)),
    ("minimum(x, y)", X2, [randn, randn], lambda x, y: torch.where(x < y, x, y)),
    ("maximum(x, b)", ["x: [B, T, 4]", "b: [4]"], [randn, randn], lambda x, b: torch.where(x > b, x, b.expand(x.shape))),
    ("maximum(x, 0.25)", X2[:1], [randn], lambda x: torch.where(x > 0.25, x, torch.full_like(x, 0.25))),
    ("maximum(0.25, x)", X2[:1], [randn], lambda x: torch.where(x > 0.25, x, torch.full_like(x, 0.25))),
    ("minimum(x, 0)", X2[:1], [randn], lambda x: torch.where(x < 0, x, torch.zeros_like(x))),
    ("minimum(-0.5, x)", X2[:1], [randn], lambda x: torch.where(x < -0.5, x, torch.full_like(x, -0.5))),
    ("maximum(i, j)", ["i: int[B, 4]", "j: int[B, 4]"], [ints, ints], lambda i, j: torch.where(i > j, i, j)),
    ("minimum(i, 2)", ["i: int[B, 4]"], [ints], lambda i: torch.where(i < 2, i, torch.full_like(i, 2))),
    ("maximum(i, 0.5) + 0 * x", ["i: int[B, 4]", "x: [B, 4]"], [ints, randn],
     lambda i, x: torch.where(i > 0.5, i.to(DT), torch.full_like(x, 0.5)) + 0 * x),
]


@pytest.mark.parametrize("expr,decls,makers,ref", MINMAX_CASES, ids=[c[0] for c in MINMAX_CASES])
def test_maximum_minimum(expr, decls, makers, ref):
    _run_expr(expr, decls, makers, ref, {"B": 3, "T": 2})


@pytest.mark.parametrize("expr,message", [
    ("m + m", "bool"),
    ("m * m", "bool"),
    ("1 - m", "to_int"),
    ("x - m", "to_int"),
    ("-m", "negate"),
    ("abs(m)", "bool"),
    ("i // 0", "by zero"),
    ("i % 0", "by zero"),
    ("i ** -1", "negative"),
    ("clamp(x, 1, 0)", "above max"),
    ("avg_pool1d(i, 2)", "float"),
    ("max_pool1d(i, 2)", "float"),
    ("mean(i)", "float"),
    ("sigmoid(i)", "float"),
    ("linear(i, 2)", "float"),
])
def test_dtype_errors_are_static(expr, message):
    """What torch would refuse at run time (or compute in another dtype) is refused by `check`."""
    with pytest.raises(SpecError, match=message):
        gatedsl.check(model(f"output y = {expr}", "x: [B, 4, 2]", "i: int[B, 4, 2]", "m: bool[B, 4, 2]"))


def test_bool_arithmetic_after_conversion():
    spec = model("output a = to_int(m) + to_int(m)\noutput b = 1 - to_float(m) * x\noutput c = m * 2\n"
                 "output d = sign(m)\noutput e = maximum(m, n)", "x: [B, 3]", "m: bool[B, 3]", "n: bool[B, 3]")
    check(spec, [randn(2, 3), bools(2, 3), bools(2, 3, seed=1)], lambda gm, x, m, n: (
        m.long() * 2, 1 - m.to(DT) * x, m.long() * 2, m.clone(), m | n))


def test_maximum_of_static_numbers():
    spec = model("output y = x * maximum(2, 3) + minimum(1.5, -1)", "x: [B]")
    check(spec, [randn(3)], lambda gm, x: x * 3 - 1)


WHERE_CASES = [
    ("where(x > 0, x, y)", X2, [randn, randn], lambda x, y: x * (x > 0) + y * (x <= 0)),
    ("where(x > 0, x, 0)", X2[:1], [randn], lambda x: x * (x > 0)),
    ("where(x > 0, 1, x)", X2[:1], [randn], lambda x: (x > 0) + x * (x <= 0)),
    ("where(x > 0, 1.5, -2)", X2[:1], [randn], lambda x: 1.5 * (x > 0).to(DT) - 2 * (x <= 0).to(DT)),
    ("where(m, x, b)", ["m: bool[B, 1, 4]", "x: [B, T, 4]", "b: [4]"], [bools, randn, randn],
     lambda m, x, b: x * m + b * ~m),
    ("where(m, i, 0)", ["m: bool[B, T]", "i: int[B, T]"], [bools, ints], lambda m, i: i * m),
    ("where(m, 2, i)", ["m: bool[B, T]", "i: int[B, T]"], [bools, ints], lambda m, i: 2 * m + i * ~m),
    ("where(m, 1, 0)", ["m: bool[B, T]"], [bools], lambda m: m.long()),
    ("where(m, 1, 0.5) * x", ["m: bool[B, T]", "x: [B, T]"], [bools, randn], lambda m, x: (0.5 + 0.5 * m) * x),
    ("where(m, i, 0.5)", ["m: bool[B, T]", "i: int[B, T]"], [bools, ints],
     lambda m, i: torch.where(m, i.to(torch.get_default_dtype()), 0.5)),
]


@pytest.mark.parametrize("expr,decls,makers,ref", WHERE_CASES, ids=[c[0] for c in WHERE_CASES])
def test_where(expr, decls, makers, ref):
    _run_expr(expr, decls, makers, ref, {"B": 2, "T": 3})


def test_where_needs_bool_condition():
    with pytest.raises(SpecError, match="bool condition"):
        gatedsl.check(model("output y = where(x, x, 0)", "x: [B]"))


CLAMP_CASES = [
    ("clamp(x, min=-0.5)", X2[:1], [randn], lambda x: torch.where(x < -0.5, torch.full_like(x, -0.5), x)),
    ("clamp(x, max=0.5)", X2[:1], [randn], lambda x: torch.where(x > 0.5, torch.full_like(x, 0.5), x)),
    ("clamp(x, -0.5, 0.5)", X2[:1], [randn],
     lambda x: torch.where(x > 0.5, torch.full_like(x, 0.5), torch.where(x < -0.5, torch.full_like(x, -0.5), x))),
    ("clamp(i, 1, 3)", ["i: int[B, 4]"], [ints], lambda i: torch.minimum(torch.maximum(i, torch.tensor(1)), torch.tensor(3))),
]


@pytest.mark.parametrize("expr,decls,makers,ref", CLAMP_CASES, ids=[c[0] for c in CLAMP_CASES])
def test_clamp(expr, decls, makers, ref):
    _run_expr(expr, decls, makers, ref, {"B": 2, "T": 3})


def test_clamp_needs_a_bound():
    with pytest.raises(SpecError, match="clamp"):
        gatedsl.check(model("output y = clamp(x)", "x: [B]"))


CAST_CASES = [
    ("to_float(i)", ["i: int[B, 4]", "x: [B]"], [ints, randn], lambda i, x: i.to(DT)),
    ("to_float(b) * x", ["b: bool[B, 4]", "x: [B, 4]"], [bools, randn], lambda b, x: torch.where(b, x, 0 * x)),
    ("to_float(x) * 2", ["x: [B, 4]"], [randn], lambda x: x * 2),
    ("to_int(x * 3)", ["x: [B, 4]"], [randn], lambda x: torch.trunc(x * 3).long()),
    ("to_int(b)", ["b: bool[B, 4]"], [bools], lambda b: torch.where(b, 1, 0)),
    ("to_bool(i)", ["i: int[B, 4]"], [ints], lambda i: i != 0),
    ("to_bool(x > 0)", ["x: [B, 4]"], [randn], lambda x: x > 0),
]


@pytest.mark.parametrize("expr,decls,makers,ref", CAST_CASES, ids=[c[0] for c in CAST_CASES])
def test_casts(expr, decls, makers, ref):
    _run_expr(expr, decls, makers, ref, {"B": 3})


def test_to_float_follows_the_model_dtype():
    # An int-only model: to_float and one_hot feed a linear layer whose weights are float64.
    spec = model("output y = linear(to_float(i), 3) + linear(one_hot(j, 5), 3)", "i: int[B, 4]", "j: int[B]")

    def ref(gm, i, j):
        oh = (j.unsqueeze(-1) == torch.arange(5)).to(DT)
        return (i.to(DT) @ P(gm, "y.proj.weight").T + P(gm, "y.proj.bias")
                + oh @ P(gm, "y.proj_1.weight").T + P(gm, "y.proj_1.bias"))

    check(spec, [ints(3, 4), ints(3)], ref)


@pytest.mark.parametrize("threshold", [None, 0.0, 0.3])
def test_binary_straight_through(threshold):
    arg = "" if threshold is None else f", threshold={threshold}"
    t = 0.5 if threshold is None else threshold
    spec = model(f"gate b = binary(x{arg})\noutput y = b", "x: [B, T, 4]")

    def ref(gm, x):  # hard forward, identity gradient
        hard = (x > t).to(x.dtype)
        return x + (hard - x).detach()

    gm = check(spec, [randn(2, 3, 4)], ref)
    x = randn(2, 3, 4).requires_grad_()
    y = gm(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    (g,) = torch.autograd.grad((y * 3).sum(), x)
    assert torch.equal(g, torch.full_like(x, 3.0))
    assert [g.kind for g in gatedsl.check(spec).gates] == ["binary"]


# ---------------------------------------------------- softmax and routing
def _softmax_ref(x, dim):
    e = torch.exp(x - x.amax(dim, keepdim=True).detach())
    return e / e.sum(dim, keepdim=True)


@pytest.mark.parametrize("dim", [None, -1, 1, 0])
@pytest.mark.parametrize("log", [False, True])
def test_softmax(dim, log):
    fn = "log_softmax" if log else "softmax"
    arg = "" if dim is None else f", dim={dim}"
    d = -1 if dim is None else dim

    def ref(gm, x):
        s = _softmax_ref(x, d)
        return torch.log(s) if log else s

    check(model(f"output y = {fn}(x{arg})", "x: [B, T, 5]"), [randn(2, 3, 5)], ref)


def _topk_ref(x, k, dim):
    order = torch.sort(x, dim=dim, descending=True)
    return order.values.narrow(dim, 0, k), order.indices.narrow(dim, 0, k)


@pytest.mark.parametrize("k,dim", [(1, -1), (2, -1), (5, -1), (2, 1), (3, 0)])
def test_topk(k, dim):
    spec = model(f"v, i = topk(x, {k}, dim={dim})\noutput v\noutput i", "x: [B, T, 5]")
    check(spec, [randn(3, 4, 5)], lambda gm, x: _topk_ref(x, k, dim))


@pytest.mark.parametrize("k,dim", [(1, -1), (2, -1), (5, -1), (2, 1)])
def test_topk_softmax_and_mask(k, dim):
    spec = model(f"gate g = topk_softmax(x, {k}, dim={dim})\noutput g\noutput m = topk_mask(x, {k}, dim={dim})",
                 "x: [B, T, 5]")

    def ref(gm, x):
        kth = _topk_ref(x, k, dim)[0].narrow(dim, k - 1, 1).detach()
        keep = x >= kth
        e = torch.where(keep, torch.exp(x - x.amax(dim, keepdim=True).detach()), torch.zeros_like(x))
        return e / e.sum(dim, keepdim=True), keep.to(x.dtype)

    check(spec, [randn(3, 4, 5)], ref)
    assert [g.kind for g in gatedsl.check(spec).gates] == ["topk"]


def test_topk_too_large():
    with pytest.raises(SpecError, match="k=6"):
        gatedsl.check(model("output y = topk_mask(x, 6)", "x: [B, 5]"))


# ------------------------------------------------------------------ norms
@pytest.mark.parametrize("shape", [(2, 3, 6), (4, 6)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_layer_norm(shape, affine, eps):
    args = ("" if affine else ", affine=false") + ("" if eps is None else f", eps={eps}")
    e = 1e-5 if eps is None else eps
    dims = ", ".join(["B", "T", "6"][-len(shape):])

    def ref(gm, x):
        mu = x.sum(-1, keepdim=True) / 6
        var = ((x - mu) ** 2).sum(-1, keepdim=True) / 6
        y = (x - mu) / torch.sqrt(var + e)
        return y * P(gm, "y.norm.weight") + P(gm, "y.norm.bias") if affine else y

    gm = check(model(f"output y = layer_norm(x{args})", f"x: [{dims}]"), [randn(*shape, scale=3) + 1], ref)
    assert param_names(gm) == ({"y.norm.weight", "y.norm.bias"} if affine else set())


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("eps", [None, 1e-2])
def test_rms_norm(affine, eps):
    args = ("" if affine else ", affine=false") + ("" if eps is None else f", eps={eps}")
    e = 1e-6 if eps is None else eps

    def ref(gm, x):
        y = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 6 + e)
        return y * P(gm, "y.norm.weight") if affine else y

    gm = check(model(f"output y = rms_norm(x{args})", "x: [B, T, 6]"), [randn(2, 3, 6, scale=2)], ref)
    assert param_names(gm) == ({"y.norm.weight"} if affine else set())


@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_channels_last(groups, affine):
    args = "" if affine else ", affine=false"

    def ref(gm, x):  # every position is a sample of 6 channels in `groups` groups
        w, b = (P(gm, "y.norm.weight"), P(gm, "y.norm.bias")) if affine else (None, None)
        return F.group_norm(x.reshape(-1, 6), groups, w, b, 1e-5).reshape(x.shape)

    gm = check(model(f"output y = group_norm(x, {groups}{args})", "x: [B, T, 6]"), [randn(2, 3, 6, scale=2)], ref)
    assert param_names(gm) == ({"y.norm.weight", "y.norm.bias"} if affine else set())


def test_group_norm_groups_must_divide():
    with pytest.raises(SpecError, match="groups"):
        gatedsl.check(model("output y = group_norm(x, 4)", "x: [B, 6]"))


# ----------------------------------------------------------- convolution
CONV1D_CASES = [
    # (arguments, input length (None: symbolic T), kernel, stride, dilation, padding, groups, causal)
    ("6, 3", None, 3, 1, 1, "same", 1, False),
    ("6, 3, padding=\"valid\"", 9, 3, 1, 1, 0, 1, False),
    ("6, 5, stride=2, padding=1", 9, 5, 2, 1, 1, 1, False),
    ("6, 3, dilation=2", None, 3, 1, 2, "same", 1, False),
    ("6, 3, stride=2", 10, 3, 2, 1, "same", 1, False),
    ("6, 2, causal=true", None, 2, 1, 1, "causal", 1, False),
    ("6, 3, dilation=2, causal=true", None, 3, 1, 2, "causal", 1, False),
    ("6, 3, stride=2, causal=true", 9, 3, 2, 1, "causal", 1, False),
    ("6, 3, groups=2", None, 3, 1, 1, "same", 2, False),
    ("2, 1, groups=2, bias=false", None, 1, 1, 1, "same", 2, False),
    ("6, [4], padding=[2]", 7, 4, 1, 1, 2, 1, False),
]


def _conv1d_ref(x, w, b, stride, dilation, padding, groups, kernel):
    xt = x.transpose(-1, -2)
    if padding == "causal":
        xt, pad = F.pad(xt, (dilation * (kernel - 1), 0)), 0
    elif padding == "same":
        pad = dilation * (kernel - 1) // 2
    else:
        pad = padding
    return F.conv1d(xt, w, b, stride, pad, dilation, groups).transpose(-1, -2)


@pytest.mark.parametrize("case", CONV1D_CASES, ids=[c[0] for c in CONV1D_CASES])
def test_conv1d(case):
    args, length, kernel, stride, dilation, padding, groups, _ = case
    spec = model(f"output y = conv1d(x, {args})", f"x: [B, {length or 'T'}, 4]")
    bias = "bias=false" not in args

    def ref(gm, x):
        return _conv1d_ref(x, P(gm, "y.conv.weight"), P(gm, "y.conv.bias") if bias else None, stride, dilation,
                           padding, groups, kernel)

    gm = check(spec, [randn(2, length or 8, 4)], ref)
    assert P(gm, "y.conv.weight").shape[1:] == (4 // groups, kernel)


def test_conv1d_extra_leading_dims_and_causality():
    spec = model("output y = conv1d(x, 3, 4, causal=true)", "x: [B, N, T, 2]")
    ref = lambda gm, x: _conv1d_ref(x.reshape(-1, 7, 2), P(gm, "y.conv.weight"), P(gm, "y.conv.bias"), 1, 1,  # noqa: E731
                                    "causal", 1, 4).reshape(2, 3, 7, 3)
    gm = check(spec, [randn(2, 3, 7, 2)], ref)
    # Causal: changing the future leaves the past alone.
    x = randn(1, 1, 7, 2)
    x2 = x.clone()
    x2[..., 4:, :] += 1
    assert torch.equal(gm(x)[..., :4, :], gm(x2)[..., :4, :])


@pytest.mark.parametrize("args,kernel,dilation,padding", [
    ("3", 3, 1, "same"), ("5, dilation=2", 5, 2, "same"), ("2, causal=true", 2, 1, "causal"),
    ("3, padding=\"valid\", bias=false", 3, 1, 0),
])
def test_depthwise_conv1d(args, kernel, dilation, padding):
    spec = model(f"output y = depthwise_conv1d(x, {args})", "x: [B, 12, 4]")
    bias = "bias=false" not in args
    gm = check(spec, [randn(2, 12, 4)], lambda gm, x: _conv1d_ref(
        x, P(gm, "y.conv.weight"), P(gm, "y.conv.bias") if bias else None, 1, dilation, padding, 4, kernel))
    assert P(gm, "y.conv.weight").shape == (4, 1, kernel)


CONV2D_CASES = [
    # (arguments, H, W, kernel, stride, dilation, padding, groups)
    ("6, 3", None, None, (3, 3), (1, 1), (1, 1), "same", 1),
    ("6, [3, 1]", None, None, (3, 1), (1, 1), (1, 1), "same", 1),
    ("6, 3, padding=\"valid\"", 7, 6, (3, 3), (1, 1), (1, 1), (0, 0), 1),
    ("6, 3, stride=[2, 1], padding=[1, 0]", 7, 6, (3, 3), (2, 1), (1, 1), (1, 0), 1),
    ("6, 3, dilation=2", None, None, (3, 3), (1, 1), (2, 2), "same", 1),
    ("2, [2, 3], stride=2, padding=0, groups=2, bias=false", 8, 7, (2, 3), (2, 2), (1, 1), (0, 0), 2),
]


def _conv2d_ref(x, w, b, stride, dilation, padding, groups):
    if padding == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, w.shape[-2:]))
    return F.conv2d(x.permute(0, 3, 1, 2), w, b, stride, padding, dilation, groups).permute(0, 2, 3, 1)


@pytest.mark.parametrize("case", CONV2D_CASES, ids=[c[0] for c in CONV2D_CASES])
def test_conv2d(case):
    args, h, w, kernel, stride, dilation, padding, groups = case
    spec = model(f"output y = conv2d(x, {args})", f"x: [B, {h or 'H'}, {w or 'W'}, 4]")
    bias = "bias=false" not in args
    gm = check(spec, [randn(2, h or 5, w or 6, 4)], lambda gm, x: _conv2d_ref(
        x, P(gm, "y.conv.weight"), P(gm, "y.conv.bias") if bias else None, stride, dilation, padding, groups))
    assert P(gm, "y.conv.weight").shape == (6 if groups == 1 else 2, 4 // groups) + kernel


@pytest.mark.parametrize("args,kernel,stride,padding", [
    ("3", (3, 3), (1, 1), "same"), ("[3, 5], stride=[1, 2], padding=[1, 2]", (3, 5), (1, 2), (1, 2)),
])
def test_depthwise_conv2d(args, kernel, stride, padding):
    spec = model(f"output y = depthwise_conv2d(x, {args})", "x: [B, 6, 8, 3]")
    gm = check(spec, [randn(2, 6, 8, 3)], lambda gm, x: _conv2d_ref(
        x, P(gm, "y.conv.weight"), P(gm, "y.conv.bias"), stride, (1, 1), padding, 3))
    assert P(gm, "y.conv.weight").shape == (3, 1) + kernel


def test_conv_errors():
    with pytest.raises(SpecError, match="odd kernel"):
        gatedsl.check(model("output y = conv1d(x, 4, 2)", "x: [B, T, 3]"))
    with pytest.raises(SpecError, match="groups"):
        gatedsl.check(model("output y = conv1d(x, 4, 3, groups=2)", "x: [B, T, 3]"))
    with pytest.raises(SpecError, match="symbolic"):
        gatedsl.check(model("output y = conv1d(x, 4, 3, stride=2)", "x: [B, T, 3]"))


# ---------------------------------------------------------------- pooling
@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("args,length,kernel,stride", [
    ("2", 8, 2, 2), ("3", 8, 3, 3), ("3, stride=1", 7, 3, 1), ("4, stride=2", 9, 4, 2), ("2", None, 2, 2),
])
def test_pool1d(kind, args, length, kernel, stride):
    # A symbolic length: pool [B, 2*T, 3] (two copies of x along T) by 2 into [B, T, 3].
    arg = "x" if length else "concat([x, x], 1)"
    spec = model(f"output y = {kind}_pool1d({arg}, {args})", f"x: [B, {length or 'T'}, 3]")

    def ref(gm, x):
        x = x if length else torch.cat([x, x], 1)
        win = x.unfold(1, kernel, stride)  # [B, L', C, k]
        return win.mean(-1) if kind == "avg" else win.max(-1).values

    check(spec, [randn(2, length or 5, 3)], ref)


@pytest.mark.parametrize("kind", ["avg", "max"])
@pytest.mark.parametrize("args,h,w,kernel,stride", [
    ("2", 6, 8, (2, 2), (2, 2)), ("[2, 3], stride=1", 5, 6, (2, 3), (1, 1)), ("3, stride=[2, 1]", 7, 5, (3, 3), (2, 1)),
])
def test_pool2d(kind, args, h, w, kernel, stride):
    spec = model(f"output y = {kind}_pool2d(x, {args})", f"x: [B, {h}, {w}, 3]")

    def ref(gm, x):
        win = x.unfold(1, kernel[0], stride[0]).unfold(2, kernel[1], stride[1])  # [B, H', W', C, kh, kw]
        return win.mean((-2, -1)) if kind == "avg" else win.flatten(-2).max(-1).values

    check(spec, [randn(2, h, w, 3)], ref)


def test_conv_and_pool_without_batch_and_with_extra_leading_dims():
    spec = model("output a = conv1d(x, 2, 3)\noutput b = max_pool1d(y, 2)\noutput c = avg_pool2d(z, 2)\n"
                 "output d = conv2d(z, 3, 3, padding=\"valid\")", "x: [L, 4]", "y: [N, B, 6, 3]", "z: [6, 4, 2]")

    def ref(gm, x, y, z):
        a = _conv1d_ref(x.unsqueeze(0), P(gm, "a.conv.weight"), P(gm, "a.conv.bias"), 1, 1, "same", 1, 3)[0]
        b = y.unfold(2, 2, 2).max(-1).values
        c = z.unfold(0, 2, 2).unfold(1, 2, 2).mean((-2, -1))
        d = _conv2d_ref(z.unsqueeze(0), P(gm, "d.conv.weight"), P(gm, "d.conv.bias"), 1, (1, 1), 0, 1)[0]
        return a, b, c, d

    check(spec, [randn(5, 4, seed=1), randn(2, 3, 6, 3, seed=2), randn(6, 4, 2, seed=3)], ref)


# ----------------------------------------------------------------- shapes
BLOCK_RESHAPE = """
block split4(x: [B, T, D]) {
  return reshape(x, [B, T, 4, D / 4])
}
block merge(x: [B, T, H, E]) {
  return reshape(x, [B * T, H * E])
}
"""

SHAPE_CASES = [
    # (body, declarations, input shapes, reference)
    ("output y = reshape(x, [-1, 8])", ["x: [B, T, 8]"], [(2, 3, 8)], lambda x: x.reshape(6, 8)),
    ("output y = reshape(x, [size(x, 0), -1])", ["x: [B, T, 8]"], [(2, 3, 8)], lambda x: x.reshape(2, 24)),
    ("output y = reshape(x, [size(x, 0), size(x, 1), 2, -1])", ["x: [B, T, 8]"], [(2, 3, 8)],
     lambda x: x.reshape(2, 3, 2, 4)),
    ("output y = reshape(x, [4, 6])", ["x: [2, 3, 4]"], [(2, 3, 4)], lambda x: x.reshape(4, 6)),
    ("output y = reshape(x, [size(x, 1) * 2, -1, 4])", ["x: [B, T, 8]"], [(3, 5, 8)],
     lambda x: x.reshape(10, 3, 4)),
    ("output y = merge(split4(x))", ["x: [B, T, 8]"], [(2, 3, 8)], lambda x: x.reshape(6, 8)),
    ("output y = split4(x)", ["x: [B, T, 8]"], [(2, 3, 8)], lambda x: x.reshape(2, 3, 4, 2)),
    ("output y = flatten(x)", ["x: [B, T, 4]"], [(2, 3, 4)], lambda x: x.reshape(-1)),
    ("output y = flatten(x, 1)", ["x: [B, T, 4]"], [(2, 3, 4)], lambda x: x.reshape(2, 12)),
    ("output y = flatten(x, 0, 1)", ["x: [B, T, 4]"], [(2, 3, 4)], lambda x: x.reshape(6, 4)),
    ("output y = flatten(x, -3, -2)", ["x: [N, B, T, 4]"], [(5, 2, 3, 4)], lambda x: x.reshape(5, 6, 4)),
    ("output y = transpose(x)", ["x: [B, T, 4]"], [(2, 3, 4)], lambda x: x.permute(0, 2, 1)),
    ("output y = transpose(x, 0, 2)", ["x: [B, T, 4]"], [(2, 3, 4)], lambda x: x.permute(2, 1, 0)),
    ("output y = transpose(x, 1, -3)", ["x: [B, T, 4]"], [(2, 3, 4)], lambda x: x.permute(1, 0, 2)),
    ("output y = permute(x, [2, 0, 1])", ["x: [B, T, 4]"], [(2, 3, 4)], lambda x: x.movedim(2, 0)),
    ("output y = permute(x, [-1, 0, 1])", ["x: [B, T, 4]"], [(2, 3, 4)], lambda x: x.movedim(2, 0)),
    ("output y = unsqueeze(x, 0)", ["x: [B, T]"], [(2, 3)], lambda x: x.reshape(1, 2, 3)),
    ("output y = unsqueeze(x, 1)", ["x: [B, T]"], [(2, 3)], lambda x: x.reshape(2, 1, 3)),
    ("output y = unsqueeze(x, -1)", ["x: [B, T]"], [(2, 3)], lambda x: x.reshape(2, 3, 1)),
    ("output y = unsqueeze(x, -2)", ["x: [B, T]"], [(2, 3)], lambda x: x.reshape(2, 1, 3)),
    ("output y = squeeze(x, 1)", ["x: [B, 1, T]"], [(2, 1, 3)], lambda x: x.reshape(2, 3)),
    ("output y = squeeze(x, -1)", ["x: [B, T, 1]"], [(2, 3, 1)], lambda x: x.reshape(2, 3)),
    ("a, b, c = split(x, [1, 2, 3])\noutput a\noutput b\noutput c", ["x: [B, 6]"], [(2, 6)],
     lambda x: (x[:, :1], x[:, 1:3], x[:, 3:])),
    ("a, b = split(x, 2, dim=1)\noutput a\noutput b", ["x: [B, 4, C]"], [(2, 4, 3)], lambda x: (x[:, :2], x[:, 2:])),
    ("a, b = split(x, [3, 1], dim=-2)\noutput a\noutput b", ["x: [B, 4, C]"], [(2, 4, 3)],
     lambda x: (x[:, :3], x[:, 3:])),
    ("a, b, c = chunk(x, 3)\noutput y = a * b + c", ["x: [B, 6]"], [(2, 6)], lambda x: x[:, :2] * x[:, 2:4] + x[:, 4:]),
    ("a, b = chunk(x, 2, dim=0)\noutput a\noutput b", ["x: [4, T]"], [(4, 3)], lambda x: (x[:2], x[2:])),
    ("output y = concat([x, z])", ["x: [B, 3]", "z: [B, 2]"], [(2, 3), (2, 2)],
     lambda x, z: torch.cat([x, z], -1)),
    ("output y = concat([x, z], dim=0)", ["x: [2, T]", "z: [3, T]"], [(2, 3), (3, 3)],
     lambda x, z: torch.cat([x, z], 0)),
    ("output y = concat([x, x], 1)", ["x: [B, T, 2]"], [(2, 3, 2)], lambda x: torch.cat([x, x], 1)),
    ("output y = concat([x, x, x], 1)", ["x: [B, T, 2]"], [(2, 3, 2)], lambda x: torch.cat([x, x, x], 1)),
    ("output y = concat([x, concat([x, x], 1)], 1)", ["x: [B, T, 2]"], [(2, 3, 2)],
     lambda x: torch.cat([x, x, x], 1)),
    ("output y = stack([x, z])", ["x: [B, 3]", "z: [B, 3]"], [(2, 3), (2, 3)], lambda x, z: torch.stack([x, z])),
    ("output y = stack([x, z, x], dim=1)", ["x: [B, 3]", "z: [B, 3]"], [(2, 3), (2, 3)],
     lambda x, z: torch.stack([x, z, x], 1)),
    ("output y = stack([x, to_float(z > 0)], dim=-1) + stack([x, z])[0, 0, 0]",
     ["x: [B, 3]", "z: [B, 3]"], [(2, 3), (2, 3)], lambda x, z: torch.stack([x, (z > 0).to(DT)], 2) + x[0, 0]),
    ("output y = stack([x, z], dim=-1)", ["x: [B, 3]", "z: [B, 3]"], [(2, 3), (2, 3)],
     lambda x, z: torch.stack([x, z], 2)),
    ("output y = split_heads(x, 2)", ["x: [B, T, 6]"], [(2, 3, 6)], lambda x: x.reshape(2, 3, 2, 3).permute(0, 2, 1, 3)),
    ("output y = merge_heads(x, 2)", ["x: [B, 2, T, 3]"], [(2, 2, 4, 3)],
     lambda x: x.permute(0, 2, 1, 3).reshape(2, 4, 6)),
    ("output y = merge_heads(split_heads(x, 3), 3)", ["x: [B, T, 6]"], [(2, 3, 6)], lambda x: x * 1),
    ("output y = split_heads(x, 2)", ["x: [T, 4]"], [(3, 4)], lambda x: x.reshape(3, 2, 2).permute(1, 0, 2)),
    ("output y = flip(x, 1)", ["x: [B, T, 3]"], [(2, 4, 3)], lambda x: x[:, torch.arange(3, -1, -1)]),
    ("output y = flip(x, -1)", ["x: [B, T, 3]"], [(2, 4, 3)], lambda x: x[..., torch.tensor([2, 1, 0])]),
    ("output y = x * size(x, 2) + size(x, -1)", ["x: [B, T, 3]"], [(2, 4, 3)], lambda x: x * 3 + 3),
    ("output y = zeros([size(x, 0), 2]) + x[:, :2]", ["x: [B, 3]"], [(4, 3)], lambda x: x[:, :2] + 0),
    # slicing
    ("output y = x[:, -1]", ["x: [B, T, 3]"], [(2, 4, 3)], lambda x: x.select(1, 3)),
    ("output y = x[0]", ["x: [B, T, 3]"], [(2, 4, 3)], lambda x: x.select(0, 0)),
    ("output y = x[..., :2]", ["x: [B, T, 3]"], [(2, 4, 3)], lambda x: x.narrow(2, 0, 2)),
    ("output y = x[..., 1]", ["x: [B, T, 3]"], [(2, 4, 3)], lambda x: x.select(2, 1)),
    ("output y = x[:, 1:3]", ["x: [B, T, 3]"], [(2, 4, 3)], lambda x: x.narrow(1, 1, 2)),
    ("output y = x[:, :, -2:]", ["x: [B, T, 3]"], [(2, 4, 3)], lambda x: x.narrow(2, 1, 2)),
    ("output y = x[1:, ..., ::2]", ["x: [3, T, 5]"], [(3, 4, 5)], lambda x: x[torch.tensor([1, 2])][..., torch.tensor([0, 2, 4])]),
    ("output y = x[-1, ..., -3:-1]", ["x: [B, T, 5]"], [(3, 4, 5)], lambda x: x.select(0, 2).narrow(-1, 2, 2)),
    ("output y = x[...]", ["x: [B, T, 5]"], [(3, 4, 5)], lambda x: x * 1),
    ("output y = x[:, ...]", ["x: [B, T, 5]"], [(3, 4, 5)], lambda x: x * 1),
    ("output y = x[1, 2, 3]", ["x: [B, T, 5]"], [(3, 4, 5)], lambda x: x[1][2][3]),
    ("output y = x[::2, 1]", ["x: [5, T]"], [(5, 3)], lambda x: x.select(1, 1)[torch.tensor([0, 2, 4])]),
]


@pytest.mark.parametrize("body,decls,shapes,ref", SHAPE_CASES, ids=[f"{i}:{c[0][:40]}" for i, c in enumerate(SHAPE_CASES)])
def test_shape_ops(body, decls, shapes, ref):
    inputs = [randn(*s, seed=k) for k, s in enumerate(shapes)]
    check(model(body, *decls, prelude=BLOCK_RESHAPE), inputs, lambda gm, *xs: ref(*xs))


def test_stack_and_concat_promote_dtypes():
    spec = model("output a = stack([i, x])\noutput b = concat([m, i])\noutput c = stack([m, m], 1)",
                 "i: int[B, 3]", "x: [B, 3]", "m: bool[B, 3]")
    check(spec, [ints(2, 3), randn(2, 3), bools(2, 3)],
          lambda gm, i, x, m: (torch.stack([i.to(DT), x]), torch.cat([m.long(), i], 1), torch.stack([m, m], 1)))


def test_shape_ops_on_ints_and_bools_keep_dtype():
    spec = model("output a = reshape(i, [-1])\noutput b = transpose(m)\noutput c = concat([i, i])\n"
                 "output d = flip(m, 0)\noutput e = i[:, 1:]", "i: int[B, 3]", "m: bool[B, 3]")
    check(spec, [ints(2, 3), bools(2, 3)], lambda gm, i, m: (i.reshape(-1), m.T, torch.cat([i, i], 1), m.flip(0),
                                                               i[:, 1:]))


@pytest.mark.parametrize("dim", [-1, 1, 0])
def test_gather(dim):
    spec = model(f"output y = gather(x, i, dim={dim})", "x: [B, T, 4]", "i: int[B, T, K]")
    x = randn(3, 4, 4)
    size = x.shape[dim]
    idx = ints(3, 4, 2, high=size) if dim in (-1, 2) else ints(3, 4, 2, high=size) % 3

    def ref(gm, x, i):
        out = torch.empty(i.shape, dtype=x.dtype)
        out = []
        for b in range(i.shape[0]):
            for t in range(i.shape[1]):
                for k in range(i.shape[2]):
                    pos = [b, t, k]
                    pos[dim] = int(i[b, t, k])
                    out.append(x[tuple(pos)])
        return torch.stack(out).reshape(i.shape)

    check(spec, [x, idx], ref)


def test_shape_errors():
    bad = [
        ("output y = reshape(x, [5, -1])", "x: [2, 4]", "cannot reshape"),
        ("output y = reshape(x, [-1, -1])", "x: [2, 4]", "one -1"),
        ("output y = squeeze(x, 0)", "x: [2, 4]", "not 1"),
        ("a, b = split(x, [1, 2])\noutput a", "x: [2, 4]", "sum to"),
        ("a, b = chunk(x, 3)\noutput a", "x: [2, 4]", "chunk"),
        ("output y = concat([x, transpose(x)])", "x: [2, 4]", "concat"),
        ("output y = stack([x, x[:, :2]])", "x: [2, 4]", "stack"),
        ("output y = permute(x, [0, 0])", "x: [2, 4]", "permutation"),
        ("output y = x[5]", "x: [2, 4]", "out of range"),
        ("output y = x[1, 2, 3]", "x: [2, 4]", "too many"),
        ("output y = x[..., ...]", "x: [2, 4]", "one '...'"),
        ("output y = x[:, 3:1]", "x: [2, 4]", "empty"),
        ("output y = split_heads(x, 3)", "x: [2, 4]", "heads"),
        ("output y = sum(x, [0, 0])", "x: [2, 4]", "twice"),
        ("output y = sum(x, [])", "x: [2, 4]", "dim"),
        ("output y = flip(x, 2)", "x: [2, 4]", "out of range"),
    ]
    for body, decl, message in bad:
        with pytest.raises(SpecError, match=re.escape(message)):
            gatedsl.check(model(body, decl))


# ------------------------------------------------------------- reductions
def _reduce_ref(fn, x, dims, keepdim):
    dims = sorted({d % x.dim() for d in (range(x.dim()) if dims is None else dims)})
    rest = [d for d in range(x.dim()) if d not in dims]
    y = x.permute(rest + dims).reshape([x.shape[d] for d in rest] + [-1])
    if fn == "sum":
        r = y.sum(-1)
    elif fn == "mean":
        r = y.sum(-1) / y.shape[-1]
    elif fn == "max":
        r = y.max(-1).values
    elif fn == "min":
        r = y.min(-1).values
    elif fn == "prod":
        r = functools.reduce(lambda a, b: a * b, y.unbind(-1))
    else:
        m = y.max(-1, keepdim=True).values.detach()
        r = (m + torch.log(torch.exp(y - m).sum(-1, keepdim=True))).squeeze(-1)
    if keepdim:
        r = r.reshape([1 if d in dims else x.shape[d] for d in range(x.dim())])
    return r


@pytest.mark.parametrize("dims,keepdim", [(None, False), (1, False), (-1, True), ([0, 2], False), ([0, 2], True),
                                          ([-1, 1], False), (None, True)])
@pytest.mark.parametrize("fn", ["sum", "mean", "max", "min", "prod", "logsumexp"])
def test_reductions(fn, dims, keepdim):
    args = ("" if dims is None else f", {dims}") + (", keepdim=true" if keepdim else "")
    spec = model(f"output y = {fn}(x{args})", "x: [B, T, 4]")
    check(spec, [randn(2, 3, 4) * 0.8 + 0.3], lambda gm, x: _reduce_ref(fn, x, [dims] if isinstance(dims, int) else dims,
                                                                       keepdim))


@pytest.mark.parametrize("fn", ["sum", "max", "min", "prod"])
def test_reductions_of_ints(fn):
    spec = model(f"output y = {fn}(i, 1)\noutput z = {fn}(m, [0, 1])", "i: int[B, 4]", "m: bool[B, 4]")

    def ref(gm, i, m):
        ref_m = {"sum": lambda: m.long().sum(), "prod": lambda: m.long().prod(), "max": lambda: m.any(),
                 "min": lambda: m.all()}[fn]()
        return _reduce_ref(fn, i, [1], False), ref_m

    check(spec, [ints(3, 4, low=-3), bools(3, 4)], ref)


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("fn", ["cumsum", "cumprod"])
def test_cumulative(fn, dim, reverse):
    spec = model(f"output y = {fn}(x, {dim}{', reverse=true' if reverse else ''})", "x: [B, T, 4]")

    def ref(gm, x):
        n = x.shape[dim]
        agg = (lambda v: v.sum(dim)) if fn == "cumsum" else (lambda v: _reduce_ref("prod", v, [dim], False))
        parts = [agg(x.narrow(dim, t, n - t) if reverse else x.narrow(dim, 0, t + 1)) for t in range(n)]
        return torch.stack(parts, dim % x.dim())

    check(spec, [randn(2, 3, 4)], ref)


def test_cumsum_of_bools_counts():
    spec = model("output y = cumsum(m, 1)\noutput z = cumsum(i, 0, reverse=true)", "m: bool[B, T]", "i: int[B, T]")
    check(spec, [bools(2, 5), ints(2, 5)], lambda gm, m, i: (torch.cumsum(m.long(), 1), i.flip(0).cumsum(0).flip(0)))


# -------------------------------------------------------------- attention
def _attention_ref(q, k, v, causal=False, scale=None, mask=None):
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * s  # [*, T, S]
    T, S = scores.shape[-2:]
    if causal:
        allowed = torch.arange(S).unsqueeze(0) <= torch.arange(T).unsqueeze(1)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    p = torch.exp(scores - scores.amax(-1, keepdim=True).detach())
    p = p / p.sum(-1, keepdim=True)
    return (p.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)


ATTENTION_CASES = [
    # (arguments, declarations, shapes, reference keywords)
    ("q, k, v", ["q: [B, H, T, 4]", "k: [B, H, S, 4]", "v: [B, H, S, 3]"], [(2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 3)], {}),
    ("q, k, v, causal=true", ["q: [B, H, T, 4]", "k: [B, H, T, 4]", "v: [B, H, T, 4]"],
     [(2, 2, 5, 4), (2, 2, 5, 4), (2, 2, 5, 4)], {"causal": True}),
    ("q, k, v, scale=0.3", ["q: [B, T, 4]", "k: [B, S, 4]", "v: [B, S, 2]"], [(2, 3, 4), (2, 4, 4), (2, 4, 2)],
     {"scale": 0.3}),
    ("q, k, v, causal=true, scale=2.0", ["q: [T, 4]", "k: [T, 4]", "v: [T, 4]"], [(5, 4), (5, 4), (5, 4)],
     {"causal": True, "scale": 2.0}),
]


@pytest.mark.parametrize("args,decls,shapes,kw", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention(args, decls, shapes, kw):
    inputs = [randn(*s, seed=i) for i, s in enumerate(shapes)]
    check(model(f"output y = attention({args})", *decls), inputs, lambda gm, q, k, v: _attention_ref(q, k, v, **kw))


def test_attention_with_masks():
    decls = ["q: [B, T, 4]", "k: [B, S, 4]", "v: [B, S, 3]", "m: bool[T, S]", "f: [B, T, S]"]
    spec = model("output a = attention(q, k, v, mask=m)\noutput b = attention(q, k, v, mask=f, scale=0.5)", *decls)
    mask = bools(3, 5, seed=7)
    mask[:, 0] = True  # every query sees something
    inputs = [randn(2, 3, 4, seed=1), randn(2, 5, 4, seed=2), randn(2, 5, 3, seed=3), mask, randn(2, 3, 5, seed=4)]
    check(spec, inputs, lambda gm, q, k, v, m, f: (_attention_ref(q, k, v, mask=m), _attention_ref(q, k, v, scale=0.5, mask=f)))
    # masks combined with causal=true, lengths, windows and grouped heads: tests/test_attention_primitives.py


def test_attention_shape_errors():
    with pytest.raises(SpecError, match="widths"):
        gatedsl.check(model("output y = attention(q, k, k)", "q: [B, T, 4]", "k: [B, T, 3]"))


# ------------------------------------------------- embedding, one_hot, dropout
def test_embedding():
    spec = model("output y = embedding(i, 7, 3)", "i: int[B, T]")
    gm = check(spec, [ints(2, 4, high=7)], lambda gm, i: P(gm, "y.embedding.weight")[i])
    assert param_names(gm) == {"y.embedding.weight"}


def test_embedding_default_init_matches_torch():
    torch.manual_seed(3)
    gm = gatedsl.compile(model("output y = embedding(i, 50, 8)", "i: int[B]"))
    torch.manual_seed(3)
    emb = torch.nn.Embedding(50, 8)
    assert torch.equal(P(gm, "y.embedding.weight"), emb.weight)


def test_take_reads_a_learned_table_and_ties_it_to_a_head():
    """take(E, i) = E[i]; with the same E as the head, h @ Eᵀ, one tensor gets both gradients (tied weights)."""
    spec = model("E = learned([7, 3], init=normal(0.02))\nh = take(E, i)\noutput y = h * x @ transpose(E)",
                 "i: int[B, T]", "x: [B, T, 3]")
    gm = check(spec, [ints(2, 4, high=7), randn(2, 4, 3)],
               lambda gm, i, x: (P(gm, "E")[i] * x) @ P(gm, "E").T)
    assert param_names(gm) == {"E"} and gatedsl.check(spec).params == 21


@pytest.mark.parametrize("table, index, message", [
    ("[7]", "int[B]", "float [N, D] table"), ("[7, 3]", "[B]", "int indices")])
def test_take_errors(table, index, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        gatedsl.check(model("output y = take(E, i)", f"E: {table}", f"i: {index}"))


@pytest.mark.parametrize("num", [1, 4])
def test_one_hot(num):
    spec = model(f"output y = one_hot(i, {num}) * x", "x: [B, T, 1]", "i: int[B, T]")
    check(spec, [randn(2, 3, 1), ints(2, 3, high=num)],
          lambda gm, x, i: (i.unsqueeze(-1) == torch.arange(num)).to(DT) * x)


def test_one_hot_alone():
    spec = model("output y = one_hot(i, 3)", "i: int[B]")
    out = gatedsl.compile(spec)(torch.tensor([0, 2, 1]))
    assert out.dtype == torch.get_default_dtype()
    assert torch.equal(out, torch.eye(3)[[0, 2, 1]])


@pytest.mark.parametrize("p", [0.0, 0.25, 0.7])
def test_dropout(p):
    spec = model(f"output y = dropout(x, {p})", "x: [B, T, 8]")
    gm = compile_double(spec)
    x = randn(4, 5, 8).requires_grad_()
    gm.eval()
    assert torch.equal(gm(x), x)
    gm.train()
    torch.manual_seed(11)
    y = gm(x)
    torch.manual_seed(11)
    want = F.dropout(x, p, training=True)
    assert torch.equal(y, want)
    (g,) = torch.autograd.grad((y * 2).sum(), x)
    assert torch.allclose(g, torch.where(want != 0, 2 / (1 - p), 0.0).to(DT))
    check_static(spec, None, [x], [y])


def test_dropout_default_and_bad_probability():
    gm = compile_double(model("output y = dropout(x)", "x: [B, 8]"))
    assert [m.p for m in gm.modules() if isinstance(m, torch.nn.Dropout)] == [0.1]
    with pytest.raises(SpecError, match="probability"):
        gatedsl.check(model("output y = dropout(x, 1.0)", "x: [B, 8]"))


# ----------------------------------------------------------------- learned
def test_learned_in_expressions():
    spec = model("w = learned([4])\ns = learned([3, 4])\noutput y = x * w + s", "x: [B, 3, 4]")
    gm = check(spec, [randn(2, 3, 4)], lambda gm, x: x * P(gm, "w") + P(gm, "s"))
    assert param_names(gm) == {"w", "s"}


def test_two_learned_tensors_in_one_statement():
    spec = model("y = x * learned([4]) + learned([4], init=ones)\noutput y", "x: [B, 4]")
    gm = compile_double(spec, randomize=False)
    names = sorted(param_names(gm))
    assert len(names) == 2 and gatedsl.check(spec).params == 8
    check(spec, [randn(3, 4)], lambda gm, x: x * P(gm, names[0]) + P(gm, names[1]))


@pytest.mark.parametrize("body", [
    "y = learned([4]) * linear(x, 4)\noutput y",
    "y = linear(x, 4) * learned([4])\noutput y",
    "y = dropout(x, 0.5) * learned([4])\noutput y",
    "y = learned([4]) * dropout(x, 0.5)\noutput y",
])
def test_learned_next_to_other_weights_in_a_statement(body):
    spec = model(body, "x: [B, 4]")
    gm = compile_double(spec, randomize=False)
    gm.eval()
    learned = [n for n in param_names(gm) if "proj" not in n]
    assert len(learned) == 1
    assert gatedsl.check(spec).params == sum(p.numel() for p in gm.parameters())
    x = randn(3, 4)
    if "linear" in body:
        want = (x @ P(gm, "y.x_proj.weight").T + P(gm, "y.x_proj.bias")) * P(gm, learned[0])
    else:
        want = x * P(gm, learned[0])
    torch.testing.assert_close(gm(x), want, **TOL)


def _init_stats(init, shape):
    torch.manual_seed(0)
    shape_text = ", ".join(map(str, shape))
    gm = gatedsl.compile(model(f"w = learned([{shape_text}], init={init})\noutput y = x * 0 + sum(w)", "x: [B]"))
    return gm.get_parameter("w").detach().double()


def test_learned_init_schemes():
    assert torch.equal(_init_stats("zeros", [50]), torch.zeros(50, dtype=DT))
    assert torch.equal(_init_stats("ones", [5, 3]), torch.ones(5, 3, dtype=DT))
    assert torch.all(_init_stats("constant(0.25)", [7]) == 0.25)
    w = _init_stats("normal(0.02)", [400, 300])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.001
    w = _init_stats("normal(1.0, 0.5)", [400, 300])
    assert abs(w.std().item() - 0.5) < 0.02 and abs(w.mean().item() - 1.0) < 0.01
    w = _init_stats("uniform(-0.3, 0.1)", [400, 300])
    assert w.min() >= -0.3 and w.max() <= 0.1 and w.min() < -0.29 and w.max() > 0.09
    w = _init_stats("trunc_normal(0.1)", [400, 300])
    assert w.abs().max() <= 0.2 + 1e-7 and 0.07 < w.std().item() < 0.1
    fan_in, fan_out = 300, 400
    w = _init_stats("xavier_uniform", [fan_out, fan_in])
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.98 * bound
    w = _init_stats("xavier_normal(2.0)", [fan_out, fan_in])
    assert abs(w.std().item() - 2 * math.sqrt(2 / (fan_in + fan_out))) < 0.01
    w = _init_stats("kaiming_uniform", [fan_out, fan_in])
    bound = math.sqrt(6 / fan_in)
    assert w.abs().max() <= bound + 1e-7 and w.abs().max() > 0.98 * bound
    w = _init_stats("kaiming_normal", [fan_out, fan_in])
    assert abs(w.std().item() - math.sqrt(2 / fan_in)) < 0.005
    w = _init_stats("orthogonal", [30, 50])
    torch.testing.assert_close(w @ w.T, torch.eye(30, dtype=DT), atol=1e-5, rtol=0)
    w = _init_stats("orthogonal(2.0)", [20, 20])
    torch.testing.assert_close(w @ w.T, 4 * torch.eye(20, dtype=DT), atol=1e-4, rtol=0)
    w = _init_stats("fan_in_uniform(16)", [400, 300])
    assert w.abs().max() <= 0.25 + 1e-7 and w.abs().max() > 0.245
    w = _init_stats("s4d_real", [3, 5])  # log n along the last dim: Mamba's A_log for A_n = −n
    assert torch.equal(w, torch.log(torch.arange(1.0, 6.0)).double().expand(3, 5))
    w = _init_stats("dt_bias(0.001, 0.1)", [20000])  # softplus(b) = Δ₀, log-uniform in [0.001, 0.1]
    torch.manual_seed(0)
    want = torch.exp(torch.rand(20000) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp(min=1e-4)
    torch.testing.assert_close(F.softplus(w), want.double(), rtol=1e-5, atol=0)  # the same draw, mapped through
    log_dt = torch.log(F.softplus(w))
    assert log_dt.min() >= math.log(0.001) - 1e-5 and log_dt.max() <= math.log(0.1) + 1e-5
    assert abs(log_dt.mean().item() - (math.log(0.001) + math.log(0.1)) / 2) < 0.05
    w = _init_stats("dt_bias(0.001, 0.1, 0.01)", [1000])  # the floor clamps Δ₀ from below
    assert F.softplus(w).min() >= 0.01 - 1e-6 and (F.softplus(w) - 0.01).abs().min() < 1e-6
    w = _init_stats("log_of_uniform(0.01, 16)", [400, 300])  # log u, u ~ U(0.01, 16)
    assert w.exp().min() >= 0.01 and w.exp().max() <= 16 and abs(w.exp().mean().item() - 8.005) < 0.05
    w = _init_stats("none", [400, 100])  # the default: U(±1/sqrt(last dim))
    assert w.abs().max() <= 0.1 + 1e-7 and w.abs().max() > 0.098


def test_init_errors():
    bad = [
        ("learned([8], init=xavier_uniform)", "2 dims"),
        ("learned([8], init=orthogonal)", "2 dims"),
        ("learned([8], init=kaiming_normal)", "2 dims"),
        ("linear(x, 4, bias_init=xavier_normal)", "2 dims"),
        ("learned([8], init=uniform(1, 0))", "uniform"),
        ("learned([8], init=trunc_normal(0))", "deviation"),
        ("learned([8], init=normal(-1))", "deviation"),
        ("learned([8], init=bogus)", "unknown init"),
        ("learned([8], init=normal(1, 2, 3))", "normal takes"),
        ("learned([8], init=dt_bias(0.1, 0.01))", "dt_min <= dt_max"),
        ("learned([8], init=dt_bias(0, 0.1))", "0 < dt_min"),
        ("sum(learned([], init=s4d_real))", "not a scalar"),
        ("learned([8], init=log_of_uniform(-1, 16))", "log_of_uniform(a, b) needs 0 <= a <= b"),
    ]
    for expr, message in bad:
        with pytest.raises(SpecError, match=re.escape(message)):
            gatedsl.check(model(f"output y = x + {expr}", "x: [B, 8]"))


def test_default_init_matches_torch_layers():
    """Linear and conv weights and biases default to U(±1/sqrt(fan_in)), exactly as nn.Linear/nn.Conv1d draw them."""
    torch.manual_seed(5)
    gm = gatedsl.compile(model("output y = linear(x, 16)", "x: [B, 40]"))
    torch.manual_seed(5)
    lin = torch.nn.Linear(40, 16)
    torch.testing.assert_close(P(gm, "y.x_proj.weight"), lin.weight, atol=1e-7, rtol=0)
    torch.testing.assert_close(P(gm, "y.x_proj.bias"), lin.bias, atol=1e-7, rtol=0)
    torch.manual_seed(5)
    gm = gatedsl.compile(model("output y = conv1d(x, 6, 3, groups=2)", "x: [B, T, 4]"))
    torch.manual_seed(5)
    conv = torch.nn.Conv1d(4, 6, 3, groups=2)
    torch.testing.assert_close(P(gm, "y.conv.weight"), conv.weight, atol=1e-7, rtol=0)
    torch.testing.assert_close(P(gm, "y.conv.bias"), conv.bias, atol=1e-7, rtol=0)
    # And the bound itself, on a big layer.
    torch.manual_seed(0)
    gm = gatedsl.compile(model("output y = linear(x, 500)", "x: [B, 64]"))
    w, b = P(gm, "y.x_proj.weight"), P(gm, "y.x_proj.bias")
    assert w.abs().max() <= 1 / 8 and w.abs().max() > 0.99 / 8 and b.abs().max() <= 1 / 8
    # Norms start at the identity.
    gm = gatedsl.compile(model("output y = layer_norm(x) + rms_norm(x)", "x: [B, 4]"))
    assert torch.equal(P(gm, "y.norm.weight"), torch.ones(4)) and torch.equal(P(gm, "y.norm.bias"), torch.zeros(4))
    assert torch.equal(P(gm, "y.norm_1.weight"), torch.ones(4))


@pytest.mark.parametrize("expr,name,value", [
    ("linear(x, 4, init=zeros)", "y.x_proj.weight", 0.0),
    ("linear(x, 4, init=constant(0.5), bias_init=ones)", "y.x_proj.bias", 1.0),
    ("linear(x, 4, init=constant(0.5), bias_init=ones)", "y.x_proj.weight", 0.5),
    ("conv1d(x, 4, 3, init=ones, bias_init=constant(-2))", "y.conv.bias", -2.0),
    ("conv1d(x, 4, 3, init=ones, bias_init=constant(-2))", "y.conv.weight", 1.0),
    ("depthwise_conv2d(unsqueeze(x, 1), 1, init=constant(3))", "y.conv.weight", 3.0),
    ("embedding(to_int(x[:, 0]), 3, 4, init=zeros)", "y.embedding.weight", 0.0),
])
def test_init_overrides(expr, name, value):
    gm = gatedsl.compile(model(f"output y = {expr}", "x: [B, T, 4]"))
    assert torch.all(P(gm, name) == value)


# --------------------------------------------------------------- fills
FILL_CASES = [
    ("zeros([2, 3]) + 0 * x[0, 0]", lambda x: torch.zeros(2, 3, dtype=DT) + 0 * x[0, 0]),
    ("ones([size(x, 0), 4]) * x", lambda x: x * 1),
    ("full([size(x, 0), 1], 2.5) * x", lambda x: x * 2.5),
    ("zeros_like(x) + x", lambda x: x + 0),
    ("ones_like(x) * 3", lambda x: torch.full_like(x, 3.0)),
    ("full_like(x, -1.5)", lambda x: torch.full_like(x, -1.5)),
    ("zeros([3])", lambda x: torch.zeros(3, dtype=DT)),
    ("full([size(x, 1) * 2], 7.0)", lambda x: torch.full((8,), 7.0, dtype=DT)),
]


@pytest.mark.parametrize("expr,ref", FILL_CASES, ids=[c[0] for c in FILL_CASES])
def test_fills(expr, ref):
    check(model(f"output y = {expr}", "x: [B, 4]"), [randn(3, 4)], lambda gm, x: ref(x))


def test_fill_like_keeps_dtype():
    spec = model("output a = zeros_like(i)\noutput b = ones_like(m)\noutput c = full_like(i, 3)", "i: int[B]", "m: bool[B]")
    check(spec, [ints(3), bools(3)], lambda gm, i, m: (torch.zeros_like(i), torch.ones_like(m), torch.full_like(i, 3)))


def test_every_builtin_is_exercised():
    """A guard: a new primitive needs a test here."""
    from gatedsl.ir.builtins import builtin_names

    tested = set(UNARY) | {
        "linear", "matmul", "einsum", "maximum", "minimum", "where", "clamp", "to_float", "to_int", "to_bool",
        "binary", "softmax", "log_softmax", "topk", "topk_softmax", "topk_mask", "layer_norm", "rms_norm",
        "group_norm", "conv1d", "conv2d", "depthwise_conv1d", "depthwise_conv2d", "avg_pool1d", "max_pool1d",
        "avg_pool2d", "max_pool2d", "reshape", "flatten", "transpose", "permute", "unsqueeze", "squeeze", "split",
        "chunk", "concat", "stack", "split_heads", "merge_heads", "gather", "flip", "size", "sum", "mean", "max",
        "min", "prod", "logsumexp", "cumsum", "cumprod", "attention", "embedding", "take", "one_hot",
        "dropout", "learned", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like",
        "noise_like",  # tested in tests/test_aux.py
        "rope",  # tested in tests/test_attention_primitives.py
        "shift",  # tested in tests/test_shift.py
        "param_count", "flop_count",  # budgets, tested in tests/test_search_space.py
        # static helpers, tested below
        "int", "round", "ceil", "floor", "round_up",
    }
    assert set(builtin_names()) == tested


def test_static_helpers():
    spec = model("output y = x * int(2.7) + round(2.5) + ceil(0.2) + floor(-0.5) + round_up(13, 8) + max(1, 3)",
                 "x: [B]")
    check(spec, [randn(3)], lambda gm, x: x * 2 + 2 + 1 - 1 + 16 + 3)
