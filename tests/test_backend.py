"""The backend's contracts: parameter names, state_dict round trips, seeding, train/eval, autograd,
torch.compile, readable code, scan and repeat semantics, static structure, parameters and inits."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F

import gatedsl
from gatedsl import SpecError

DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


def randn(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def names(gm) -> list[str]:
    return [n for n, _ in gm.named_parameters()]


def P(gm, name):
    return gm.get_parameter(name)


def lin(x, gm, path, bias=True):
    y = x @ P(gm, path + ".weight").T
    return y + P(gm, path + ".bias") if bias else y


def compile64(spec, params=None, seed=0):
    torch.manual_seed(seed)
    return gatedsl.compile(spec, params).double()


CELLS = """
cell GRU(x: [*, D], state h: [*, H]) {
  gate z = sigmoid(linear(x, H) + linear(h, H, bias=false))
  gate r = sigmoid(linear(x, H) + linear(h, H, bias=false))
  n = tanh(linear(x, H) + r * linear(h, H))
  h = (1 - z) * n + z * h
}

cell MGU(x: [*, D], state h: [*, H]) {
  gate f = sigmoid(linear(x, H) + linear(h, H, bias=false))
  n = tanh(linear(x, H) + linear(f * h, H, bias=false))
  h = (1 - f) * h + f * n
}

block SwiGLU(x: [*, D], hidden: int = 2 * D) {
  gate g = silu(linear(x, hidden, bias=false))
  return linear(g * linear(x, hidden, bias=false), D, bias=false)
}

block GLU(x: [*, D]) {
  gate g = sigmoid(linear(x, D))
  return linear(g * x, D)
}
"""

NET = CELLS + """
model Net(
  cell: {GRU, MGU} = GRU,
  d: int in 2..64 = 6,
  layers: int in 1..4 = 2,
  ffn: block = SwiGLU,
  mix: bool = true,
) {
  input x: [B, T, 3]
  h = linear(x, d)
  repeat layers {
    h = scan cell(h, H=d) over T
    if mix { h = h + ffn(h) } else { h = h * 2 }
  }
  output y = linear(h, 2)
}
"""


def gru_step(gm, path, x, h):
    z = torch.sigmoid(lin(x, gm, f"{path}.z.x_proj") + lin(h, gm, f"{path}.z.h_proj", False))
    r = torch.sigmoid(lin(x, gm, f"{path}.r.x_proj") + lin(h, gm, f"{path}.r.h_proj", False))
    n = torch.tanh(lin(x, gm, f"{path}.n.x_proj") + r * lin(h, gm, f"{path}.n.h_proj"))
    return (1 - z) * n + z * h


def mgu_step(gm, path, x, h):
    f = torch.sigmoid(lin(x, gm, f"{path}.f.x_proj") + lin(h, gm, f"{path}.f.h_proj", False))
    n = torch.tanh(lin(x, gm, f"{path}.n.x_proj") + lin(f * h, gm, f"{path}.n.proj", False))
    return (1 - f) * h + f * n


def net_ref(gm, x, cell="GRU", layers=2, d=6, ffn="SwiGLU", mix=True):
    step = gru_step if cell == "GRU" else mgu_step
    h = lin(x, gm, "h.x_proj")
    for i in range(layers):
        state = torch.zeros(x.shape[0], d, dtype=x.dtype)
        outs = []
        for t in range(x.shape[1]):
            state = step(gm, f"layers.{i}.cell", h[:, t], state)
            outs.append(state)
        h = torch.stack(outs, 1)
        if not mix:
            h = h * 2
        elif ffn == "SwiGLU":
            p = f"layers.{i}.ffn"
            g = F.silu(lin(h, gm, f"{p}.g.x_proj", False))
            h = h + lin(g * lin(h, gm, f"{p}.out.x_proj", False), gm, f"{p}.out.proj", False)
        else:
            p = f"layers.{i}.ffn"
            g = torch.sigmoid(lin(h, gm, f"{p}.g.x_proj"))
            h = h + lin(g * h, gm, f"{p}.out.proj")
    return lin(h, gm, "y.h_proj")


# ------------------------------------------------------------ parameter names
def _gru_names(path):
    out = []
    for stmt in ("z", "r"):
        out += [f"{path}.{stmt}.x_proj.weight", f"{path}.{stmt}.x_proj.bias", f"{path}.{stmt}.h_proj.weight"]
    return out + [f"{path}.n.x_proj.weight", f"{path}.n.x_proj.bias", f"{path}.n.h_proj.weight",
                  f"{path}.n.h_proj.bias"]


def test_parameter_names_are_stable_and_readable():
    gm = gatedsl.compile(NET)
    expected = ["h.x_proj.weight", "h.x_proj.bias"]
    for i in range(2):
        expected += _gru_names(f"layers.{i}.cell")
        expected += [f"layers.{i}.ffn.g.x_proj.weight", f"layers.{i}.ffn.out.x_proj.weight",
                     f"layers.{i}.ffn.out.proj.weight"]
    expected += ["y.h_proj.weight", "y.h_proj.bias"]
    assert sorted(names(gm)) == sorted(expected)
    assert names(gatedsl.compile(NET)) == names(gm)  # the same order every time
    assert list(gm.state_dict()) == names(gm)  # no buffers, nothing else
    rep = gatedsl.check(NET)
    assert rep.params == sum(p.numel() for p in gm.parameters())
    assert set(rep.params_by_block) >= {"layers.0.cell", "layers.1.ffn"}


def test_named_repeat_scope_and_index():
    spec = CELLS + """
