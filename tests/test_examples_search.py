"""The ablation example runs its whole grid, shortened, and its spec means what its comments say: each gating
option and the attention switch equal a plain-PyTorch model written here from the equations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import gatedsl
from test_examples import load_example

SPEC = Path(__file__).resolve().parent.parent / "examples" / "deconstruct_ablation.gate"
TOL = dict(rtol=1e-10, atol=1e-10)


def test_ablation_trains_the_whole_grid(tmp_path, capsys):
    plot = tmp_path / "ablation.png"
    rows = load_example("deconstruct_ablation").main(steps=3, seeds=(0,), plot=plot)
    assert len(rows) == 18
    assert {(r["cell"], r["gating"], r["attention"]) for r in rows} == {
        (c, g, a) for c in ("LSTM", "GRU", "RHN") for g in ("none", "additive", "input") for a in (False, True)}
    assert all(math.isfinite(r["error"]) and r["error"] > 0 and r["params"] > 0 for r in rows)
    assert [r["vs_plain"] for r in rows if r["gating"] == "none" and not r["attention"]] == [1.0, 1.0, 1.0]
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.split()[:1] in (["LSTM"], ["GRU"], ["RHN"])]
    assert len(table) == 18
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_grid_is_the_specs_three_switches():
    space = gatedsl.Space(SPEC)
    assert [d.name for d in space.dimensions] == ["cell", "gating", "attention"]
    assert space.size == 18 and len(list(space.grid())) == 18


# ------------------------------------------------------------- the spec against the equations, in float64
def _gru(x, w, prefix):
    """torch's GRU written out step by step: r, z, n, h' = (1 − z) ⊙ n + z ⊙ h, from h = 0."""
    def lin(name, v, part):
        return v @ w[f"{prefix}.{name}.{part}_proj.weight"].T + w[f"{prefix}.{name}.{part}_proj.bias"]

    h, out = torch.zeros(x.shape[0], w[f"{prefix}.r.h_proj.weight"].shape[0], dtype=x.dtype), []
    for t in range(x.shape[1]):
        xt = x[:, t]
        r = torch.sigmoid(lin("r", xt, "x") + lin("r", h, "h"))
        z = torch.sigmoid(lin("z", xt, "x") + lin("z", h, "h"))
        n = torch.tanh(lin("n", xt, "x") + r * lin("n", h, "h"))
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out, 1)


def _attention(x, w, prefix, heads=4):
    """Causal multi-head attention: softmax(q kᵀ / √d_head, future masked) v per head, merged, projected."""
    def lin(name, v, part="x"):
        return v @ w[f"{prefix}.{name}.{part}_proj.weight"].T + w[f"{prefix}.{name}.{part}_proj.bias"]

    b, t, d = x.shape
    q, k, v = (lin(n, x).reshape(b, t, heads, d // heads).transpose(1, 2) for n in "qkv")
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    return lin("y", a, "a")


def _join(x, f, gating, w, prefix):
    if gating == "none":
        return f
    if gating == "additive":
        return x + f
    g = torch.sigmoid(x @ w[f"{prefix}.g.x_proj.weight"].T + w[f"{prefix}.g.x_proj.bias"])
    return (1 - g) * x + g * f


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("gating", ["none", "additive", "input"])
def test_each_switch_is_its_equation(gating, attention):
    torch.manual_seed(0)
    model = gatedsl.compile(SPEC, {"cell": "GRU", "gating": gating, "attention": attention}).double()
    w = model.state_dict()
    x = torch.randn(3, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    h = x @ w["h.x_proj.weight"].T + w["h.x_proj.bias"]
    h = _join(h, _gru(h, w, "cell"), gating, w, "GatedResidual")
    if attention:
        h = _join(h, _attention(h, w, "causal_attention"), gating, w, "GatedResidual_1")
    expected = h @ w["y.h_proj.weight"].T + w["y.h_proj.bias"]
    got = model(x)
    torch.testing.assert_close(got, expected, **TOL)
    weights = torch.randn(got.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (grad_got,) = torch.autograd.grad((got * weights).sum(), x)
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad_got, grad_expected, **TOL)
    gates = {g.name for g in model.meta["gatedsl_report"].gates} - {"cell.r", "cell.z"}
    assert gates == ({"GatedResidual.g", "GatedResidual_1.g"} if gating == "input" and attention
                     else {"GatedResidual.g"} if gating == "input" else set())  # no gate outside the switch
