"""The recurrent-cell examples run end to end, shortened, and learn: the LSTM character model and the RHN hybrid."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gatedsl
from test_examples import load_example

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOL = dict(rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------ lstm_char_lm
def test_lstm_char_lm_loss_falls(capsys):
    result = load_example("lstm_char_lm").main(steps=30, log_every=15, generate=20)
    assert result["final_loss"] < result["initial_loss"] - 0.5
    assert result["bits_per_char"] == pytest.approx(result["final_loss"] / math.log(2))
    printed = capsys.readouterr().out
    assert "step   15" in printed and "bits per character" in printed
    continuation = printed.split("the model continues 'A gate ' (sampled at temperature 0.5):\n")[1]
    assert continuation.strip().startswith("'A gate ") and len(ast.literal_eval(continuation.strip())) == len("A gate ") + 20


def test_corpus_is_the_projects_prose():
    text = (EXAMPLES / "data" / "corpus.txt").read_text(encoding="utf-8")
    assert text.startswith("# gatedsl's own prose")
    assert 19_000 <= len(text.encode()) <= 60_000
    assert "## A tour of the language" in text and "## 1. Gated recurrent cells" in text


def test_char_lm_split_holds_out_every_tenth_chunk():
    module = load_example("lstm_char_lm")
    ids = torch.arange(10_500)
    train, held_out = module.split_text(ids)
    assert torch.equal(held_out, torch.cat([torch.arange(9_000, 10_000)]))
    assert torch.equal(torch.sort(torch.cat([train, held_out])).values, ids)


@pytest.mark.parametrize("cell", ["GRU", "RHN", "TimescaleRNN"])
def test_char_lm_spec_takes_any_std_cell(cell):
    report = gatedsl.check(EXAMPLES / "lstm_char_lm.gate", {"cell": cell, "vocab": 50, "d": 16, "layers": 2})
    assert report.outputs["logits"] == ["B", "T", 50]


# -------------------------------------------------------------- rhn_hybrid
def test_rhn_hybrid_loss_falls_below_predicting_no_change(capsys):
    result = load_example("rhn_hybrid").main(steps=60, log_every=30)
    assert result["final_loss"] < result["initial_loss"] / 4
    printed = capsys.readouterr().out
    assert "step   30" in printed and "predicting no change scores" in printed


def _hybrid_params(d: int, depth: int, gating: str, attention: bool, layers: int = 1, c: int = 8) -> int:
    rhn = 2 * d * d + depth * 2 * (d * d + d)          # std.cells RHN, coupled: W_H, W_T; R and b per micro-step
    residual = {"none": 0, "additive": 0, "learned": d, "input": d * d + d}[gating]
    attn = 5 * d * d + 2 * (d // 4) + residual if attention else 0  # gated_attention, 4 heads: see test_specs.py
    return (c * d + d) + layers * (rhn + residual + attn) + (d * c + c)


@pytest.mark.parametrize("gating", ["none", "additive", "learned", "input"])
@pytest.mark.parametrize("attention", [True, False])
def test_rhn_hybrid_grid_parameter_counts(gating, attention):
    params = {"d": 16, "depth": 3, "layers": 2, "gating": gating, "attention": attention}
    report = gatedsl.check(EXAMPLES / "rhn_hybrid.gate", params)
    assert report.params == _hybrid_params(16, 3, gating, attention, layers=2)
    kinds = {g.name.split(".")[-2]: g.kind for g in report.gates}
    assert kinds.get("GatedResidual") == {"learned": "sigmoid", "input": "sigmoid"}.get(gating)
    assert ("gated_attention" in kinds) == attention


@pytest.mark.parametrize("gating", ["none", "additive", "learned", "input"])
def test_gated_residual_equals_its_equation(gating):
    """y = f, x + f, (1 − σ(w)) ⊙ x + σ(w) ⊙ f, or (1 − σ(W x + b)) ⊙ x + σ(W x + b) ⊙ f."""
    source = (f'import "{EXAMPLES / "rhn_hybrid.gate"}"\nmodel M() {{\n  input x: [B, T, 5]\n  input f: [B, T, 5]\n'
              f'  output y = GatedResidual(x, f, gating="{gating}")\n}}\n')
    model = gatedsl.compile(source).double()
    params = dict(model.named_parameters())
    ref = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    gen = torch.Generator().manual_seed(3)
    x, f = (torch.randn(2, 4, 5, dtype=torch.float64, generator=gen) for _ in range(2))
    ours = [t.clone().requires_grad_() for t in (x, f)]
    theirs = [t.clone().requires_grad_() for t in (x, f)]

    def reference(x, f):
        if gating == "none":
            return f
        if gating == "additive":
            return x + f
        if gating == "learned":
            a = torch.sigmoid(ref["GatedResidual.a"])
            return (1 - a) * x + a * f
        g = torch.sigmoid(F.linear(x, ref["GatedResidual.g.x_proj.weight"], ref["GatedResidual.g.x_proj.bias"]))
        return (1 - g) * x + g * f

    y, expected = model(*ours), reference(*theirs)
    torch.testing.assert_close(y, expected, **TOL)
    w = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    (y * w).sum().backward()
    (expected * w).sum().backward()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, **TOL)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, ref[name].grad, **TOL)
    assert sum(p.numel() for p in params.values()) == {"none": 0, "additive": 0, "learned": 5, "input": 30}[gating]
