"""The recurrent cells of std.cells (GRUOriginal, IndRNN, RHN, TimescaleRNN), the highway blocks of std.highway
and the recurrent layers of std.layers equal their equations.

Each block runs through a small wrapper model compiled with gatedsl, in float64; the reference is
plain PyTorch written here from the equations in GATES.md §1 (a loop over time, one step at a
time), fed the compiled module's own weights, fetched by name. Outputs, final states and the
gradients of a random weighting of them with respect to the inputs, the initial states and every
learned tensor are compared to 1e-10. Parameter counts are checked against the formulas of the
equations, and the gates (names and kinds) against what `gatedsl.check` reports.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import gatedsl

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=gen(seed), dtype=DT)


def sub(params: dict, prefix: str) -> dict:
    """The learned tensors under `prefix`, by their names inside it."""
    return {name[len(prefix):]: p for name, p in params.items() if name.startswith(prefix)}


def lin(x, p, name, bias=True):
    """x Wᵀ (+ b) with the weights of the projection `name`."""
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"] if bias else None)


def compare(model, inputs: list[torch.Tensor], reference, seed: int):
    """Run the compiled model and `reference(inputs, params)` on copies of the same inputs and weights; compare
    every output, then the gradients of one random weighting of the outputs w.r.t. every input and learned tensor."""
    params = dict(model.named_parameters())
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    ours_in = [x.clone().requires_grad_() for x in inputs]
    ref_in = [x.clone().requires_grad_() for x in inputs]
    outs = model(*ours_in)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    expected = reference(ref_in, ref_params)
    assert len(outs) == len(expected)
    for ours, theirs in zip(outs, expected):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, **TOL)
    weights = [randn(o.shape, seed + 1 + i) for i, o in enumerate(expected)]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    sum((o * w).sum() for o, w in zip(expected, weights)).backward()
    for ours, theirs in zip(ours_in, ref_in):
        torch.testing.assert_close(ours.grad, theirs.grad, **TOL)
    for name, p in params.items():
        assert ref_params[name].grad is not None, f"the reference does not use {name}"
        torch.testing.assert_close(p.grad, ref_params[name].grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def run_over_time(step, x, states, p, reverse=False):
    """y_t = step(x_t, states)[0] along dim -2 of x, states carried; returns (y stacked at -2, final states)."""
    steps = range(x.shape[-2] - 1, -1, -1) if reverse else range(x.shape[-2])
    outs = {}
    for t in steps:
        states = step(x[..., t, :], states, p)
        outs[t] = states[0]
    return torch.stack([outs[t] for t in range(x.shape[-2])], dim=-2), states


# --------------------------------------------------- reference cells (GATES.md §1)
def gru_step(x, states, p):  # torch.nn.GRU: n = tanh(W_n x + b_in + r ⊙ (U_n h + b_hn)), h' = (1 − z) ⊙ n + z ⊙ h
    (h,) = states
    r = torch.sigmoid(lin(x, p, "r.x_proj") + lin(h, p, "r.h_proj"))
    z = torch.sigmoid(lin(x, p, "z.x_proj") + lin(h, p, "z.h_proj"))
    n = torch.tanh(lin(x, p, "n.x_proj") + r * lin(h, p, "n.h_proj"))
    return ((1 - z) * n + z * h,)


def lstm_step(x, states, p):  # c' = f ⊙ c + i ⊙ g, h' = o ⊙ tanh(c')
    h, c = states
    i, f, o = (torch.sigmoid(lin(x, p, f"{g}.x_proj") + lin(h, p, f"{g}.h_proj")) for g in "ifo")
    g = torch.tanh(lin(x, p, "g.x_proj") + lin(h, p, "g.h_proj"))
    c = f * c + i * g
    return (o * torch.tanh(c), c)


def gru_original_step(x, states, p):
    # Cho et al. 2014: r = σ(W_r x + U_r h + b_r), z = σ(W_z x + U_z h + b_z),
    # n = tanh(W_n x + U_n (r ⊙ h) + b_n), h' = (1 − z) ⊙ n + z ⊙ h
    (h,) = states
    r = torch.sigmoid(lin(x, p, "r.x_proj") + lin(h, p, "r.h_proj", bias=False))
    z = torch.sigmoid(lin(x, p, "z.x_proj") + lin(h, p, "z.h_proj", bias=False))
    n = torch.tanh(lin(x, p, "n.x_proj") + (r * h) @ p["n.proj.weight"].T)
    return ((1 - z) * n + z * h,)


def indrnn_step(act):
    def step(x, states, p):  # Li et al. 2018: h' = act(W x + u ⊙ h + b)
        (h,) = states
        return (act(x @ p["h.x_proj.weight"].T + p["u"] * h + p["h.x_proj.bias"]),)
    return step


def rhn_step(depth: int, coupled: bool):
    def step(x, states, p):
        # Zilly et al. 2017: for l = 1..L, h_l = tanh(W_H x·[l=1] + R_H s_{l−1} + b_H),
        # t_l = σ(W_T x·[l=1] + R_T s_{l−1} + b_T), c_l = 1 − t_l or σ(W_C x·[l=1] + R_C s_{l−1} + b_C),
        # s_l = h_l ⊙ t_l + s_{l−1} ⊙ c_l
        (s,) = states
        for l in range(1, depth + 1):
            q = sub(p, f"micro.{l - 1}.")

            def pre(name):
                from_x = x @ q[f"{name}.x_proj.weight"].T if l == 1 else 0
                return from_x + s @ q[f"{name}.s_proj.weight"].T + q[f"{name}.s_proj.bias"]

            h_l = torch.tanh(pre("hl"))
            t_l = torch.sigmoid(pre("t"))
            c_l = 1 - t_l if coupled else torch.sigmoid(pre("c"))
            s = h_l * t_l + s * c_l
        return (s,)
    return step


def timescale_step(act):
    def step(x, states, p):  # h' = (1 − 1/τ) ⊙ h + (1/τ) ⊙ φ(W x + U h + b), τ = 1 + softplus(ρ)
        (h,) = states
        tau = 1 + torch.log1p(torch.exp(p["rho"]))
        cand = act(x @ p["n.x_proj.weight"].T + p["n.x_proj.bias"] + h @ p["n.h_proj.weight"].T)
        return ((1 - 1 / tau) * h + (1 / tau) * cand,)
    return step


# Per cell: the reference step, its state names, its gates (name, kind) and its parameter count for (D, H).
CELLS = {
    "GRU": dict(step=gru_step, states=("h",), gates=[("r", "sigmoid"), ("z", "sigmoid")],
                count=lambda d, h: 3 * (h * d + h + h * h + h)),
    "LSTM": dict(step=lstm_step, states=("h", "c"), gates=[("i", "sigmoid"), ("f", "sigmoid"), ("o", "sigmoid")],
                 count=lambda d, h: 4 * (h * d + h + h * h + h)),
    "GRUOriginal": dict(step=gru_original_step, states=("h",), gates=[("r", "sigmoid"), ("z", "sigmoid")],
                        count=lambda d, h: 3 * (h * d + h + h * h)),  # r, z, n: W + b + U
    "IndRNN": dict(step=indrnn_step(torch.relu), states=("h",), gates=[],
                   count=lambda d, h: h * d + h + h),  # W, b, u
    "RHN": dict(step=rhn_step(1, True), states=("s",), gates=[("micro.0.t", "sigmoid")],
                count=lambda d, h: 2 * (h * d + h * h + h)),  # depth 1, coupled: H and T
    "TimescaleRNN": dict(step=timescale_step(torch.tanh), states=("h",), gates=[("rate", "learned")],
                         count=lambda d, h: h * d + h + h * h + h),  # W, b, U, ρ
}


def rhn_count(d: int, h: int, depth: int, coupled: bool) -> int:
    k = 2 if coupled else 3  # H, T (and C): W (H x D) at the first micro-step, R (H x H) + b at every one
    return k * h * d + depth * k * (h * h + h)


# ------------------------------------------------------------------ cells
def cell_model(cell: str, d: int, hidden: int, batch_dims: int, initial: bool, extra: str = "") -> str:
    lead = ["A", "B"][-batch_dims:]
    state = CELLS[cell]["states"][0]
    lines = ["import std.cells", "model M() {", f"  input x: [{', '.join(lead)}, T, {d}]"]
    given = ""
    if initial:
        lines.append(f"  input s0: [{', '.join(lead)}, {hidden}]")
        given = f", {state}=s0"
    lines += [f"  y, last = scan {cell}(x, H={hidden}{extra}{given}) over T", "  output y", "  output last", "}"]
    return "\n".join(lines) + "\n"


CELL_SHAPES = [  # batch dims, batch, time, D, H
    ((2,), 1, 3, 4),
    ((1,), 1, 1, 1),
    ((3,), 6, 2, 5),
    ((2, 3), 4, 5, 3),
]


def check_cell(cell, step, shape, initial, seed, extra=""):
    batch, time, d, hidden = shape
    model = gatedsl.compile(cell_model(cell, d, hidden, len(batch), initial, extra)).double()
    inputs = [randn((*batch, time, d), seed)]
    if initial:
        inputs.append(randn((*batch, hidden), seed + 50))

    def reference(xs, p):
        x = xs[0]
        s0 = xs[1] if initial else torch.zeros(*batch, hidden, dtype=DT)
        y, (last,) = run_over_time(step, x, (s0,), sub(p, f"{cell}."))
        return [y, last]

    compare(model, inputs, reference, seed)
    return model


@pytest.mark.parametrize("cell", ["GRUOriginal", "IndRNN", "RHN", "TimescaleRNN"])
@pytest.mark.parametrize("shape", CELL_SHAPES, ids=lambda s: "B{}T{}D{}H{}".format("x".join(map(str, s[0])), *s[1:]))
@pytest.mark.parametrize("initial", [False, True], ids=["zero_state", "given_state"])
def test_cell_equals_its_equation(cell, shape, initial):
    check_cell(cell, CELLS[cell]["step"], shape, initial, seed=sum(shape[1:]) + 7 * initial)


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("coupled", [True, False], ids=["coupled", "uncoupled"])
def test_rhn_depth_and_coupling(depth, coupled):
    extra = f", depth={depth}, coupled={str(coupled).lower()}"
    for i, shape in enumerate([((2,), 4, 3, 5), ((2, 2), 3, 4, 2)]):
        model = check_cell("RHN", rhn_step(depth, coupled), shape, initial=i == 1, seed=10 * depth + coupled, extra=extra)
        d, hidden = shape[2], shape[3]
        assert sum(p.numel() for p in model.parameters()) == rhn_count(d, hidden, depth, coupled)
    report = gatedsl.check(cell_model("RHN", 3, 4, 1, False, extra))
    expected = [(f"RHN.micro.{l}.{g}", "sigmoid") for l in range(depth) for g in (("t",) if coupled else ("t", "c"))]
    assert [(g.name, g.kind) for g in report.gates] == expected
    assert report.params == rhn_count(3, 4, depth, coupled)


@pytest.mark.parametrize("act, fn", [("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("relu", torch.relu)])
def test_indrnn_and_timescale_take_an_activation(act, fn):
    check_cell("IndRNN", indrnn_step(fn), ((2,), 4, 3, 5), initial=True, seed=3, extra=f", act={act}")
    check_cell("TimescaleRNN", timescale_step(fn), ((2,), 4, 3, 5), initial=True, seed=4, extra=f", act={act}")


def test_gru_original_differs_from_torch_gru():
    """The two GRU variants are different functions: with the same weights the torch-variant reference fails."""
    shape = ((2,), 4, 3, 5)
    with pytest.raises(AssertionError):
        check_cell("GRUOriginal", gru_original_step_r_outside, shape, initial=False, seed=1)


def gru_original_step_r_outside(x, states, p):  # the cuDNN placement of r, on GRUOriginal's weights
    (h,) = states
    r = torch.sigmoid(lin(x, p, "r.x_proj") + lin(h, p, "r.h_proj", bias=False))
    z = torch.sigmoid(lin(x, p, "z.x_proj") + lin(h, p, "z.h_proj", bias=False))
    n = torch.tanh(lin(x, p, "n.x_proj") + r * (h @ p["n.proj.weight"].T))
    return ((1 - z) * n + z * h,)


@pytest.mark.parametrize("tau0", [1.5, 2.0, 10.0])
def test_timescale_starts_at_tau0(tau0):
    """ρ starts at softplus⁻¹(τ0 − 1), so every unit's τ = 1 + softplus(ρ) starts at τ0."""
    model = gatedsl.compile(cell_model("TimescaleRNN", 3, 6, 1, False, f", tau0={tau0}"))
    tau = 1 + F.softplus(model.get_parameter("TimescaleRNN.rho").double())
    # ρ is stored in float32 (the default dtype), so τ0 comes back to float32 rounding
    torch.testing.assert_close(tau, torch.full((6,), tau0, dtype=DT), rtol=2e-7, atol=0)


