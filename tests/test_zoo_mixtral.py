"""specs/zoo/mixtral.gate equals transformers' MixtralForCausalLM: weights imported through gatedsl/interop/mixtral.py's
model mapping (composed from the attention's and the mixture's), the same logits, the same language-modelling loss
with its load-balancing term (output_router_logits: transformers' aux_loss against gatedsl.load_balancing_loss over
the model's recorded router logits) and the same gradients of it w.r.t. every parameter, at -O0 and -O2, with and
without a sliding window, tied and untied, and with right padding (an attention_mask: the real tokens' logits and
the masked losses); exported back into a MixtralForCausalLM that loads them strictly; its published size; its
initialisation.

The reference is built from a tiny MixtralConfig with eager attention and run in float64 but for the casts
transformers makes: MixtralRMSNorm normalises in float32, eager attention takes its softmax in float32, the
language-modelling loss casts the logits to float32, and load_balancing_loss_func sums in float32. Values and
gradients agree to float32's resolution, rtol 1e-5 and atol 1e-6 (the observed differences are at most 6e-7 of the
largest entry), while a wrong weight, mask or routing moves them by far more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gatedsl
from gatedsl.interop.mapping import MappingError, export_state_dict, load_state_dict
from gatedsl.interop.mixtral import mixtral_from_transformers
from transformers_reference import assert_same_grads, ks_distance

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "specs" / "zoo" / "mixtral.gate"
TOL = dict(rtol=1e-5, atol=1e-6)


def tiny(tied=False, window=None, **extra) -> MixtralConfig:
    """2 layers, 4 query heads over 2 key/value heads, 4 experts, top-2; a load-balancing coefficient large enough
    for its gradients to count against the tolerance; eager attention, and the experts' per-expert loop written in
    the modeling file (the default, grouped_mm, is a fused kernel of the same sum that takes no float64)."""
    sizes = dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    cfg = MixtralConfig(**{**sizes, **extra}, sliding_window=window, tie_word_embeddings=tied,
                        router_aux_loss_coef=0.5, attn_implementation="eager", experts_implementation="eager")
    assert cfg._attn_implementation == "eager"
    return cfg


def params_of(cfg: MixtralConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
                rope_theta=cfg.rope_parameters["rope_theta"], sliding_window=cfg.sliding_window or 0,
                num_local_experts=cfg.num_local_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                initializer_range=cfg.initializer_range, tie_word_embeddings=cfg.tie_word_embeddings)


def mapping_of(cfg: MixtralConfig, fused: bool = True):
    return mixtral_from_transformers(cfg.num_hidden_layers, cfg.num_local_experts, tied=cfg.tie_word_embeddings,
                                     fused=fused)


def reference(cfg: MixtralConfig) -> MixtralForCausalLM:
    """transformers' model in float64, moved off its init (N(0, 0.02) makes every output tiny and the routers nearly
    uniform) to values float32 can hold."""
    torch.manual_seed(0)
    ref = MixtralForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn(p.shape).double()).copy_(p.float().double())
    return ref


def ours_from(ref: MixtralForCausalLM, opt_level: int):
    ours = gatedsl.compile(SPEC, params_of(ref.config), opt_level=opt_level).double().eval()
    assert sorted(load_state_dict(ours, ref, mapping_of(ref.config))) == sorted(k for k, _ in ours.named_parameters())
    return ours


def loss_of(logits, labels, aux, cfg, attention_mask=None):
    """MixtralForCausalLM's loss: next-token cross-entropy (labels shifted, -100 ignored) plus router_aux_loss_coef
    times the load-balancing loss over every layer's router logits."""
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    balance = gatedsl.load_balancing_loss(aux, top_k=cfg.num_experts_per_tok, attention_mask=attention_mask)
    return lm + cfg.router_aux_loss_coef * balance, balance