model M(n: int = 3) {
  input x: [B, 4]
  h = x
  repeat i in n as blocks {
    h = GLU(h) * (i + 1)
  }
  output y = h
}
"""
    gm = compile64(spec)
    assert sorted(names(gm)) == sorted(f"blocks.{i}.GLU.{s}" for i in range(3) for s in (
        "g.x_proj.weight", "g.x_proj.bias", "out.proj.weight", "out.proj.bias"))
    x = randn(2, 4)
    h = x
    for i in range(3):
        p = f"blocks.{i}.GLU"
        h = lin(torch.sigmoid(lin(h, gm, f"{p}.g.x_proj")) * h, gm, f"{p}.out.proj") * (i + 1)
    torch.testing.assert_close(gm(x), h, **TOL)


@pytest.mark.parametrize("params", [{}, {"cell": "MGU", "ffn": "GLU"}])
def test_net_matches_reference(params):
    gm = compile64(NET, params)
    x = randn(2, 5, 3).requires_grad_()
    got, want = gm(x), net_ref(gm, x, **params)
    torch.testing.assert_close(got, want, **TOL)
    assert_same_grads(gm, [x], [got], [want])


# ----------------------------------------------------- state, seeds, modes
def test_state_dict_round_trip():
    a = compile64(NET, seed=1)
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    b = compile64(NET, seed=2)
    x = randn(3, 4, 3)
    assert not torch.allclose(a(x), b(x))
    buffer.seek(0)
    result = b.load_state_dict(torch.load(buffer))
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(a(x), b(x))


def test_same_seed_same_weights():
    torch.manual_seed(7)
    a = gatedsl.compile(NET)
    torch.manual_seed(7)
    b = gatedsl.compile(NET)
    torch.manual_seed(8)
    c = gatedsl.compile(NET)
    for (na, pa), (nb, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
        assert not torch.equal(pa, pc)


def test_dropout_train_and_eval():
    spec = "model M() {\n  input x: [B, T, 8]\n  h = dropout(x, 0.5)\n  output y = linear(h, 3)\n}"
    gm = compile64(spec)
    x = randn(4, 6, 8)
    assert gm.training  # like any fresh nn.Module
    gm.eval()
    torch.testing.assert_close(gm(x), lin(x, gm, "y.h_proj"), **TOL)
    torch.testing.assert_close(gm(x), gm(x), **TOL)
    gm.train()
    torch.manual_seed(3)
    y = gm(x)
    torch.manual_seed(3)
    want = lin(F.dropout(x, 0.5, training=True), gm, "y.h_proj")
    torch.testing.assert_close(y, want, **TOL)
    assert not torch.allclose(y, lin(x, gm, "y.h_proj"))
    assert not torch.allclose(gm(x), gm(x))
    dropouts = [m for m in gm.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) == 1 and dropouts[0].p == 0.5


def test_dropout_inside_a_scanned_cell_follows_the_mode():
    spec = """