def test_indrnn_recurrent_weights_start_in_unit_interval():
    torch.manual_seed(0)
    u = gatedsl.compile(cell_model("IndRNN", 3, 500, 1, False)).get_parameter("IndRNN.u")
    assert 0 <= u.min() and u.max() <= 1 and u.std() > 0.2  # U(0, 1): std 0.289


@pytest.mark.parametrize("cell", ["GRUOriginal", "IndRNN", "RHN", "TimescaleRNN"])
@pytest.mark.parametrize("d, hidden", [(3, 4), (8, 2), (16, 32)])
def test_cell_parameter_count(cell, d, hidden):
    report = gatedsl.check(cell_model(cell, d, hidden, 1, False))
    assert report.params == CELLS[cell]["count"](d, hidden)


@pytest.mark.parametrize("cell", ["GRUOriginal", "IndRNN", "RHN", "TimescaleRNN"])
def test_cell_gates_and_kinds(cell):
    report = gatedsl.check(cell_model(cell, 3, 4, 1, False))
    assert [(g.name, g.kind) for g in report.gates] == [(f"{cell}.{n}", k) for n, k in CELLS[cell]["gates"]]


# ---------------------------------------------------------------- highway
def highway_model(d: int, lead: list[str], call: str, imports: str = "") -> str:
    return (f"import std.highway\n{imports}model M() {{\n  input x: [{', '.join(lead + [str(d)])}]\n"
            f"  output y = {call}\n}}\n")


