"""Early exit (GATES.md §7): the `cascade` construct and std.exit, against plain PyTorch.

The reference below is written here from the equations, fed the compiled module's own
weights (fetched by name), in float64: every stage runs on every sample, giving every
exit's logits y_l and gate g_l; then, per sample, a Python loop picks the first l with
g_l > τ_l (strictly), else the last stage. Training mode must return exactly those
logits and gates (outputs and gradients); eval mode must select the same exit and
prediction per sample while running each stage only on the samples still in.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import gatedsl
from gatedsl import SpecError

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
EXACT = dict(rtol=0, atol=0)
# A stage run on a sub-batch may round the last bit of a matmul differently from the full
# batch (BLAS picks its kernel by the number of rows, e.g. gemv for one row), so values of
# eval (sub-batches) and training (the whole batch) agree to a few ulps; exits agree exactly.
SUB_BATCH = dict(rtol=1e-13, atol=1e-15)

# A stage reads the carried h and the input x (read only, per sample) and a learned scale
# made outside the cascade (shared); each stage's threshold is τ + δ·l.
NET = """
model Net(stages: int = 3, d: int = 4, classes: int = 3, tau: float = 0.5, delta: float = 0.0) {
  input x: [B, 5]
  h = tanh(linear(x, d))                                    # h_0 = tanh(A x + a)
  scale = learned([d], init=ones)                           # s, shared by every stage
  y, exit_at, ys, gs = cascade l in stages {
    h = tanh(linear(h, d) + linear(x, d, bias=false)) * scale   # h_l = tanh(W_l h_{l-1} + b_l + V_l x) ⊙ s
    gate g = sigmoid(linear(h, 1))                          # g_l = σ(w_lᵀ h_l + c_l)
    exit linear(h, classes) when g > tau + delta * l        # y_l = U_l h_l + e_l, taken when g_l > τ + δ l
  }
  output y
  output exit_at
  output ys
  output gs
  output h                                                  # h at each sample's exit
}
"""


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=DT)


def lin(x, p, name, bias=True):
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"] if bias else None)


def compile_net(params=None, seed=0, gate_scale=1.0):
    """The Net in float64; gate weights scaled by `gate_scale` to spread the gates over (0, 1)."""
    torch.manual_seed(seed)
    gm = gatedsl.compile(NET, params).double()
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".g.h_proj." in name:
                p.mul_(gate_scale)
    return gm


def reference_all(x, p, stages: int):
    """Every stage on every sample: (ys [L, B, C], gs [L, B], hs [L, B, d]), from the equations."""
    h = torch.tanh(lin(x, p, "h.x_proj"))
    ys, gs, hs = [], [], []
    for l in range(stages):
        s = f"stages.{l}."
        h = torch.tanh(lin(h, p, s + "h.h_proj") + lin(x, p, s + "h.x_proj", bias=False)) * p["scale"]
        gs.append(torch.sigmoid(lin(h, p, s + "g.h_proj"))[:, 0])
        ys.append(lin(h, p, s + "exit.h_proj"))
        hs.append(h)
    return torch.stack(ys), torch.stack(gs), torch.stack(hs)


def reference_exits(gs, thresholds) -> list[int]:
    """Per sample, the first stage whose gate is strictly above its threshold, else the last."""
    stages, batch = gs.shape
    return [next((l for l in range(stages) if gs[l, i].item() > thresholds[l]), stages - 1) for i in range(batch)]


def params_of(gm):
    return {k: v.detach().clone().requires_grad_() for k, v in gm.named_parameters()}


# ------------------------------------------------------------ training mode
@pytest.mark.parametrize("stages, d, batch, seed", [(1, 4, 3, 0), (3, 4, 7, 1), (4, 6, 5, 2)])
def test_training_runs_every_exit_like_the_reference(stages, d, batch, seed):
    gm = compile_net({"stages": stages, "d": d}, seed=seed, gate_scale=4.0).train()
    x = randn(batch, 5, seed=seed + 10)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, exit_at, ys, gs, h = gm(x_ours)

    p = params_of(gm)
    ys_ref, gs_ref, hs_ref = reference_all(x_ref, p, stages)
    exits = reference_exits(gs_ref.detach(), [0.5] * stages)
    rows = torch.arange(batch)
    y_ref, h_ref = ys_ref[exits, rows], hs_ref[exits, rows]
    for ours, theirs in ((ys, ys_ref), (gs, gs_ref), (y, y_ref), (h, h_ref)):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, **TOL)
    assert exit_at.dtype == torch.long and exit_at.tolist() == exits

    # A weighted loss over every exit and every gate, plus the selected prediction and state.
    weights = [randn(*t.shape, seed=seed + 20 + i) for i, t in enumerate((ys, gs, y, h))]
    loss = sum((t * w).sum() for t, w in zip((ys, gs, y, h), weights))
    loss_ref = sum((t * w).sum() for t, w in zip((ys_ref, gs_ref, y_ref, h_ref), weights))
    loss.backward()
    loss_ref.backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
    for name, param in gm.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, p[name].grad, **TOL, msg=name)


def test_gradient_reaches_every_gate_and_head_in_training():
    stages = 3
    gm = compile_net({"stages": stages}, seed=3).train()
    _, _, ys, gs, _ = gm(randn(6, 5, seed=4))
    # The per-exit losses a user writes: a weighted cross-entropy over every exit, and a loss on every gate.
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = sum((l + 1) / stages * F.cross_entropy(ys[l], target) for l in range(stages)) + gs.sum()
    loss.backward()
    for l in range(stages):
        for part in ("g.h_proj.weight", "g.h_proj.bias", "exit.h_proj.weight", "exit.h_proj.bias", "h.h_proj.weight"):
            grad = gm.get_parameter(f"stages.{l}.{part}").grad
            assert grad is not None and grad.abs().sum() > 0, f"stages.{l}.{part}"


def test_parameter_count_follows_the_equations():
    d, classes, stages, inputs = 6, 4, 5, 5
    report = gatedsl.check(NET, {"d": d, "classes": classes, "stages": stages})
    stage = (d * d + d) + inputs * d + (d + 1) + (d * classes + classes)  # W_l, b_l, V_l; w_l, c_l; U_l, e_l
    assert report.params == (inputs * d + d) + d + stages * stage  # A, a; s; the stages
    gm = gatedsl.compile(NET, {"d": d, "classes": classes, "stages": stages})
    assert sum(p.numel() for p in gm.parameters()) == report.params


def test_gates_and_shapes_are_reported():
    report = gatedsl.check(NET, {"stages": 3, "classes": 7})
    assert [(g.name, g.kind) for g in report.gates] == [(f"stages.{l}.g", "sigmoid") for l in range(3)]
    assert report.outputs == {"y": ["B", 7], "exit_at": ["B"], "ys": [3, "B", 7], "gs": [3, "B"], "h": ["B", 4]}
    assert report.shapes["stages.2.h"] == ["B", 4] and report.shapes["stages.0.g"] == ["B", 1]
    # FLOPs count every stage (training's cost, inference's worst case): each stage adds the same.
    flops = [gatedsl.check(NET, {"stages": n}, dims={"B": 8}).flops for n in (1, 2, 3)]
    assert flops[2] - flops[1] == flops[1] - flops[0] > 0


# ---------------------------------------------------------------- eval mode
def _eval_case(tau, delta=0.0, stages=3, batch=9, seed=11, gate_scale=4.0):
    gm = compile_net({"stages": stages, "tau": tau, "delta": delta}, seed=seed, gate_scale=gate_scale)
    x = randn(batch, 5, seed=seed + 1)
    with torch.no_grad():
        ys_ref, gs_ref, hs_ref = reference_all(x, dict(gm.named_parameters()), stages)
    exits = reference_exits(gs_ref, [tau + delta * l for l in range(stages)])
    return gm, x, ys_ref, gs_ref, hs_ref, exits


def _check_eval(gm, x, ys_ref, gs_ref, hs_ref, exits):
    stages, batch = gs_ref.shape
    rows = torch.arange(batch)
    with torch.no_grad():
        y, exit_at, ys, gs, h = gm.eval()(x)
        y_all, _, ys_all, _, h_all = gm.train()(x)  # the same module running everything
    assert exit_at.tolist() == exits
    # The prediction is that exit's logits, as running every stage and selecting per sample gives.
    torch.testing.assert_close(y, y_all, **SUB_BATCH)
    torch.testing.assert_close(y, ys_all[exits, rows], **SUB_BATCH)
    torch.testing.assert_close(y, ys_ref[exits, rows], **TOL)
    torch.testing.assert_close(h, h_all, **SUB_BATCH)
    torch.testing.assert_close(h, hs_ref[exits, rows], **TOL)
    # Stages a sample reached hold its values; the others were not run: NaN.
    reached = torch.arange(stages)[:, None] <= torch.tensor(exits)[None, :]
    assert torch.equal(torch.isnan(gs), ~reached) and torch.equal(torch.isnan(ys).all(-1), ~reached)
    torch.testing.assert_close(gs[reached], gs_ref[reached], **TOL)
    torch.testing.assert_close(ys[reached], ys_ref[reached], **TOL)


def test_eval_takes_each_samples_first_exit_that_fires():
    case = _eval_case(tau=0.5)
    exits = case[-1]
    assert set(exits) == {0, 1, 2}  # samples leave at every stage: the case tests something
    _check_eval(*case)


def test_eval_with_a_threshold_per_stage():
    case = _eval_case(tau=0.3, delta=0.25, seed=8, batch=12)
    assert len(set(case[-1])) >= 2
    _check_eval(*case)


def test_eval_when_every_sample_exits_at_the_first_stage():
    case = _eval_case(tau=0.0)  # σ(·) > 0 always
    assert case[-1] == [0] * 9
    _check_eval(*case)


def test_eval_when_no_gate_fires_takes_the_last_exit():
    case = _eval_case(tau=1.0)  # σ(·) < 1 here: nothing is strictly above 1
    assert case[-1] == [2] * 9
    _check_eval(*case)


def _rows_seen(gm, stages):
    """Forward pre-hooks on each stage's sub-module recording the rows of x it is given."""
    seen = {l: [] for l in range(stages)}
    for l in range(stages):
        stage = gm.get_submodule(f"stages.{l}")
        stage.register_forward_pre_hook(lambda module, args, l=l: seen[l].append(args[1].clone()))
    return seen