cell Noisy(x: [*, D], state h: [*, D]) {
  h = dropout(x, 0.5) + h
}
model M() {
  input x: [B, T, 4]
  output y = scan Noisy(x) over T
}
"""
    gm = compile64(spec)
    x = randn(2, 5, 4)
    gm.eval()
    torch.testing.assert_close(gm(x), x.cumsum(1), **TOL)
    gm.train()
    assert not torch.allclose(gm(x), x.cumsum(1))


@pytest.mark.parametrize("params", [{}, {"cell": "MGU", "ffn": "GLU"}])
def test_autograd_reaches_every_parameter(params):
    gm = compile64(NET, params)
    x = randn(2, 4, 3).requires_grad_()
    gm(x).pow(2).sum().backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_torch_compile_agrees():
    spec = CELLS + """
model M() {
  input x: [B, T, 3]
  h = linear(x, 4)
  h = scan GRU(h, H=4) over T
  output y = layer_norm(h + SwiGLU(h))
}
"""
    torch.manual_seed(0)
    gm = gatedsl.compile(spec)
    x = torch.randn(2, 3, 3)
    compiled = torch.compile(gm)
    torch.testing.assert_close(compiled(x), gm(x), atol=1e-5, rtol=1e-5)


def test_generated_code_is_readable():
    spec = NET.replace("h = scan cell(h, H=d) over T", "h, h_last = scan cell(h, H=d) over T")
    for m in gatedsl.compile(spec).modules():  # optimised code too
        if isinstance(m, torch.fx.GraphModule):
            assert not re.search(r"object at 0x|<[\w.]+ |<lambda>|<function", m.code), m.code
    gm = gatedsl.compile(spec, opt_level=0)  # -O0: the code mirrors the spec statement by statement
    modules = [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    assert len(modules) == 3  # the model and one scanned cell per layer
    for m in modules:
        assert not re.search(r"object at 0x|<[\w.]+ |<lambda>|<function", m.code), m.code
    top = gm.code
    for stmt in ("h = ", "h_last = ", "y = "):
        assert stmt in top, top
    # Each name of a multi-target assignment names its own value.
    assert re.search(r"^\s*h_\d+ = h_\d+_h_last\[0\]$", top, re.M) or re.search(r"^\s*h(_\d+)? = \w+\[0\]", top, re.M)
    assert re.search(r"^\s*h_last(_\d+)? = \w+\[1\]", top, re.M), top
    cell = gm.get_submodule("layers.0.cell").code
    for stmt in ("z = torch.sigmoid", "r = torch.sigmoid", "n = torch.tanh", "self.z.x_proj.weight"):
        assert stmt in cell, cell


# ------------------------------------------------------------------- scan
ELMAN = """
cell Elman(x: [*, D], state h: [*, H]) {
  h = tanh(linear(x, H) + linear(h, H, bias=false))
}
"""


def elman_step(gm, path, x, h):
    return torch.tanh(lin(x, gm, f"{path}.h.x_proj") + lin(h, gm, f"{path}.h.h_proj", False))


def assert_same_grads(gm, inputs, got, want, seed=5):
    """<cotangent, output> has the same gradient w.r.t. every float input and learned tensor on both sides."""
    got, want = [g for g in got if g.is_floating_point()], [w for w in want if w.is_floating_point()]
    wrt = [x for x in inputs if x.requires_grad] + list(gm.parameters())
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(g.shape, generator=gen, dtype=g.dtype) for g in got]
    a = torch.autograd.grad(got, wrt, cots, allow_unused=True, retain_graph=True)
    b = torch.autograd.grad(want, wrt, cots, allow_unused=True, retain_graph=True)
    for t, ga, gb in zip(wrt, a, b):
        assert ga is not None and gb is not None
        torch.testing.assert_close(ga, gb, **TOL)


def run_loop(step, xs, h, reverse=False):
    """A manual loop over a list of steps; outputs stay at their time positions."""
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    outs = [None] * len(xs)
    for t in order:
        h = step(xs[t], h)
        outs[t] = h
    return outs, h


def _static_check(spec, x_inputs, outputs, dims, params=None):
    rep = gatedsl.check(spec, params)
    for (name, shape), y in zip(rep.outputs.items(), outputs):
        want = [d if isinstance(d, int) else eval(d.replace("*", " * "), {}, dict(dims)) for d in shape]
        assert want == list(y.shape), (name, shape, y.shape)


@pytest.mark.parametrize("flags", ["", "reverse", "last", "reverse last"])
def test_scan_forward_reverse_last(flags):
    spec = ELMAN + f"""