def dense_ref(x, p, act=torch.relu):  # y = act(W x + b)
    return act(lin(x, p, "y.x_proj"))


def swiglu_ref(x, p):  # y = W_down (SiLU(x W) ⊙ x V) (Shazeer 2020)
    return (F.silu(x @ p["g.x_proj.weight"].T) * (x @ p["v.x_proj.weight"].T)) @ p["y.proj.weight"].T


def highway_ref(x, p, transform):  # T = σ(W_T x + b_T), y = T ⊙ H(x) + (1 − T) ⊙ x (Srivastava et al. 2015)
    t = torch.sigmoid(lin(x, p, "t.x_proj"))
    return t * transform(x, sub(p, "transform.")) + (1 - t) * x


HIGHWAY_SHAPES = [(5, [3]), (4, [2, 6]), (3, [2, 2, 3]), (1, [1])]  # D, leading sizes


@pytest.mark.parametrize("d, lead", HIGHWAY_SHAPES, ids=lambda v: str(v))
def test_highway_equals_its_equation(d, lead):
    names = ["A", "B", "C"][:len(lead)]
    model = gatedsl.compile(highway_model(d, names, "Highway(x)")).double()
    compare(model, [randn((*lead, d), d)], lambda xs, p: [highway_ref(xs[0], sub(p, "Highway."), dense_ref)], seed=d)
    assert sum(p.numel() for p in model.parameters()) == 2 * (d * d + d)  # W_T, b_T; W_H, b_H