@pytest.mark.parametrize("tau", [0.5, 0.0, 1.0])
def test_eval_runs_a_stage_only_on_the_samples_still_in(tau):
    gm, x, _, _, _, exits = _eval_case(tau=tau)
    seen = _rows_seen(gm, 3)
    with torch.no_grad():
        gm.eval()(x)
    exits = torch.tensor(exits)
    for l in range(3):
        still_in = x[exits >= l]
        if len(still_in) == 0:
            assert seen[l] == [], f"stage {l} ran though every sample had left"
        else:
            (rows,) = seen[l]
            torch.testing.assert_close(rows, still_in, **EXACT)  # exactly those rows, in batch order
    ran = sum(len(r) for rows in seen.values() for r in rows)
    assert ran == int((exits + 1).sum())  # stage evaluations: one per sample per stage reached
    if tau == 0.0:
        assert ran == len(x)  # a third of running everything

    # Training runs every stage on every sample.
    seen = _rows_seen(gm, 3)
    gm.train()(x)
    assert all(len(seen[l]) == 1 and len(seen[l][0]) == len(x) for l in range(3))


def test_eval_never_lets_an_exited_sample_into_a_later_stage():
    """A later stage that fails on rows that should have left: eval never hits it, training does."""
    gm, x, _, _, _, exits = _eval_case(tau=0.5)
    left = x[torch.tensor(exits) == 0]

    def refuse(module, args):
        for row in left:
            if (args[1] == row).all(-1).any():
                raise RuntimeError("an exited sample reached stage 1")

    gm.get_submodule("stages.1").register_forward_pre_hook(refuse)
    with torch.no_grad():
        gm.eval()(x)
        with pytest.raises(RuntimeError, match="exited sample"):
            gm.train()(x)