model M() {{
  input x: [B, T, 3]
  y, hT = scan Elman(x, H=4) over T {flags}
  output y
  output hT
}}
"""
    gm = compile64(spec)
    x = randn(2, 5, 3).requires_grad_()
    y, hT = gm(x)
    outs, final = run_loop(lambda xt, h: elman_step(gm, "Elman", xt, h), list(x.unbind(1)), torch.zeros(2, 4, dtype=DT),
                           reverse="reverse" in flags)
    if "last" in flags:
        want = outs[0] if "reverse" in flags else outs[-1]
        assert y.shape == (2, 4)
    else:
        want = torch.stack(outs, 1)
    torch.testing.assert_close(y, want, **TOL)
    torch.testing.assert_close(hT, final, **TOL)
    assert_same_grads(gm, [x], [y, hT], [want, final])
    _static_check(spec, [x], [y, hT], {"B": 2, "T": 5})


def test_scan_reverse_aligns_like_torch_bidirectional():
    """A reversed scan's output at t has read x[t:], as the backward half of a torch bidirectional RNN."""
    spec = ELMAN + """
model M() {
  input x: [B, T, 3]
  output y = scan Elman(x, H=4) over T reverse
}
"""
    gm = compile64(spec)
    rnn = torch.nn.RNN(3, 4, batch_first=True, bidirectional=True).double()
    with torch.no_grad():
        rnn.weight_ih_l0_reverse.copy_(P(gm, "Elman.h.x_proj.weight"))
        rnn.bias_ih_l0_reverse.copy_(P(gm, "Elman.h.x_proj.bias"))
        rnn.weight_hh_l0_reverse.copy_(P(gm, "Elman.h.h_proj.weight"))
        rnn.bias_hh_l0_reverse.zero_()
    x = randn(2, 6, 3)
    torch.testing.assert_close(gm(x), rnn(x)[0][..., 4:], **TOL)


def test_scan_initial_state_by_keyword_and_multiple_states():
    spec = """
cell Two(x: [*, D], state h: [*, H], state c: [*, H]) {
  gate f = sigmoid(linear(x, H) + linear(h, H))
  c = f * c + (1 - f) * tanh(linear(x, H))
  h = tanh(c) * 0.5 + h * 0.5
  return c * 2
}
model M() {
  input x: [B, T, 3]
  input h0: [B, 4]
  input c0: [B, 4]
  y, hT, cT = scan Two(x, c=c0, h=h0) over T
  z = scan Two(x, h=h0) over T last
  output y
  output hT
  output cT
  output z
}
"""
    gm = compile64(spec)
    x, h0, c0 = (randn(3, 4, 3, seed=1).requires_grad_(), randn(3, 4, seed=2).requires_grad_(),
                 randn(3, 4, seed=3).requires_grad_())

    def step(path):
        def run(xt, state):
            h, c = state
            f = torch.sigmoid(lin(xt, gm, f"{path}.f.x_proj") + lin(h, gm, f"{path}.f.h_proj"))
            c = f * c + (1 - f) * torch.tanh(lin(xt, gm, f"{path}.c.x_proj"))
            return torch.tanh(c) * 0.5 + h * 0.5, c
        return run

    outs, (hT, cT) = run_loop(step("Two"), list(x.unbind(1)), (h0, c0))
    y_want = torch.stack([c * 2 for _, c in outs], 1)
    outs2, _ = run_loop(step("Two_1"), list(x.unbind(1)), (h0, torch.zeros_like(h0)))
    got = gm(x, h0, c0)
    want = (y_want, hT, cT, outs2[-1][1] * 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)
    assert_same_grads(gm, [x, h0, c0], got, want)
    _static_check(spec, [x, h0, c0], got, {"B": 3, "T": 4})