def test_highway_with_another_transform_and_activation():
    """transform= takes any block [*, D] -> [*, D]: SwiGLU from std.mlp, or Dense with act=tanh."""
    d = 6
    model = gatedsl.compile(highway_model(d, ["B", "T"], "Highway(x, transform=SwiGLU, gate_bias=-2.0)",
                                          "import std.mlp\n")).double()
    compare(model, [randn((2, 3, d), 5)], lambda xs, p: [highway_ref(xs[0], sub(p, "Highway."), swiglu_ref)], seed=5)
    hidden = 16  # SwiGLU's round_up(8 * 6 // 3, 8)
    assert sum(p.numel() for p in model.parameters()) == d * d + d + 3 * d * hidden

    block = "block TanhDense(x: [*, D]) {\n  return Dense(x, act=tanh)\n}\n"
    model = gatedsl.compile(highway_model(d, ["B"], "Highway(x, transform=TanhDense)", block)).double()
    compare(model, [randn((4, d), 6)], lambda xs, p: [highway_ref(
        xs[0], sub(p, "Highway."), lambda x, q: dense_ref(x, sub(q, "Dense."), torch.tanh))], seed=6)


def test_dense_equals_its_equation():
    model = gatedsl.compile(highway_model(4, ["B"], "Dense(x, out=7, act=gelu)")).double()
    compare(model, [randn((3, 4), 8)], lambda xs, p: [dense_ref(xs[0], sub(p, "Dense."), F.gelu)], seed=8)
    assert sum(p.numel() for p in model.parameters()) == 4 * 7 + 7


