"""examples/gla_lm.py and examples/mamba_model.py run end to end, shortened, and their models learn."""

from __future__ import annotations

from pathlib import Path

import torch

import gatedsl
from test_examples import load_example

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_gla_lm_loss_falls(capsys):
    result = load_example("gla_lm").main(steps=30, d=32, window=32, log_every=10, generate=10)
    assert result["final_loss"] < result["initial_loss"] - 0.5
    printed = capsys.readouterr().out
    assert "step   10" in printed and "eval loss after training" in printed and "greedy continuation" in printed
    assert "layers.1.GLA.alpha (sigmoid)" in printed
    assert "both prompts in one batch" in printed and "a full forward of the whole text so far" in printed
    writing = result["writing"]  # decoding writes what a full forward per character writes
    assert len(writing["greedy"]) == 10 and writing["greedy"] == writing["greedy_by_full_forwards"]


def test_gla_lm_falls_back_to_generated_text(tmp_path, capsys):
    """Without examples/data/corpus.txt the example trains on generated sentences instead of failing."""
    example = load_example("gla_lm")
    example.CORPUS = tmp_path / "missing.txt"
    result = example.main(steps=20, d=32, window=32, log_every=10, generate=0)
    assert result["final_loss"] < result["initial_loss"]
    assert "generated sentences" in capsys.readouterr().out


def test_mamba_model_loss_falls(capsys):
    result = load_example("mamba_model").main(steps=40, log_every=20)
    assert result["final_loss"] < result["initial_loss"]
    printed = capsys.readouterr().out
    assert "step   20" in printed and "data tokens recalled" in printed
    assert "layers.0.Mamba.decay (sigmoid)" in printed


def test_selective_copying_data():
    """Each sequence: `copies` data tokens (ids ≥ 2) among noise (0) in the context, then GO (1) markers;
    the answers are the data tokens in order of position."""
    example = load_example("mamba_model")
    tokens, answers = example.selective_copying(50, context=12, copies=3, symbols=5,
                                                gen=torch.Generator().manual_seed(0))
    assert tokens.shape == (50, 15) and answers.shape == (50, 3)
    assert (tokens[:, 12:] == example.GO).all()
    for row, answer in zip(tokens, answers):
        context = row[:12]
        assert torch.equal(context[context != example.NOISE], answer)
    assert ((answers >= 2) & (answers < 7)).all()


def test_example_specs_check():
    for name in ("gla_lm", "mamba_model"):
        report = gatedsl.check(EXAMPLES / f"{name}.gate")
        assert report.params > 0 and report.gates