def test_scan_const_argument_is_passed_to_every_step():
    spec = """
cell Ctx(x: [*, D], ctx: [*, C], state h: [*, H]) {
  h = tanh(linear(x, H) + linear(ctx, H, bias=false) + h)
}
model M() {
  input x: [B, T, 3]
  input c: [B, 5]
  output y = scan Ctx(x, c, H=4) over T
}
"""
    gm = compile64(spec)
    x, c = randn(2, 6, 3, seed=1).requires_grad_(), randn(2, 5, seed=2).requires_grad_()

    def step(xt, h):
        return torch.tanh(lin(xt, gm, "Ctx.h.x_proj") + lin(c, gm, "Ctx.h.ctx_proj", False) + h)

    outs, _ = run_loop(step, list(x.unbind(1)), torch.zeros(2, 4, dtype=DT))
    got = gm(x, c)
    torch.testing.assert_close(got, torch.stack(outs, 1), **TOL)
    assert_same_grads(gm, [x, c], [got], [torch.stack(outs, 1)])
    code = gm.code
    # Optimised, the loop reads only the hoisted projections: x's as a sequence, c's (once) as a constant;
    # x and c themselves are no longer passed to it.
    assert "(h0, y_all_h_x_proj, y_all_h_ctx_proj), ('state', 'seq', 'const')" in code


def test_a_scan_keeps_the_sequence_that_sets_its_length_when_only_constants_are_hoisted():
    spec = """
cell Drift(x: [*, D], ctx: [*, C], state h: [*, H]) {
  h = tanh(linear(ctx, H, bias=false) + h)
}
model M() {
  input x: [B, T, 3]
  input c: [B, 5]
  output y = scan Drift(x, c, H=4) over T
}
"""
    gm = compile64(spec)
    x, c = randn(2, 6, 3, seed=1), randn(2, 5, seed=2).requires_grad_()

    def step(xt, h):
        return torch.tanh(lin(c, gm, "Drift.h.ctx_proj", False) + h)

    outs, _ = run_loop(step, list(x.unbind(1)), torch.zeros(2, 4, dtype=DT))
    got = gm(x, c)
    assert got.shape == (2, 6, 4)  # x is read by nothing, but its length is the loop's
    torch.testing.assert_close(got, torch.stack(outs, 1), **TOL)
    assert_same_grads(gm, [c], [got], [torch.stack(outs, 1)])
    assert "('seq', 'state', 'const')" in gm.code


@pytest.mark.parametrize("decl,axis,time_dim,x_shape", [
    ("[T, B, 3]", "0", 0, (5, 2, 3)),
    ("[T, B, 3]", "T", 0, (5, 2, 3)),
    ("[B, T, 3]", "-2", 1, (2, 5, 3)),
    ("[B, 3, T]", "T", 2, (2, 3, 5)),
    ("[B, 3, T]", "2", 2, (2, 3, 5)),
])
def test_scan_over_explicit_and_named_axes(decl, axis, time_dim, x_shape):
    spec = ELMAN + f"""
model M() {{
  input x: {decl}
  y, hT = scan Elman(x, H=4) over {axis}
  output y
  output hT
}}
"""
    gm = compile64(spec)
    x = randn(*x_shape).requires_grad_()
    y, hT = gm(x)
    outs, final = run_loop(lambda xt, h: elman_step(gm, "Elman", xt, h), list(x.unbind(time_dim)),
                           torch.zeros(2, 4, dtype=DT))
    # Every step's output [B, 4] goes back at the scanned axis (after the dims before it).
    torch.testing.assert_close(y, torch.stack(outs, min(time_dim, 2)), **TOL)
    torch.testing.assert_close(hT, final, **TOL)
    assert_same_grads(gm, [x], [y, hT], [torch.stack(outs, min(time_dim, 2)), final])
    _static_check(spec, [x], [y, hT], {"B": 2, "T": 5})