@pytest.mark.parametrize("gate_bias", [-1.0, -3.0, 0.5])
def test_highway_transform_gate_bias_starts_at_gate_bias(gate_bias):
    call = "Highway(x)" if gate_bias == -1.0 else f"Highway(x, gate_bias={gate_bias})"  # -1 is the default
    model = gatedsl.compile(highway_model(8, ["B"], call))
    bias = model.get_parameter("Highway.t.x_proj.bias")
    assert torch.equal(bias, torch.full((8,), gate_bias))
    assert model.get_parameter("Highway.transform.y.x_proj.bias").std() > 0  # only the gate's bias is constant


def test_highway_gates_and_kinds():
    report = gatedsl.check(highway_model(8, ["B", "T"], "Highway(x)"))
    assert [(g.name, g.kind) for g in report.gates] == [("Highway.t", "sigmoid")]
    assert report.params == 2 * (8 * 8 + 8)


# ------------------------------------------------------------------ layers
def layer_model(call: str, d: int, time: int | str = "T") -> str:
    return f"import std.layers\nmodel M() {{\n  input x: [B, {time}, {d}]\n  output y = {call}\n}}\n"


def layer_ref(cell, x, p, prefix, hidden, bidirectional):
    """RNNLayer from the reference cell: the forward scan, [forward, reversed] when bidirectional; states from zero."""
    def scan(q, reverse):
        states = tuple(torch.zeros(*x.shape[:-2], hidden, dtype=DT) for _ in CELLS[cell]["states"])
        return run_over_time(CELLS[cell]["step"], x, states, q, reverse=reverse)[0]

    fwd = scan(sub(p, prefix + "cell."), False)
    if not bidirectional:
        return fwd
    return torch.cat([fwd, scan(sub(p, prefix + "cell_1."), True)], dim=-1)


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_rnn_layer_equals_the_scanned_reference_cell(cell, bidirectional):
    d, hidden, batch, time = 3, 4, 2, 5
    bi = str(bidirectional).lower()
    model = gatedsl.compile(layer_model(f"RNNLayer(x, cell={cell}, H={hidden}, bidirectional={bi})", d)).double()
    compare(model, [randn((batch, time, d), 20)],
            lambda xs, p: [layer_ref(cell, xs[0], p, "RNNLayer.", hidden, bidirectional)], seed=20)
    directions = 2 if bidirectional else 1
    assert sum(p.numel() for p in model.parameters()) == directions * CELLS[cell]["count"](d, hidden)


def test_rnn_layer_reversed_scan_is_reversed():
    """The backward half of a bidirectional layer reads the sequence from its end: its first output depends on
    every input, its last only on the last one."""
    model = gatedsl.compile(layer_model("RNNLayer(x, cell=GRU, H=3, bidirectional=true)", 2)).double()
    x = randn((1, 6, 2), 0).requires_grad_()
    y = model(x)
    (grad_first,) = torch.autograd.grad(y[0, 0, 3:].sum(), x, retain_graph=True)
    (grad_last,) = torch.autograd.grad(y[0, -1, 3:].sum(), x, retain_graph=True)
    assert (grad_first.abs().sum(-1) > 0).all()
    assert (grad_last[0, :-1] == 0).all() and grad_last[0, -1].abs().sum() > 0
    (fwd_first,) = torch.autograd.grad(y[0, 0, :3].sum(), x)
    assert (fwd_first[0, 1:] == 0).all()  # the forward half at t = 0 sees only x_0