def test_a_gate_exactly_at_the_threshold_does_not_exit():
    gm = compile_net({"stages": 3, "tau": 0.5}, seed=6)
    with torch.no_grad():  # stage 0's gate is σ(0) = 0.5 exactly, for every sample
        gm.get_parameter("stages.0.g.h_proj.weight").zero_()
        gm.get_parameter("stages.0.g.h_proj.bias").zero_()
    x = randn(8, 5, seed=7)
    for mode in (gm.train, gm.eval):
        with torch.no_grad():
            _, exit_at, _, gs, _ = mode()(x)
        assert torch.equal(gs[0], torch.full((8,), 0.5, dtype=DT))
        assert (exit_at > 0).all()  # g = τ is not above τ
    below = compile_net({"stages": 3, "tau": math.nextafter(0.5, 0.0)}, seed=6)
    below.load_state_dict(gm.state_dict())
    for mode in (below.train, below.eval):
        with torch.no_grad():
            assert (mode()(x)[1] == 0).all()  # just below: everyone leaves at once


def test_float32_compares_in_the_gate_dtype():
    """τ is rounded to the gate's dtype, as torch compares a tensor with a Python float."""
    gm = gatedsl.compile(NET, {"tau": 0.7})
    with torch.no_grad():
        gm.get_parameter("stages.0.g.h_proj.weight").zero_()
        gm.get_parameter("stages.0.g.h_proj.bias").fill_(math.log(0.7 / 0.3))  # σ(b) ≈ 0.7
    x = torch.randn(4, 5)
    g0 = torch.sigmoid(torch.tensor(math.log(0.7 / 0.3), dtype=torch.float32))
    fires = bool(g0 > 0.7)
    for mode in (gm.train, gm.eval):
        with torch.no_grad():
            assert bool((mode()(x)[1] == 0).all()) == fires


