"""The feature-gate examples run end to end, shortened, and their models learn: the SwiGLU and gated-attention
transformers (character-level language models) and the HorNet image classifier."""

from __future__ import annotations

import torch
from test_examples import load_example

import gatedsl


def test_swiglu_transformer_loss_falls(capsys):
    result = load_example("swiglu_transformer").main(steps=30, log_every=15)
    assert result["final_loss"] < result["initial_loss"] - 0.5
    printed = capsys.readouterr().out
    assert "step   15  train loss" in printed and "eval loss after training" in printed and "sample:" in printed
    assert "blocks.1.SwiGLU.g (silu)" in printed


def test_gated_attention_transformer_loss_falls_and_reports_its_gates(capsys):
    result = load_example("gated_attention_transformer").main(steps=30, log_every=15)
    assert result["final_loss"] < result["initial_loss"] - 0.5
    assert set(result["gate_means"]) == {"blocks.0.gated_attention.g", "blocks.1.gated_attention.g"}
    assert all(0 < m < 1 for m in result["gate_means"].values())
    printed = capsys.readouterr().out
    assert "mean gate blocks.0.gated_attention.g" in printed and "eval loss after training" in printed


def test_gate_probe_reads_the_gates_the_model_computes():
    """The probe's values are σ(g) of the first layer, g each head's second half of q_proj's output (Qwen3-Next's
    layout: per head, its query then its gate), recomputed here from the weights."""
    example = load_example("gated_attention_transformer")
    model = gatedsl.compile(example.SPEC, params=dict(vocab=7, context=8, d=16, layers=1, heads=2)).double()
    tokens = torch.randint(7, (3, 9), generator=torch.Generator().manual_seed(0))
    p = dict(model.named_parameters())
    h = torch.nn.functional.embedding(tokens[:, :-1], p["h.embedding.weight"]) + p["position"]
    normed = torch.nn.functional.rms_norm(h, (16,), p["blocks.0.h.norm.weight"], eps=1e-6)
    queries_and_gates = normed @ p["blocks.0.gated_attention.qg.x_proj.weight"].T  # [3, 8, heads · 2 · head_dim]
    gate = torch.sigmoid(queries_and_gates.unflatten(-1, (2, 16))[..., 8:])
    means = example.gate_means(model, tokens)
    assert list(means) == ["blocks.0.gated_attention.g"]
    assert abs(means["blocks.0.gated_attention.g"] - gate.mean().item()) < 1e-12


def test_language_model_text_falls_back_to_generated_sentences(tmp_path):
    text, source = load_example("text_data").load_text(tmp_path / "missing.txt")
    assert "generated" in source and len(text) > 10_000 and text.count(".") > 1000


def test_language_model_split_holds_out_a_tenth_never_trained_on():
    text_data = load_example("text_data")
    ids = torch.arange(20_000)  # distinct ids: every window says where it came from
    train, held_out = text_data.split_text(ids)
    windows = text_data.every_window(held_out, 32)
    assert windows.shape[1] == 33 and torch.equal(windows[:, 1:].flatten(), held_out[1:len(windows) * 32 + 1])
    held = set(held_out.tolist())
    assert not held & set(train.tolist()) and len(held) + len(train) == len(ids)
    assert len(held) == len(ids) // 10  # every tenth chunk of 1,000: 2 of 20 here


def test_hornet_images_accuracy_rises(capsys):
    result = load_example("hornet_images").main(steps=60, log_every=30)
    assert result["final_loss"] < result["initial_loss"]
    assert result["final_accuracy"] > result["initial_accuracy"] + 0.2
    printed = capsys.readouterr().out
    assert "step   30  train loss" in printed and "after training" in printed


def test_drawn_shapes_are_the_labelled_shapes():
    """Without noise, a disk lights about πr² pixels, the outline square about 8r, the plus and the cross about 4r."""
    example = load_example("hornet_images")
    images, labels = example.draw_shapes(400, noise=0.0, seed=3)
    assert images.shape == (400, 16, 16, 1) and set(labels.tolist()) == {0, 1, 2, 3}
    lit = (images > 0).flatten(1).sum(1).float()
    assert (lit > 0).all()
    bright = images[images > 0]
    assert bright.min() >= 0.6 and bright.max() <= 1.4
    assert lit[labels == 0].mean() > 1.5 * lit[labels == 2].mean()  # disks fill, plus signs do not
    assert lit[labels == 0].mean() > 1.5 * lit[labels == 3].mean()