def test_scan_over_sequences_with_the_axis_in_different_places():
    spec = """
cell C(x: [*, D], g: [*, 1], state h: [*, H]) {
  h = g * tanh(linear(x, H)) + (1 - g) * h
}
model M() {
  input x: [B, T, 3]
  input g: [T, B, 1]
  y, hT = scan C(x, g, H=4) over T reverse
  output y
  output hT
}
"""
    gm = compile64(spec)
    x = randn(2, 5, 3, seed=1).requires_grad_()
    g = torch.rand(5, 2, 1, generator=torch.Generator().manual_seed(2), dtype=DT).requires_grad_()

    def step(inputs, h):
        xt, gt = inputs
        return gt * torch.tanh(lin(xt, gm, "C.h.x_proj")) + (1 - gt) * h

    outs, final = run_loop(step, list(zip(x.unbind(1), g.unbind(0))), torch.zeros(2, 4, dtype=DT), reverse=True)
    got, want = gm(x, g), (torch.stack(outs, 1), final)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert_same_grads(gm, [x, g], got, want)
    _static_check(spec, [x, g], got, {"B": 2, "T": 5})
    with pytest.raises(SpecError, match="leading dims"):  # the `*` of x and of g must agree
        gatedsl.check(spec.replace("input g: [T, B, 1]", "input g: [T, N, 1]"))


def test_calling_a_cell_runs_one_step():
    spec = ELMAN + """
model M() {
  input x: [B, 3]
  input h: [B, 4]
  output a = Elman(x, H=4)
  output b = Elman(x, h)
}
"""
    gm = compile64(spec)
    x, h = randn(2, 3, seed=1), randn(2, 4, seed=2)
    a, b = gm(x, h)
    torch.testing.assert_close(a, elman_step(gm, "Elman", x, torch.zeros(2, 4, dtype=DT)), **TOL)
    torch.testing.assert_close(b, elman_step(gm, "Elman_1", x, h), **TOL)


def test_code_names_every_target_of_a_tuple_assignment():
    spec = ELMAN + """
model M() {
  input x: [B, T, 3]
  z, zT = scan Elman(x, H=4) over T reverse
  v, i = topk(x, 2)
  output o = z * 2 + unsqueeze(zT, 1) + v[..., :1]
}
"""
    code = gatedsl.compile(spec).code
    for line in (r"z_zT = \S*scan\(", r"z = z_zT\[0\]", r"zT = z_zT\[1\]", r"v_i = torch.topk\(", r"v = v_i\[0\]"):
        assert re.search(r"^\s*" + line, code, re.M), (line, code)


def test_scan_errors():
    with pytest.raises(SpecError, match="axis"):
        gatedsl.check(ELMAN + "model M() {\n  input x: [B, 3]\n  output y = scan Elman(x, H=4) over T\n}")
    with pytest.raises(SpecError, match="size H"):
        gatedsl.check(ELMAN + "model M() {\n  input x: [B, T, 3]\n  output y = scan Elman(x) over T\n}")


# ------------------------------------------------------ repeat, if, blocks
@pytest.mark.parametrize("layers", [1, 3])
def test_repeat_has_distinct_parameters(layers):
    gm = compile64(NET, {"layers": layers})
    scopes = {n.split(".")[1] for n in names(gm) if n.startswith("layers.")}
    assert scopes == {str(i) for i in range(layers)}
    if layers > 1:
        assert not torch.equal(P(gm, "layers.0.cell.z.x_proj.weight"), P(gm, "layers.1.cell.z.x_proj.weight"))
    x = randn(2, 3, 3)
    torch.testing.assert_close(gm(x), net_ref(gm, x, layers=layers), **TOL)
    assert gatedsl.check(NET, {"layers": layers}).params == sum(p.numel() for p in gm.parameters())


def test_if_on_a_bool_parameter_changes_the_parameters():
    with_ffn = set(names(gatedsl.compile(NET, {"mix": True})))
    without = set(names(gatedsl.compile(NET, {"mix": False})))
    assert without < with_ffn
    assert {n.split(".")[2] for n in with_ffn - without} == {"ffn"}
    gm = compile64(NET, {"mix": False})
    x = randn(2, 3, 3)
    torch.testing.assert_close(gm(x), net_ref(gm, x, mix=False), **TOL)