@pytest.mark.parametrize("cell", ["LSTM", "GRUOriginal", "RHN"])
@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, False), (2, True), (3, True)])
def test_rnn_stack_equals_stacked_reference_layers(cell, layers, bidirectional):
    d, hidden, batch, time = 3, 4, 2, 4
    bi = str(bidirectional).lower()
    model = gatedsl.compile(layer_model(
        f"RNNStack(x, cell={cell}, H={hidden}, layers={layers}, bidirectional={bi})", d)).double()
    def reference(xs, p):
        y = xs[0]
        for i in range(layers):
            y = layer_ref(cell, y, p, f"RNNStack.layers.{i}.RNNLayer.", hidden, bidirectional)
        return [y]

    compare(model, [randn((batch, time, d), 30 + layers)], reference, seed=30 + layers)
    directions = 2 if bidirectional else 1
    count = CELLS[cell]["count"]
    assert sum(p.numel() for p in model.parameters()) == directions * (
        count(d, hidden) + (layers - 1) * count(directions * hidden, hidden))


def test_rnn_stack_default_is_two_lstm_layers_of_width_d():
    report = gatedsl.check(layer_model("RNNStack(x)", 6))
    assert report.outputs["y"] == ["B", "T", 6]
    assert report.params == 2 * CELLS["LSTM"]["count"](6, 6)
    names = [(g.name, g.kind) for g in report.gates]
    assert names == [(f"RNNStack.layers.{i}.RNNLayer.cell.{g}", "sigmoid") for i in range(2) for g in "ifo"]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rnn_layer_gates_and_kinds(bidirectional):
    bi = str(bidirectional).lower()
    report = gatedsl.check(layer_model(f"RNNLayer(x, cell=RHN, H=4, bidirectional={bi})", 3))
    expected = [("RNNLayer.cell.micro.0.t", "sigmoid")] + ([("RNNLayer.cell_1.micro.0.t", "sigmoid")] if bidirectional else [])
    assert [(g.name, g.kind) for g in report.gates] == expected


@pytest.mark.parametrize("time", ["S", 5], ids=["named_S", "static_5"])
def test_rnn_layer_scans_the_time_axis_whatever_its_name(time):
    """x: [B, S, D] or [B, 5, D]: the layer scans dim -2, not a dim that happens to be called T."""
    d = 5  # D equal to the static time length: an axis found by size would be ambiguous
    model = gatedsl.compile(layer_model("RNNLayer(x, cell=GRU, H=3, bidirectional=true)", d, time)).double()
    compare(model, [randn((2, 5, d), 40)], lambda xs, p: [layer_ref("GRU", xs[0], p, "RNNLayer.", 3, True)], seed=40)


def test_cell_that_is_not_a_cell_is_refused():
    with pytest.raises(gatedsl.SpecError, match="scan runs a cell"):
        gatedsl.compile(layer_model("RNNLayer(x, cell=Dense)", 3).replace("import std.layers",
                                                                          "import std.layers\nimport std.highway"))


# ---------------------------------------- `over T` inside a block is the block's T
SCAN_IN_BLOCK = """import std.cells
block Forward(x: [N, T, D], cell: block = GRU) {
  return scan cell(x, H=3) over T
}
model M() {
  input x: [T, S, 2]
  output y = Forward(x)
}
"""


def test_scan_over_a_block_dim_name_uses_the_block_binding():
    """Inside Forward, T is bound to the caller's S (dim 1); the caller's own T (dim 0) must not be scanned."""
    model = gatedsl.compile(SCAN_IN_BLOCK).double()
    compare(model, [randn((4, 6, 2), 50)],
            lambda xs, p: [run_over_time(gru_step, xs[0], (torch.zeros(4, 3, dtype=DT),), sub(p, "Forward.cell."))[0]],
            seed=50)