# ------------------------------------------------------------ the std blocks
EARLY_EXIT = """
import std.exit
model M(stages: int = 3, tau: float = 0.5, confidence: bool = false) {
  input x: [B, 6]
  y, exit_at, ys, gs = EarlyExit(x, 4, stages=stages, tau=tau, confidence=confidence)
  output y
  output exit_at
  output ys
  output gs
}
"""


def reference_early_exit(x, p, stages, confidence):
    """std.exit.EarlyExit from its equations: pre-norm residual MLP stages, linear heads, σ or max-softmax gates."""
    h = x
    ys, gs = [], []
    for l in range(stages):
        s = f"EarlyExit.stages.{l}."
        u = torch.relu(lin(F.layer_norm(h, (h.shape[-1],), p[s + "stage.u.norm.weight"], p[s + "stage.u.norm.bias"]),
                           p, s + "stage.u.proj"))
        h = h + lin(u, p, s + "stage.y.u_proj")
        logits = lin(h, p, s + "ClassifierHead.y.h_proj")
        if confidence:
            g = torch.softmax(logits, -1).max(-1).values
        else:
            g = torch.sigmoid(lin(h, p, s + "ExitGate.g.h_proj"))[:, 0]
        ys.append(logits)
        gs.append(g)
    return torch.stack(ys), torch.stack(gs)