@pytest.mark.parametrize("params,ref", [
    ({}, {}),
    ({"cell": "MGU"}, {"cell": "MGU"}),
    ({"ffn": "GLU", "d": 5}, {"ffn": "GLU", "d": 5}),
    ({"cell": "MGU", "ffn": "GLU", "layers": 1, "mix": True}, {"cell": "MGU", "ffn": "GLU", "layers": 1}),
    ({"d": "4", "layers": "1", "mix": "false"}, {"d": 4, "layers": 1, "mix": False}),  # CLI strings
])
def test_parameter_overrides(params, ref):
    gm = compile64(NET, params)
    x = randn(2, 3, 3)
    torch.testing.assert_close(gm(x), net_ref(gm, x, **ref), **TOL)
    rep = gatedsl.check(NET, params)
    assert rep.parameters["cell"] == ref.get("cell", "GRU") and rep.parameters["ffn"] == ref.get("ffn", "SwiGLU")
    assert rep.parameters["d"] == ref.get("d", 6)


@pytest.mark.parametrize("params,message", [
    ({"d": 100}, "outside its domain"),
    ({"layers": 0}, "outside its domain"),
    ({"cell": "GLU"}, "must be one of"),
    ({"mix": 1}, "true or false"),
    ({"depth": 2}, "no parameter 'depth'"),
    ({"d": 2.5}, "static int"),
])
def test_bad_parameter_overrides(params, message):
    with pytest.raises(SpecError, match=message):
        gatedsl.check(NET, params)


def test_choice_of_activation_builtin():
    spec = "model M(act: {relu, gelu, silu} = gelu) {\n  input x: [B, 4]\n  output y = act(x)\n}"
    x = randn(3, 4)
    torch.testing.assert_close(compile64(spec)(x), F.gelu(x), **TOL)
    torch.testing.assert_close(compile64(spec, {"act": "silu"})(x), F.silu(x), **TOL)


# --------------------------------------------------- shapes and signatures
def test_symbolic_dims_are_unified_across_the_model():
    ok = "model M() {\n  input x: [B, T, 8]\n  input c: [B, 4]\n  output y = linear(x[:, 0], 4) + c\n}"
    rep = gatedsl.check(ok)
    assert rep.outputs == {"y": ["B", 4]} and rep.inputs == {"x": ["B", "T", 8], "c": ["B", 4]}
    bad = ok.replace("x[:, 0]", "x[0, :]")  # [T, 8]: T is not B
    with pytest.raises(SpecError, match="broadcast"):
        gatedsl.check(bad)
    other = "model M() {\n  input x: [B, 4]\n  input c: [C, 4]\n  output y = x + c\n}"
    with pytest.raises(SpecError, match="broadcast"):
        gatedsl.check(other)
    block = "block F(a: [N, D], b: [N, D]) {\n  return a * b\n}\n" + other.replace("x + c", "F(x, c)")
    with pytest.raises(SpecError, match="expected N"):
        gatedsl.check(block)


def test_broadcasting():
    spec = """
model M() {
  input x: [B, T, 4]
  input r: [B, 1, 4]
  input t: [T, 1]
  input v: [4]
  w = learned([4])
  output y = x * r + t - v / 2 + w + 1
}
"""
    gm = compile64(spec)
    x, r, t, v = randn(2, 3, 4, seed=1), randn(2, 1, 4, seed=2), randn(3, 1, seed=3), randn(4, seed=4)
    torch.testing.assert_close(gm(x, r, t, v), x * r + t - v / 2 + P(gm, "w") + 1, **TOL)
    assert gatedsl.check(spec).outputs == {"y": ["B", "T", 4]}
    with pytest.raises(SpecError, match="broadcast"):
        gatedsl.check("model M() {\n  input x: [B, 4]\n  input v: [3]\n  output y = x + v\n}")


def test_multiple_inputs_and_outputs_in_declaration_order():
    spec = """
model M() {
  input b: [B, 2]
  input a: [B, 3]
  input i: int[B]
  output second = linear(a, 2) + b
  output first = b * 2
  output k = i + 1
}
"""
    gm = compile64(spec)
    b, a, i = randn(4, 2, seed=1), randn(4, 3, seed=2), torch.tensor([1, 2, 3, 4])
    out = gm(b, a, i)
    assert isinstance(out, tuple) and len(out) == 3
    torch.testing.assert_close(out[0], lin(a, gm, "second.a_proj") + b, **TOL)
    torch.testing.assert_close(out[1], b * 2, **TOL)
    assert torch.equal(out[2], i + 1)
    rep = gatedsl.check(spec)
    assert list(rep.inputs) == ["b", "a", "i"] and list(rep.outputs) == ["second", "first", "k"]
    assert rep.input_dtypes == {"b": "float", "a": "float", "i": "int"}
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["b", "a", "i"]


