"""examples/moe_transformer.py runs end to end, shortened: its loss falls; its balancing losses reach the routers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_examples import load_example

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_moe_transformer_loss_falls_and_prints_the_load(capsys):
    result = load_example("moe_transformer").main(steps=30, log_every=10, d=32, hidden=32)
    assert result["final_loss"] < result["initial_loss"]
    assert result["unbalanced"]["final_loss"] < result["unbalanced"]["initial_loss"]
    for load in (result["load_before"], result["load_after"], result["unbalanced"]["load_after"]):
        assert list(load) == ["0", "1"]  # one row of shares per layer
        for shares in load.values():
            assert len(shares) == 4 and sum(shares) == pytest.approx(1.0)
    printed = capsys.readouterr().out
    for text in ("step   10", "balancing loss", "expert load before training, layer 0",
                 "expert load after training, layer 1", "without the balancing losses",
                 "blocks.1.NoisyTopKMoE.importance"):
        assert text in printed, text


def test_moe_transformer_runs_on_generated_text_without_the_corpus(monkeypatch, capsys):
    example = load_example("moe_transformer")
    monkeypatch.setattr(example, "CORPUS", EXAMPLES / "data" / "no_such_corpus.txt")
    result = example.main(steps=20, log_every=10, d=16, hidden=16, compare=False)
    assert result["final_loss"] < result["initial_loss"]
    assert "generated sentences" in capsys.readouterr().out


def test_the_balancing_losses_train_the_routers():
    """The aux losses alone give the router weights (W_g, W_n) a gradient: they reach the training loss."""
    import gatedsl

    example = load_example("moe_transformer")
    torch.manual_seed(0)
    model = gatedsl.compile(example.SPEC, params=dict(vocab=10, context=8, d=16, hidden=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".clean." in name or ".sd." in name:
                p.normal_(0, 0.5)  # away from the zero start, where the balancing losses are flat
    windows = torch.randint(10, (4, 9))
    _, balance = example.losses(model, windows)
    balance.backward()
    routers = {n: p.grad for n, p in model.named_parameters() if ".clean." in n or ".sd." in n}
    assert len(routers) == 4 and all(g is not None and g.abs().sum() > 0 for g in routers.values())