@pytest.mark.parametrize("confidence, tau", [(False, 0.5), (True, 0.4)])
def test_std_early_exit_equals_its_equations(confidence, tau):
    stages, batch = 3, 16
    torch.manual_seed(11)
    gm = gatedsl.compile(EARLY_EXIT, {"stages": stages, "tau": tau, "confidence": confidence}).double()
    x = randn(batch, 6, seed=12) * 2
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    p = params_of(gm)
    y, exit_at, ys, gs = gm.train()(x_ours)
    ys_ref, gs_ref = reference_early_exit(x_ref, p, stages, confidence)
    exits = reference_exits(gs_ref.detach(), [tau] * stages)
    torch.testing.assert_close(ys, ys_ref, **TOL)
    torch.testing.assert_close(gs, gs_ref, **TOL)
    assert exit_at.tolist() == exits and len(set(exits)) >= 2
    torch.testing.assert_close(y, ys_ref[exits, torch.arange(batch)], **TOL)
    weights = [randn(*t.shape, seed=13 + i) for i, t in enumerate((ys, gs))]
    (ys * weights[0]).sum().add((gs * weights[1]).sum()).backward()
    (ys_ref * weights[0]).sum().add((gs_ref * weights[1]).sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
    for name, param in gm.named_parameters():
        torch.testing.assert_close(param.grad, p[name].grad, **TOL, msg=name)
    with torch.no_grad():
        y_eval, exit_eval, _, _ = gm.eval()(x)
    assert exit_eval.tolist() == exits
    torch.testing.assert_close(y_eval, ys_ref.detach()[exits, torch.arange(batch)], **TOL)


@pytest.mark.parametrize("confidence", [False, True])
def test_std_early_exit_parameters_and_gates(confidence):
    d, classes, stages = 6, 4, 3
    report = gatedsl.check(EARLY_EXIT, {"stages": stages, "confidence": confidence})
    hidden = 2 * d
    stage = 2 * d + (d * hidden + hidden) + (hidden * d + d) + (d * classes + classes) + (0 if confidence else d + 1)
    assert report.params == stages * stage  # LN; W₁, b₁; W₂, b₂; head; gate w, c
    name, kind = ("ConfidenceGate", "softmax") if confidence else ("ExitGate", "sigmoid")
    assert [(g.name, g.kind) for g in report.gates] == [(f"EarlyExit.stages.{l}.{name}.g", kind) for l in range(stages)]


def test_std_blocks_alone():
    """ExitGate, ConfidenceGate and ClassifierHead are their one-line equations."""
    spec = """
import std.exit
model M() {
  input h: [B, 5]
  logits = ClassifierHead(h, 3)
  output y = logits
  output g = ExitGate(h)
  output c = ConfidenceGate(logits)
}
"""
    gm = gatedsl.compile(spec).double()
    h = randn(4, 5, seed=14)
    p = dict(gm.named_parameters())
    y, g, c = gm(h)
    torch.testing.assert_close(y, lin(h, p, "ClassifierHead.y.h_proj"), **TOL)
    torch.testing.assert_close(g, torch.sigmoid(lin(h, p, "ExitGate.g.h_proj")), **TOL)
    torch.testing.assert_close(c, torch.softmax(y, -1).max(-1, keepdim=True).values, **TOL)
    assert [(x.name, x.kind) for x in gatedsl.check(spec).gates] == [("ExitGate.g", "sigmoid"),
                                                                     ("ConfidenceGate.g", "softmax")]


def test_exit_decisions_as_an_aux_value():
    spec = EARLY_EXIT.replace("  output exit_at\n", "  aux exit_index = to_float(exit_at)\n")
    gm = gatedsl.compile(spec).double().eval()
    x = randn(10, 6, seed=15)
    _, ys, _ = gm(x)
    exits = gatedsl.aux_outputs(gm)["exit_index"]
    assert torch.equal(torch.isnan(ys).all(-1), torch.arange(3)[:, None] > exits[None, :])


# ------------------------------------------------------ module contracts
def test_state_dict_pickle_and_deepcopy(tmp_path):
    gm = compile_net({"stages": 3}, seed=16, gate_scale=4.0).eval()
    x = randn(9, 5, seed=17)
    expected = gm(x)
    twin = gatedsl.compile(NET, {"stages": 3}).double().eval()
    twin.load_state_dict(gm.state_dict())
    path = tmp_path / "whole.pt"
    torch.save(gm, path)
    for other in (twin, torch.load(path, weights_only=False), copy.deepcopy(gm)):
        assert not other.training
        for a, b in zip(other(x), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert any(k.startswith("stages.2.exit.") for k in gm.state_dict())


def test_torch_compile_agrees_in_training_and_in_eval():
    torch.manual_seed(18)
    gm = gatedsl.compile(NET, {"stages": 3})
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".g.h_proj." in name:
                p.mul_(4.0)
    x = torch.randn(16, 5)
    compiled = torch.compile(gm)  # training: one graph; eval: graph breaks where the sub-batch is chosen
    grads = []
    for module in (compiled, gm):
        gm.zero_grad()
        y, _, ys, gs, h = module.train()(x)
        (y.sum() + ys.square().sum() + gs.sum() + h.sum()).backward()
        grads.append({name: p.grad.clone() for name, p in gm.named_parameters()})
    for name in grads[1]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-5, msg=name)
    for mode in ("train", "eval"):
        getattr(gm, mode)()
        with torch.no_grad():
            ours, eager = compiled(x), gm(x)
        for a, b in zip(ours, eager):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert len(set(eager[1].tolist())) >= 2


def test_standalone_export_runs_the_cascade(tmp_path):
    import importlib.util

    from gatedsl.backend.export import export_standalone

    with pytest.raises(ValueError, match="standalone=True"):  # -O2's fused ops need gatedsl's kernels
        export_standalone(compile_net({"stages": 3}), tmp_path / "fused.py", "Net")
    assert not (tmp_path / "fused.py").exists()
    torch.manual_seed(19)
    gm = gatedsl.compile(NET, {"stages": 3}, standalone=True).double()
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".g.h_proj." in name:
                p.mul_(4.0)
    out, _ = export_standalone(gm, tmp_path / "net.py", "Net")
    spec = importlib.util.spec_from_file_location("exported_net", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    exported = module.load().double()
    x = randn(9, 5, seed=20)
    for mode in ("train", "eval"):
        with torch.no_grad():
            for a, b in zip(getattr(exported, mode)()(x), getattr(gm, mode)()(x)):
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_graph_drawing_shows_the_stages():
    from gatedsl.api import analyse
    from gatedsl.cli.draw import to_dot

    text = to_dot(analyse(NET)).to_string()
    assert "cascade (stages)" in text and "cascade_stage (stages.2)" in text and "gate stages.1.g" in text


# ------------------------------------------------------- static checking
def _error(body: str, params: str = "", extra: str = "") -> SpecError:
    spec = f"{extra}model M(d: int = 4, tau: float = 0.5{params}) {{\n  input x: [B, 5]\n  h = linear(x, d)\n{body}\n}}\n"
    with pytest.raises(SpecError) as info:
        gatedsl.check(spec)
    return info.value


STAGE = "    h = tanh(linear(h, d))\n    gate g = sigmoid(linear(h, 1))\n"


@pytest.mark.parametrize("body, message, line", [
    ("  y = cascade 2 {\n    h = tanh(linear(h, 3))\n    gate g = sigmoid(linear(h, 1))\n    exit h when g > tau\n  }\n"
     "  output y", "h is carried from stage to stage, so it must stay [B, 4]", 5),
    ("  y = cascade 2 {\n    h = tanh(linear(h, d))\n    g = sigmoid(linear(h, 1))\n    exit h when g > tau\n  }\n"
     "  output y", "an exit fires on a gate declared with `gate`", 7),
    ("  y = cascade 2 {\n    h = tanh(linear(h, d))\n    gate g = sigmoid(linear(h, 2))\n    exit h when g > tau\n  }\n"
     "  output y", "an exit gate has one value per sample", 7),
    ("  y = cascade l in 2 {\n" + STAGE + "    exit linear(h, 3 + l) when g > tau\n  }\n  output y",
     "every stage's exit head must have one shape", 7),
    ("  y = cascade 2 {\n" + STAGE + "  }\n  output y", "a cascade stage must end in `exit", 4),
    ("  y = cascade 2 {\n" + STAGE + "    exit h when g > tau\n    exit h when g > tau\n  }\n  output y",
     "a second `exit`", 8),
    ("  exit h when h > tau\n  output y = h", "`exit` ends a stage of a cascade", 4),
    ("  y = cascade 2 {\n" + STAGE + "    output z = h\n    exit h when g > tau\n  }\n  output y",
     "`output` cannot stand inside a cascade stage", 7),
    ("  y = cascade 2 {\n" + STAGE + "    aux z = sum(h)\n    exit h when g > tau\n  }\n  output y",
     "`aux` cannot stand inside a cascade stage", 7),
    ("  y = cascade 2 {\n    z = cascade 2 {\n" + STAGE + "      exit h when g > tau\n    }\n" + STAGE
     + "    exit h when g > tau\n  }\n  output y", "a cascade cannot stand inside a cascade stage", 5),
    ("  a, b, c, e, f = cascade 2 {\n" + STAGE + "    exit h when g > tau\n  }\n  output y = a",
     "a cascade gives 4 values", 4),
    ("  y = cascade 0 {\n" + STAGE + "    exit h when g > tau\n  }\n  output y", "at least one stage", 4),
    ("  y = cascade d * 0.5 {\n" + STAGE + "    exit h when g > tau\n  }\n  output y", "static int count", 4),
    ("  y = cascade 2 {\n" + STAGE + "    exit h when g > g\n  }\n  output y", "an exit threshold is a static number", 7),
    ("  y = cascade 2 {\n" + STAGE + "    exit h[0] when g > tau\n  }\n  output y",
     "the exit head [4] and its gate [B, 1] must have the samples first", 7),
    ("  y = cascade 2 {\n" + STAGE + "    exit to_int(h) when g > tau\n  }\n  output y", "an exit head gives a float", 7),
    ("  hs = [h, h]\n  y = cascade 2 {\n    h = tanh(linear(hs[0], d))\n    gate g = sigmoid(linear(h, 1))\n"
     "    exit h when g > tau\n  }\n  output y", "'hs' is a list of 2", 6),
    ("  t = zeros([3, d])\n  y = cascade 2 {\n    t = t * 2\n    gate g = sigmoid(linear(h, 1))\n"
     "    exit h when g > tau\n  }\n  output y", "t is carried from stage to stage, so it must have one row per", 4),
    ("  y = cascade 2 {\n    gate g = sigmoid(zeros([2, 1]))\n    exit zeros([2, 4]) when g > tau\n  }\n  output y",
     "no tensor the cascade reads has the samples", 4),
])
def test_static_errors_are_located(body, message, line):
    err = _error(body)
    assert message in err.message, err.render()
    assert err.line == line, err.render()


def test_exit_and_cascade_are_keywords_only_where_they_stand():
    spec = "model M() {\n  input x: [B, 2]\n  when = x * 2\n  cascade_ = when\n  output y = cascade_ + when\n}\n"
    gatedsl.check(spec)  # `when` is a name where no `exit` is being read
    with pytest.raises(SpecError, match="unexpected '>='"):
        gatedsl.check("model M() {\n  input x: [B, 2]\n  y = cascade 1 {\n    gate g = sigmoid(x)\n"
                      "    exit x when g >= 0.5\n  }\n  output y\n}\n")


def test_a_cascade_inside_a_block():
    """A cascade in a block is named under the block; stage-local names stay in the stage; a gate may be [B]."""
    spec = """
block Stack(x: [B, D], tau: float) {
  h = x
  y, e = cascade i in 2 as levels {
    z = relu(linear(h, D))
    h = h + z
    gate g = sigmoid(sum(linear(h, 2), -1))
    exit linear(h, 2) when g > tau
  }
  return y, e
}
model M() {
  input x: [B, 3]
  y, e = Stack(x, 0.5)
  output y
  output e
}
"""
    report = gatedsl.check(spec)
    assert [g.name for g in report.gates] == ["Stack.levels.0.g", "Stack.levels.1.g"]
    assert "Stack.levels.1.z" in report.shapes and "Stack.z" not in report.shapes
    assert report.shapes["Stack.levels.0.g"] == ["B"]
    gm = gatedsl.compile(spec).double()
    x = randn(6, 3, seed=21)
    train = gm.train()(x)
    with torch.no_grad():
        evaluated = gm.eval()(x)
    assert torch.equal(train[1], evaluated[1])
    torch.testing.assert_close(train[0].detach(), evaluated[0], **SUB_BATCH)
