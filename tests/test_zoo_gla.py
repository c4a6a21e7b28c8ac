"""specs/zoo/gla.gate is fla's GLAForCausalLM: a tiny GLAForCausalLM built by fla's own model code, its weights
imported through gatedsl/interop/fla_gla.py's model mapping (composed from the block mappings), gives the same
logits and the same gradients of its loss, at -O0 and -O2; the weights exported back load into GLAForCausalLM with
strict=True; and the published configurations have fla's parameter counts.

The reference is fla's model (embeddings, GLABlocks with their fused-residual RMSNorms, GatedLinearAttention,
GatedMLP, the final norm, lm_head, its loss) with the Triton pieces it calls swapped for fla's plain-PyTorch forms
in float64 (tests/fla_cpu.py), and fuse_cross_entropy off (nn.CrossEntropyLoss, the same loss as fla's Triton
one). Our loss is the same next-token cross entropy over the compiled model's logits. Tolerance 1e-10 (float64).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gatedsl
from gatedsl.interop import export_state_dict, load_state_dict
from gatedsl.interop.fla_gla import gla_lm_from_fla

pytest.importorskip("fla", reason="flash-linear-attention is a test dependency (the reference model)")

SPEC = Path(__file__).resolve().parent.parent / "specs" / "zoo" / "gla.gate"
DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=4)


def fla_model(seed: int = 0, **config):
    """fla's GLAForCausalLM on a tiny GLAConfig, in float64, its weights moved off their init."""
    from fla.models import GLAConfig, GLAForCausalLM

    torch.manual_seed(seed)
    model = GLAForCausalLM(GLAConfig(**TINY, fuse_cross_entropy=False, **config)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def fla_logits_and_loss(model, tokens):
    from fla_cpu import Float64

    with Float64():
        out = model(input_ids=tokens, labels=tokens)
    return out.logits, out.loss


def next_token_loss(logits, tokens):
    """fla's loss: position t predicts token t + 1, the last position predicts nothing."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


CASES = [
    ("defaults", {}, {}),
    ("tied-conv-no-gate-eps", dict(tie_word_embeddings=True, use_short_conv=True, use_output_gate=False, norm_eps=1e-5,
                                   expand_k=1.0, hidden_ratio=2, intermediate_size=48),
     dict(tie_word_embeddings=True, use_short_conv=True, use_output_gate=False, norm_eps=1e-5, expand_k=1.0,
          intermediate_size=48)),
]


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_fla_gla_for_causal_lm(case, opt_level, monkeypatch):
    from fla_cpu import patch_fla

    patch_fla(monkeypatch)
    _, config, params = case
    ref = fla_model(**config)
    ours = gatedsl.compile(SPEC, {**TINY, **params}, opt_level=opt_level).double()
    mapping = gla_lm_from_fla(TINY["num_hidden_layers"], tie=config.get("tie_word_embeddings", False),
                              short_conv=config.get("use_short_conv", False),
                              output_gate=config.get("use_output_gate", True))
    assert sorted(load_state_dict(ours, ref, mapping)) == sorted(ours.state_dict())

    tokens = torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    logits = ours(tokens)
    loss = next_token_loss(logits, tokens)
    ref_logits, ref_loss = fla_logits_and_loss(ref, tokens)
    torch.testing.assert_close(logits, ref_logits, **TOL)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    loss.backward()
    ref_loss.backward()
    theirs = dict(ref.named_parameters(remove_duplicate=False))
    for rule in mapping.rules:
        # a tied table is one parameter on both sides: its gradient sums the embedding's and lm_head's
        ref_key, (our_key,) = rule.ref[0], rule.ours
        torch.testing.assert_close(ours.get_parameter(our_key).grad, theirs[ref_key].grad, **TOL,
                                   msg=lambda m, k=ref_key: f"{k}: {m}")

    # Out again: fla's model loads the export strictly and computes the same logits.
    exported = export_state_dict(ours, mapping)
    back = fla_model(seed=3, **config)
    back.load_state_dict(exported, strict=True)
    assert sorted(exported) == sorted(ref.state_dict())
    torch.testing.assert_close(fla_logits_and_loss(back, tokens)[0], logits.detach(), **TOL)


PUBLISHED = {  # name: (GLAConfig's arguments, the spec's parameters)
    # flame's configs/gla_340M.json (fla-org/flame, the GLA 340M training recipe of fla's examples/training.md)
    "340M": (dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, num_heads=4, tie_word_embeddings=True),
             dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=24, tie_word_embeddings=True)),
    # GLAConfig()'s defaults, printed in fla's README as the GLA model (fla-hub/gla-1.3B-100B)
    "1.3B": ({}, dict(vocab_size=32000, hidden_size=2048, num_hidden_layers=24)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    """gatedsl check, allocating nothing, counts what fla's GLAForCausalLM holds (built on the meta device)."""
    from fla.models import GLAConfig, GLAForCausalLM

    config, params = PUBLISHED[name]
    with torch.device("meta"):
        ref = GLAForCausalLM(GLAConfig(**config))
    expected = {"340M": 341_707_776, "1.3B": 1_365_514_240}[name]  # as the spec's comment states
    assert sum(p.numel() for p in ref.parameters()) == expected
    assert gatedsl.check(SPEC, params).params == expected


def test_initialisation_of_embeddings_and_head():
    """The embeddings and lm_head start from N(0, 0.02) (fla's initializer_range), the norms at 1."""
    ours = gatedsl.compile(SPEC, {**TINY, "vocab_size": 512})
    for name in ("h.embedding.weight", "logits.proj.weight"):
        w = ours.get_parameter(name)
        assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002, name
    for name, p in ours.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