def test_published_size():
    """mistralai/Mixtral-8x7B-v0.1 (MixtralConfig's defaults): gatedsl check counts what transformers' model holds.
    At -O0, which has the same parameters: -O2's passes take seconds on 32 layers of 8 experts."""
    cfg = MixtralConfig()
    report = gatedsl.check(SPEC, params={"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                                         "num_hidden_layers": 32, "num_attention_heads": 32,
                                         "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2},
                           max_params=10**11, opt_level=0)
    with torch.device("meta"):
        ref = MixtralForCausalLM(cfg)
    assert report.params == sum(p.numel() for p in ref.parameters()) == 46_702_792_704


@pytest.mark.parametrize("opt_level, tied, window", [(0, False, None), (0, True, 3), (2, False, 3), (2, True, None)])
def test_mixtral_lm_equals_transformers(opt_level, tied, window):
    cfg = tiny(tied, window)
    ref = reference(cfg)
    ours = ours_from(ref, opt_level)
    mapping = mapping_of(cfg)

    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    logits = ours(ids)
    out = ref(ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(logits, out.logits, **TOL)
    loss, balance = loss_of(logits, ids, ours.aux, cfg)
    torch.testing.assert_close(balance, out.aux_loss.double(), **TOL)
    torch.testing.assert_close(loss, out.loss.double(), **TOL)
    loss.backward()
    out.loss.backward()
    assert_same_grads(ours, ref, mapping, **TOL)

    back = MixtralForCausalLM(cfg).double().eval()
    back.load_state_dict(export_state_dict(ours, mapping), strict=True)
    torch.testing.assert_close(back(ids).logits, out.logits, rtol=0, atol=0)
    if tied:
        assert back.lm_head.weight is back.model.embed_tokens.weight


@pytest.mark.parametrize("opt_level", [0, 2])
def test_right_padding_as_transformers_attention_mask(opt_level):
    """A batch padded on the right, transformers given its attention_mask and labels -100 at the padding: the real
    tokens' logits, the load-balancing loss over the real tokens (gatedsl's with the same mask) and the gradients of
    the whole loss are transformers'. Causal attention keeps the real tokens from the padding after them, so the spec
    needs no mask; the padded positions' logits differ (transformers' padded queries skip the padded keys). Every
    padded query keeps a real token in its window: transformers' eager attention gives a query with none a NaN row
    (its mask's minimum plus a negative score is -inf), which 0 · NaN carries into the next layer's real tokens."""
    cfg = tiny(window=4)
    ref = reference(cfg)
    ours = ours_from(ref, opt_level)
    ids = torch.randint(0, cfg.vocab_size, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = (torch.arange(8) < torch.tensor([8, 6, 5])[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)

    logits = ours(ids)
    out = ref(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    real = mask.bool()
    torch.testing.assert_close(logits[real], out.logits[real], **TOL)
    loss, balance = loss_of(logits, labels, ours.aux, cfg, attention_mask=mask)
    torch.testing.assert_close(balance, out.aux_loss.double(), **TOL)
    unmasked, _ = loss_of(logits, labels, ours.aux, cfg)
    assert not torch.allclose(unmasked, out.loss.double(), **TOL)  # the mask matters in this batch
    torch.testing.assert_close(loss, out.loss.double(), **TOL)
    loss.backward()
    out.loss.backward()
    assert_same_grads(ours, ref, mapping_of(cfg), **TOL)


def test_the_released_per_expert_layout_loads_and_exports():
    """Mixtral's released checkpoints (and transformers 4) hold block_sparse_moe.experts.i.w1/w2/w3: the same model
    through fused=False."""
    cfg = tiny()
    ref = reference(cfg)
    fused = ours_from(ref, 0)
    legacy = export_state_dict(fused, mapping_of(cfg, fused=False))
    assert legacy["model.layers.1.block_sparse_moe.experts.3.w2.weight"].shape == (16, 24)
    again = gatedsl.compile(SPEC, params_of(cfg), opt_level=0).double().eval()
    load_state_dict(again, legacy, mapping_of(cfg, fused=False))
    ids = torch.randint(0, cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again(ids), fused(ids), rtol=0, atol=0)


def test_a_checkpoint_of_other_sizes_is_refused_by_key_and_shapes():
    ref = MixtralForCausalLM(tiny(intermediate_size=32))
    ours = gatedsl.compile(SPEC, params_of(tiny()), opt_level=0)
    with pytest.raises(MappingError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj.*\[4, 64, 16\]"):
        load_state_dict(ours, ref, mapping_of(tiny()))


def test_an_untied_checkpoint_does_not_load_into_the_tied_spec():
    ours = gatedsl.compile(SPEC, params_of(tiny(tied=True)), opt_level=0)
    with pytest.raises(MappingError, match="not tied"):
        load_state_dict(ours, MixtralForCausalLM(tiny()), mapping_of(tiny(tied=True)))


def test_mixtral_lm_initialisation_matches_transformers():
    """Every weight N(0, initializer_range) and the norms at 1, as MixtralPreTrainedModel initialises them: the same
    distributions by a two-sample KS test at α = 0.001, the norms exactly."""
    cfg = MixtralConfig(vocab_size=500, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
    torch.manual_seed(0)
    ref = MixtralForCausalLM(cfg).state_dict()
    torch.manual_seed(1)
    ours = export_state_dict(gatedsl.compile(SPEC, params_of(cfg), opt_level=0), mapping_of(cfg))
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        if name.endswith("norm.weight"):
            assert ours[name].eq(1).all() and ref[name].eq(1).all(), name
        else:
            n = ours[name].numel()
            assert ks_distance(ours[name], ref[name]) < 1.95 * (2 / n) ** 0.5, name
