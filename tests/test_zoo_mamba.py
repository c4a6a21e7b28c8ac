"""specs/zoo/mamba.gate equals transformers' MambaForCausalLM: weights imported through gatedsl/interop/mamba.py's model
mapping (composed from the block's), the same logits and the same gradients of the language-modelling loss at -O0 and
-O2, exported back into a MambaForCausalLM that loads them strictly; and its published size.

The reference runs on its torch path (tests/test_mamba_vs_transformers.py's fixture), in float64 but for the casts
transformers makes: MambaRMSNorm normalises in float32, residual_in_fp32 rounds the residual stream to float32, the
mixer's scan rounds B and its input to float32, and the logits come out `.float()`: values and gradients agree to
float32's resolution, rtol 1e-5 and atol 1e-6 (the observed differences are ~1e-7 relative).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gatedsl
from gatedsl.interop.mamba import mamba_lm_from_transformers
from gatedsl.interop.mapping import MappingError, export_state_dict, load_state_dict
from test_mamba_vs_transformers import torch_path  # noqa: F401 (an autouse fixture)
from transformers_reference import assert_same_grads, ks_distance

transformers = pytest.importorskip("transformers")
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "specs" / "zoo" / "mamba.gate"
TOL = dict(rtol=1e-5, atol=1e-6)


def tiny(tied=True, **extra) -> MambaConfig:
    return MambaConfig(vocab_size=37, hidden_size=20, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=3,
                       tie_word_embeddings=tied, **extra)


def params_of(cfg: MambaConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, state_size=cfg.state_size,
                num_hidden_layers=cfg.num_hidden_layers, expand=cfg.expand, conv_kernel=cfg.conv_kernel,
                use_bias=cfg.use_bias, use_conv_bias=cfg.use_conv_bias, tie_word_embeddings=cfg.tie_word_embeddings)


def mapping_of(cfg: MambaConfig):
    return mamba_lm_from_transformers(cfg.num_hidden_layers, cfg.time_step_rank, cfg.state_size, bias=cfg.use_bias,
                                      conv_bias=cfg.use_conv_bias, tied=cfg.tie_word_embeddings)


def lm_loss(logits, ids):
    """Next-token cross-entropy, as transformers' ForCausalLMLoss computes it (labels = input_ids, shifted)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_published_size():
    """state-spaces/mamba-130m: gatedsl check counts what transformers' MambaForCausalLM holds (tied head once).
    At -O0, which has the same parameters: -O2's gate-chain fusion takes seconds on 24 layers."""
    report = gatedsl.check(SPEC, params={"vocab_size": 50280, "hidden_size": 768, "num_hidden_layers": 24},
                           opt_level=0)
    cfg = MambaConfig(vocab_size=50280, hidden_size=768, num_hidden_layers=24)
    with torch.device("meta"):
        ref = MambaForCausalLM(cfg)
    assert report.params == sum(p.numel() for p in ref.parameters()) == 129_135_360


@pytest.mark.parametrize("tied, extra", [(True, {}), (False, dict(use_bias=True, residual_in_fp32=False))])
@pytest.mark.parametrize("opt_level", [0, 2])
def test_mamba_lm_equals_transformers(tied, extra, opt_level):
    cfg = tiny(tied, **extra)
    torch.manual_seed(0)
    ref = MambaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # off the init, at float32-representable values
        for p in ref.parameters():
            p.add_(0.2 * torch.randn(p.shape).double()).copy_(p.float().double())
    ours = gatedsl.compile(SPEC, params_of(cfg), opt_level=opt_level).double().eval()
    mapping = mapping_of(cfg)
    assert sorted(load_state_dict(ours, ref, mapping)) == sorted(k for k, _ in ours.named_parameters())

    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = ours(ids)
    out = ref(ids, labels=ids)
    torch.testing.assert_close(logits, out.logits.double(), **TOL)
    loss = lm_loss(logits, ids)
    torch.testing.assert_close(loss, out.loss.double(), **TOL)
    loss.backward()
    out.loss.backward()
    assert_same_grads(ours, ref, mapping, **TOL)

    back = MambaForCausalLM(cfg).double().eval()
    back.load_state_dict(export_state_dict(ours, mapping), strict=True)
    torch.testing.assert_close(back(ids).logits, out.logits, rtol=0, atol=0)
    if tied:
        assert back.lm_head.weight is back.backbone.embeddings.weight


def test_an_untied_checkpoint_does_not_load_into_the_tied_spec():
    cfg = tiny(tied=False)
    ref = MambaForCausalLM(cfg)
    ours = gatedsl.compile(SPEC, params_of(tiny(tied=True)))
    with pytest.raises(MappingError, match="not tied"):
        load_state_dict(ours, ref, mapping_of(tiny(tied=True)))


def test_mamba_lm_initialisation_matches_transformers():
    """The embeddings N(0, initializer_range), norms 1, and (rescale_prenorm_residual) out_proj scaled by
    1/√layers: the same distributions by a two-sample KS test at α = 0.001 (the mixers' own init is compared in
    tests/test_mamba_vs_transformers.py)."""
    cfg = MambaConfig(vocab_size=500, hidden_size=64, num_hidden_layers=4, rescale_prenorm_residual=True)
    torch.manual_seed(0)
    ref = MambaForCausalLM(cfg).state_dict()
    torch.manual_seed(1)
    ours = export_state_dict(gatedsl.compile(SPEC, {**params_of(cfg), "rescale_prenorm_residual": True}),
                             mapping_of(cfg))
    assert ours.keys() == ref.keys()
    for name in ("backbone.embeddings.weight", "backbone.norm_f.weight", "backbone.layers.3.norm.weight",
                 "backbone.layers.1.mixer.out_proj.weight"):
        n = ours[name].numel()
        assert ks_distance(ours[name], ref[name]) < 1.95 * (2 / n) ** 0.5, name
