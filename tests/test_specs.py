"""Every spec under specs/ checks, compiles, runs forward and backward; the std blocks equal their equations.

Model specs are found by glob; every block and cell of the standard library (specs/std)
is run through a small wrapper model as well. The references below are plain PyTorch
written from the equations in GATES.md, fed the compiled module's own weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gatedsl
from gatedsl.api import load
from gatedsl.frontend import ast

SPECS = Path(__file__).resolve().parent.parent / "specs"
STD = SPECS / "std"
DIMS = {"B": 2, "T": 3}
TOL = dict(rtol=1e-10, atol=1e-10)

MODEL_SPECS = sorted(p for p in SPECS.rglob("*.gate") if STD not in p.parents)
# Parameter settings beyond the defaults that change the structure, per spec file.
VARIANTS = {
    "forecaster.gate": [dict(cell=c, d=32, layers=2, attention=a) for c in ("GRU", "LSTM", "MGU") for a in (True, False)],
    "gru.gate": [dict(layers=2, bidirectional=True, initial_state=True, hidden=6, input_size=3)],
    "lstm.gate": [dict(layers=2, bidirectional=True, initial_state=True, hidden=6, input_size=3)],
    "swiglu.gate": [dict(d=16, hidden=24)],
}


def _model_cases():
    for path in MODEL_SPECS:
        yield pytest.param(path, {}, id=f"{path.name}-defaults")
        for i, params in enumerate(VARIANTS.get(path.name, [])):
            yield pytest.param(path, params, id=f"{path.name}-{i}")


def run_forward_backward(spec, params=None, dims=DIMS, seed=0):
    """Check, compile, run in float64; assert shapes as reported, finite outputs and a finite gradient for every
    parameter and float input. Returns the report and the module."""
    report = gatedsl.check(spec, params)
    model = gatedsl.compile(spec, params).double()
    assert sum(p.numel() for p in model.parameters()) == report.params
    inputs = gatedsl.example_inputs(report, dims, seed=seed, dtype=torch.float64)
    for x in inputs:
        if x.is_floating_point():
            x.requires_grad_()
    outs = model(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert len(outs) == len(report.outputs)
    gen = torch.Generator().manual_seed(seed + 1)
    loss = 0
    for out, (name, shape) in zip(outs, report.outputs.items()):
        assert list(out.shape) == [d if isinstance(d, int) else _size(d, dims) for d in shape], name
        assert torch.isfinite(out).all(), name
        loss = loss + (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
    for x in inputs:
        if x.is_floating_point():
            assert x.grad is not None and torch.isfinite(x.grad).all()
    return report, model


def _size(sym: str, dims) -> int:
    return math.prod(int(f) if f.isdigit() else dims[f] for f in sym.split("*"))


@pytest.mark.parametrize("spec, params", list(_model_cases()))
def test_model_spec_compiles_and_trains(spec, params):
    run_forward_backward(spec, params)


def test_every_spec_is_found():
    names = {p.name for p in MODEL_SPECS}
    assert {"forecaster.gate", "gru.gate", "lstm.gate", "swiglu.gate"} <= names
    assert {"cells.gate", "mlp.gate", "attention.gate"} <= {p.name for p in STD.glob("*.gate")}


# ------------------------------------------------------------- std library
# Wrappers for std definitions that need more than one tensor (or a parameter with no default).
STD_WRAPPERS = {
    "gated_attention": "gated_attention(x, heads=2)",  # both against transformers in tests/test_std_attention.py
    "self_attention": "self_attention(x, heads=3)",  # RoPE turns pairs: an even head_dim
    # Cells of gated linear recurrences take several per-step tensors: feed them from x.
    "GLAStep": "scan GLAStep(x, x, x, sigmoid(x)) over T",
    "ScalarDecayStep": "scan ScalarDecayStep(x, x, x, sigmoid(x[..., :1])) over T",
    "GatedDeltaStep": "scan GatedDeltaStep(x, x, x, sigmoid(x[..., :1]), sigmoid(x[..., :1])) over T",
    "HGRNStep": "scan HGRNStep(x, sigmoid(x)) over T",
    # fla's defaults of 4 (GLA, SimpleGLA) and 8 (RetNet) heads do not divide D = 6.
    "GLA": "GLA(x, heads=3)",
    "SimpleGLA": "SimpleGLA(x, heads=3)",
    "RetNet": "RetNet(x, heads=3)",
    "SelectiveScanStep": "scan SelectiveScanStep(sigmoid(unsqueeze(x, -1) * unsqueeze(x, -2)), "
                         "unsqueeze(x, -1) * unsqueeze(x, -2), x) over T",
    "HGRN": "HGRN(x, sigmoid(x[0, 0]))",
    "gnConv": "gnConv(x, order=2)",
    "GatedLongConv": "GatedLongConv(x, kernel=3)",
    "FusionGate": "FusionGate(x, x)",
    # std.moe: Switch routes the flattened tokens [N, D]; MMoE returns one output per task.
    "SwitchMoE": "reshape(SwitchMoE(flatten(x, 0, 1)), [B, T, 6])",
    "MMoE": "concat(MMoE(x), -1)",
    "cv_squared": "x * cv_squared(x[0, 0])",
    "ClassifierHead": "ClassifierHead(x, 3)",
}


def _std_cases():
    for path in sorted(STD.glob("*.gate")):
        for d in load(path).main.definitions:
            if d.kind in ("block", "cell"):
                yield pytest.param(path, d, id=f"{path.stem}.{d.name}")


def _wrapper(module: str, d: ast.Definition) -> str | None:
    """A model running `d` on x: [B, T, 6]: a block is called, a cell scanned over T; None where it needs arguments."""
    call = STD_WRAPPERS.get(d.name)
    if call is None:
        tensors = [p for p in d.params if p.tensor is not None and not p.state]
        values = [p for p in d.params if p.tensor is None]
        if len(tensors) != 1 or any(p.default is None for p in values) or not _star_then_names(tensors[0]):
            return None
        own_dims = {e.id for e in tensors[0].tensor.dims if isinstance(e, ast.Name)}
        free = []  # state sizes not set by the input: pass each as 5
        for p in d.params:
            if p.state:
                if not _star_then_names(p):
                    return None
                free += [e.id for e in p.tensor.dims if isinstance(e, ast.Name) and e.id not in own_dims and e.id not in free]
        sizes = "".join(f", {n}=5" for n in free)
        call = f"scan {d.name}(x{sizes}) over T" if d.kind == "cell" else f"{d.name}(x)"
    return f"import std.{module}\nmodel Wrapper() {{\n  input x: [B, T, 6]\n  output y = {call}\n}}\n"


def _star_then_names(p: ast.Param) -> bool:
    dims = p.tensor.dims
    return bool(dims) and isinstance(dims[0], ast.StarDim) and all(isinstance(e, ast.Name) for e in dims[1:])


@pytest.mark.parametrize("path, definition", list(_std_cases()))
def test_std_definition_compiles_and_trains(path, definition):
    source = _wrapper(path.stem, definition)
    if source is None:
        pytest.skip(f"{definition.name} needs a wrapper in STD_WRAPPERS")
    run_forward_backward(source)


# -------------------------------------------------- references from the equations
def _double_model(source, params=None):
    model = gatedsl.compile(source, params).double()
    return model, dict(model.named_parameters())


def _check_grads(model_params: dict, reference_params: dict, names):
    for name in names:
        torch.testing.assert_close(model_params[name].grad, reference_params[name].grad, **TOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _leaves(params: dict) -> dict:
    """Copies of the compiled weights for the reference to differentiate separately."""
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


def test_swiglu_equals_its_equation():
    d = 16
    model, params = _double_model(SPECS / "swiglu.gate", {"d": d})
    hidden = model.meta["gatedsl_report"].parameters["hidden"]
    assert hidden == 48  # round_up(8 * 16 // 3, 8)
    ref = _leaves(params)
    x = torch.randn(3, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()

    def swiglu(x, p):  # y = W_down (SiLU(x W) ⊙ x V), no biases (Shazeer 2020)
        return F.silu(x @ p["SwiGLU.g.x_proj.weight"].T) * (x @ p["SwiGLU.v.x_proj.weight"].T) \
            @ p["SwiGLU.y.proj.weight"].T

    y, expected = model(x_ours), swiglu(x_ref, ref)
    torch.testing.assert_close(y, expected, **TOL)
    w = torch.randn(y.shape, dtype=torch.float64)
    (y * w).sum().backward()
    (expected * w).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
    _check_grads(params, ref, params)
    assert sum(p.numel() for p in params.values()) == 3 * d * hidden  # W, V: d x hidden; W_down: hidden x d


@pytest.mark.parametrize("d, expected_hidden", [(8, 24), (16, 48), (30, 80), (96, 256)])
def test_swiglu_default_hidden_is_8d_over_3_rounded_up_to_8(d, expected_hidden):
    report = gatedsl.check(SPECS / "swiglu.gate", {"d": d})
    assert report.parameters["hidden"] == expected_hidden
    assert report.params == 3 * d * expected_hidden


def test_glu_equals_its_equation():
    d = 6
    model, params = _double_model(f"import std.mlp\nmodel G() {{\n input x: [B, {d}]\n output y = GLU(x)\n}}")
    ref = _leaves(params)
    hidden = 16  # round_up(8 * 6 // 3, 8)
    x = torch.randn(4, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def glu(x, p):  # y = W_down ((x W + b) ⊙ σ(x V + c)) + b_down (Dauphin et al. 2017)
        v = F.linear(x, p["GLU.v.x_proj.weight"], p["GLU.v.x_proj.bias"])
        g = torch.sigmoid(F.linear(x, p["GLU.g.x_proj.weight"], p["GLU.g.x_proj.bias"]))
        return F.linear(v * g, p["GLU.y.proj.weight"], p["GLU.y.proj.bias"])

    y, expected = model(x), glu(x, ref)
    torch.testing.assert_close(y, expected, **TOL)
    y.sum().backward()
    expected.sum().backward()
    _check_grads(params, ref, params)
    assert sum(p.numel() for p in params.values()) == 2 * (d * hidden + hidden) + hidden * d + d


def test_mgu_equals_its_equation():
    d_in, hidden, batch, time = 3, 4, 2, 5
    model, params = _double_model(f"import std.cells\nmodel M() {{\n input x: [B, T, {d_in}]\n"
                                  f" y, h_last = scan MGU(x, H={hidden}) over T\n output y\n output h_last\n}}")
    ref = _leaves(params)
    x = torch.randn(batch, time, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def mgu(x, p):  # f = σ(W_f x + U_f h), h̃ = tanh(W x + U (f ⊙ h)), h' = (1 − f) ⊙ h + f ⊙ h̃ (Zhou et al. 2016)
        h = torch.zeros(batch, hidden, dtype=torch.float64)
        outs = []
        for t in range(time):
            f = torch.sigmoid(F.linear(x[:, t], p["MGU.f.x_proj.weight"], p["MGU.f.x_proj.bias"])
                              + h @ p["MGU.f.h_proj.weight"].T)
            cand = torch.tanh(F.linear(x[:, t], p["MGU.n.x_proj.weight"], p["MGU.n.x_proj.bias"])
                              + (f * h) @ p["MGU.n.proj.weight"].T)
            h = (1 - f) * h + f * cand
            outs.append(h)
        return torch.stack(outs, 1), h

    (y, h_last), (y_ref, h_ref) = model(x), mgu(x, ref)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h_last, h_ref, **TOL)
    (y.sum() + 2 * h_last.sum()).backward()
    (y_ref.sum() + 2 * h_ref.sum()).backward()
    _check_grads(params, ref, params)
    # f and the candidate each: W (H x D) + b + U (H x H)
    assert sum(p.numel() for p in params.values()) == 2 * (hidden * d_in + hidden + hidden * hidden)


# ------------------------------------------------------------- parameter counts
def _cell_params(cell: str, d_in: int, hidden: int) -> int:
    both = hidden * d_in + hidden * hidden
    return {"GRU": 3 * (both + 2 * hidden),   # r, z, n: W (H x D) + b_i + U (H x H) + b_h
            "LSTM": 4 * (both + 2 * hidden),  # i, f, g, o: the same
            "MGU": 2 * (both + hidden)}[cell]  # f, candidate: W + b + U, no second bias


@pytest.mark.parametrize("cell", ["GRU", "LSTM", "MGU"])
@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("d, layers", [(32, 1), (128, 2), (64, 4)])
def test_forecaster_parameter_count(cell, attention, d, layers):
    report = gatedsl.check(SPECS / "forecaster.gate", dict(cell=cell, attention=attention, d=d, layers=layers))
    # gated_attention, 4 heads: q_proj emits queries and gates (2 D x D), k, v, o (D x D each), q and k norms (D / 4 each)
    per_layer = _cell_params(cell, d, d) + (5 * d * d + 2 * (d // 4) if attention else 0)
    assert report.params == (8 * d + d) + layers * per_layer + (d * 8 + 8)  # embed, layers, head


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, False), (1, True), (3, True)])
def test_rnn_parameter_count(kind, layers, bidirectional):
    d_in, hidden = 5, 7
    directions = 2 if bidirectional else 1
    report = gatedsl.check(SPECS / f"{kind.lower()}.gate", dict(input_size=d_in, hidden=hidden, layers=layers,
                                                                bidirectional=bidirectional))
    expected = directions * (_cell_params(kind, d_in, hidden)
                             + (layers - 1) * _cell_params(kind, directions * hidden, hidden))
    assert report.params == expected
    torch_rnn = getattr(torch.nn, kind)(d_in, hidden, num_layers=layers, bidirectional=bidirectional)
    assert report.params == sum(p.numel() for p in torch_rnn.parameters())


def test_forecaster_gates_are_listed():
    report = gatedsl.check(SPECS / "forecaster.gate", dict(cell="LSTM", layers=2, attention=True))
    names = [g.name for g in report.gates]
    for i in range(2):
        assert {f"layers.{i}.cell.i", f"layers.{i}.cell.f", f"layers.{i}.cell.o",
                f"layers.{i}.gated_attention.g"} <= set(names)


def test_readme_first_command_and_check_on_every_model_spec():
    """`gatedsl compile specs/forecaster.gate` (the README's first command) and `gatedsl check` of every model."""
    import subprocess
    import sys

    root = SPECS.parent
    run = [sys.executable, "-m", "gatedsl"]
    compiled = subprocess.run(run + ["compile", "specs/forecaster.gate"], cwd=root, capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stderr
    checked = subprocess.run(run + ["check", *map(str, MODEL_SPECS)], cwd=root, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