def test_single_output_is_not_a_tuple():
    gm = gatedsl.compile("model M() {\n  input x: [B, 2]\n  output y = x * 2\n}")
    assert isinstance(gm(torch.ones(1, 2)), torch.Tensor)


# ------------------------------------------------------------------- inits
def test_per_statement_init_override():
    spec = """
model M() {
  input x: [B, 4]
  a = linear(x, 3, init=zeros)
  b = linear(x, 3, init=constant(0.5), bias_init=ones)
  c = linear(x, 3, bias=false, init=normal(0.0, 0.01))
  output y = a + b + c
}
"""
    gm = gatedsl.compile(spec)
    assert torch.equal(P(gm, "a.x_proj.weight"), torch.zeros(3, 4))
    bound = 1 / 2  # the default bias: U(±1/sqrt(4))
    assert P(gm, "a.x_proj.bias").abs().max() <= bound and P(gm, "a.x_proj.bias").abs().max() > 0
    assert torch.equal(P(gm, "b.x_proj.weight"), torch.full((3, 4), 0.5))
    assert torch.equal(P(gm, "b.x_proj.bias"), torch.ones(3))
    assert 0 < P(gm, "c.x_proj.weight").abs().max() < 0.1
    assert "c.x_proj.bias" not in names(gm)
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), P(gm, "a.x_proj.bias") + x.sum(-1, keepdim=True) * 0.5 + 1
                               + x @ P(gm, "c.x_proj.weight").T)


def test_report_meta_and_shapes():
    gm = gatedsl.compile(NET)
    rep = gm.meta["gatedsl_report"]
    assert rep.model == "Net" and rep.outputs == {"y": ["B", "T", 2]}
    assert rep.shapes["layers.0.ffn.g"] == ["B", "T", 12]
    assert [g.name for g in rep.gates] == ["layers.0.cell.z", "layers.0.cell.r", "layers.0.ffn.g",
                                           "layers.1.cell.z", "layers.1.cell.r", "layers.1.ffn.g"]


def test_whole_module_pickles_and_deep_copies(tmp_path):
    import copy

    import gatedsl

    gm = gatedsl.compile(
        "cell C(x: [*, D], state h: [*, H]) {\n  gate z = sigmoid(linear(x, H) + linear(h, H))\n"
        "  h = z * h + (1 - z) * tanh(linear(x, H))\n}\n"
        "model M() {\n  input x: [B, T, 3]\n  output y = dropout(scan C(x, H=4) over T, 0.5)\n}\n"
    ).eval()
    x = torch.randn(2, 5, 3)
    path = tmp_path / "whole.pt"
    torch.save(gm, path)
    loaded = torch.load(path, weights_only=False)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), gm(x), rtol=0, atol=0)
    assert list(loaded.state_dict()) == list(gm.state_dict())
    twin = copy.deepcopy(gm)
    torch.testing.assert_close(twin(x), gm(x), rtol=0, atol=0)
    twin.get_parameter("C.z.x_proj.weight").data.add_(1.0)  # a deep copy shares no storage
    assert not torch.equal(twin.get_parameter("C.z.x_proj.weight"), gm.get_parameter("C.z.x_proj.weight"))


def test_a_deep_copy_pickles_and_keeps_its_dtype():
    import copy
    import pickle

    import gatedsl

    gm = gatedsl.compile(
        "cell C(x: [*, D], state h: [*, H]) {\n  h = tanh(linear(x, H) + linear(h, H))\n}\n"
        "model M() {\n  input x: [B, T, 3]\n  output y = scan C(x, H=4) over T\n}\n"
    ).double()
    twin = copy.deepcopy(gm)
    again = pickle.loads(pickle.dumps(twin))
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(again(x), gm(x), rtol=0, atol=0)
    assert all(p.dtype == torch.float64 and p.requires_grad for p in again.parameters())
