"""The early-exit example runs end to end, shortened: its loss falls and it reports where samples left."""

from __future__ import annotations


import torch
from test_examples import load_example


def test_early_exit_classifier_loss_falls_and_exits_are_counted(capsys):
    result = load_example("early_exit_classifier").main(steps=60, log_every=30)
    assert result["final_loss"] < result["initial_loss"]
    assert sum(result["exit_counts"]) == 4_000 and len(result["exit_counts"]) == 4
    assert 1.0 <= result["mean_stages"] <= 4.0
    assert abs(result["mean_stages"] - sum((l + 1) * n for l, n in enumerate(result["exit_counts"])) / 4_000) < 1e-6
    printed = capsys.readouterr().out
    assert "step   30" in printed and "test loss after training" in printed
    assert "early exit at τ = 0.9" in printed and "stages per sample" in printed


def test_early_exit_data_follow_their_rules():
    """Easy samples sit at 4 p_c (p_c a unit prototype); hard ones carry the class as two XOR bits."""
    example = load_example("early_exit_classifier")
    x, labels, hard = example.make_data(2_000, seed=3)
    assert 0.3 < hard.float().mean() < 0.7
    xor = 2 * (x[:, 0] * x[:, 1] > 0).long() + (x[:, 2] * x[:, 3] > 0).long()
    assert torch.equal(labels[hard], xor[hard])
    easy = x[~hard]
    assert ((easy.norm(dim=-1) - 4).abs() < 2).all()
    prototypes = torch.stack([easy[labels[~hard] == c].mean(0) / 4 for c in range(4)])
    torch.testing.assert_close(prototypes.norm(dim=-1), torch.ones(4), atol=0.05, rtol=0)
    nearest = (easy @ prototypes.T).argmax(-1)
    assert (nearest == labels[~hard]).float().mean() > 0.99
