"""specs/zoo/qwen3_next.gate equals transformers' Qwen3NextForCausalLM: weights imported through
gatedsl/interop/qwen3_next.py's model mapping (composed from the blocks'), the same logits and the same gradients of
the language-modelling loss at -O0 and -O2, exported back into a Qwen3NextForCausalLM that loads them strictly; its
attention gate switched off on import; and its published size.

The reference is built from a tiny random Qwen3NextConfig with 4 layers (3 gated delta nets, then gated attention;
decoder_sparse_step=2: dense MLPs on layers 0 and 2, the shared-expert mixture on 1 and 3), eager attention and the
experts' eager loop, and runs on its torch path: the modeling file's kernel entry points (the gated delta rule's
chunked and recurrent forms, the causal convolution) are put back to the plain-PyTorch functions they wrap
(transformers_reference.use_torch_paths), so neither fla nor causal_conv1d runs, whatever is installed.
It runs in float64 but for transformers' casts to float32: its RMSNorms normalise in float32, the delta net's
recurrence, decay and gated norm compute in float32, RoPE's angles are float32 (as ours) and the routers' softmax is
float32. The logits and every gradient agree to rtol = atol = 1e-4 (the observed differences are ~1e-5 absolute on
logits of ~2, the chunked triangular solve amplifying float32's rounding as in tests/test_gated_deltanet_references.py),
while a wrong weight, layout or layer kind is off by 1e-1.
Not compared: padding. Neither std block of the mixers takes an attention_mask here (gated_attention has no
`lengths`, GatedDeltaNet no mask), so the spec offers none; pad on the right and ignore the padded outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gatedsl
from gatedsl.interop.mapping import MappingError, export_state_dict, load_state_dict
from gatedsl.interop.qwen3_next import qwen3_next_from_transformers
from transformers_reference import assert_same_grads, ks_distance, use_torch_paths

transformers = pytest.importorskip("transformers")
from transformers import Qwen3NextConfig, Qwen3NextForCausalLM  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "specs" / "zoo" / "qwen3_next.gate"
TOL = dict(rtol=1e-4, atol=1e-4)
KERNELS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
           "causal_conv1d_update")
SIZES = dict(vocab_size=37, hidden_size=16, intermediate_size=12, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=1, head_dim=8, linear_num_key_heads=2, linear_key_head_dim=4, linear_num_value_heads=4,
             linear_value_head_dim=3, linear_conv_kernel_dim=3, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=5, shared_expert_intermediate_size=7, decoder_sparse_step=2)
PUBLISHED = dict(vocab_size=151936, hidden_size=2048, intermediate_size=5120, num_hidden_layers=48,
                 num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
                 linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128, num_experts=512,
                 num_experts_per_tok=10, moe_intermediate_size=512, shared_expert_intermediate_size=512)


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """Qwen3NextGatedDeltaNet's plain-PyTorch path, never fla's or causal_conv1d's kernels."""
    use_torch_paths(monkeypatch, modeling_qwen3_next, KERNELS)


def config(**changes) -> Qwen3NextConfig:
    return Qwen3NextConfig(**{**SIZES, **changes}, attn_implementation="eager", experts_implementation="eager")


def params_of(cfg: Qwen3NextConfig, **spec_only) -> dict:
    return {**{name: getattr(cfg, name) for name in SIZES}, "attention_bias": cfg.attention_bias,
            "tie_word_embeddings": cfg.tie_word_embeddings, **spec_only}


def mapping_of(cfg: Qwen3NextConfig, attention_gate: str = "elementwise"):
    return qwen3_next_from_transformers(
        cfg.num_hidden_layers, heads=cfg.num_attention_heads, head_dim=cfg.head_dim,
        linear_key_heads=cfg.linear_num_key_heads, linear_key_head_dim=cfg.linear_key_head_dim,
        linear_value_heads=cfg.linear_num_value_heads, linear_value_head_dim=cfg.linear_value_head_dim,
        experts=cfg.num_experts, decoder_sparse_step=cfg.decoder_sparse_step, attention_gate=attention_gate,
        bias=cfg.attention_bias, tied=cfg.tie_word_embeddings)


def reference(cfg: Qwen3NextConfig) -> Qwen3NextForCausalLM:
    """The model in float64, every weight moved off its init (norms at 0, dt_bias at 1) to float32 values."""
    torch.manual_seed(0)
    ref = Qwen3NextForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn(p.shape).double()).copy_(p.float().double())
    return ref


def lm_loss(logits, ids):
    """Next-token cross-entropy, as transformers' ForCausalLMLoss computes it (labels = input_ids, shifted)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


IDS = torch.randint(0, SIZES["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


def test_published_size():
    """Qwen3-Next-80B-A3B: gatedsl check counts what transformers' Qwen3NextForCausalLM holds, 79,674,391,296.
    Checked on the first full_attention_interval layers at the published widths (3 delta nets and an attention
    layer, all with 512 experts; elaborating all 48 layers' 24,576 experts one by one takes minutes), then the
    48 layers: those 4 repeated 12 times, the embeddings, the final norm and the head once."""
    cycle = gatedsl.check(SPEC, params={**PUBLISHED, "num_hidden_layers": 4}, opt_level=0, max_params=10**11)
    with torch.device("meta"):
        ref_cycle = Qwen3NextForCausalLM(Qwen3NextConfig(**{**PUBLISHED, "num_hidden_layers": 4}))
        ref = Qwen3NextForCausalLM(Qwen3NextConfig(**PUBLISHED))
    assert cycle.params == sum(p.numel() for p in ref_cycle.parameters())
    once = 2 * PUBLISHED["vocab_size"] * PUBLISHED["hidden_size"] + PUBLISHED["hidden_size"]
    assert once + 12 * (cycle.params - once) == sum(p.numel() for p in ref.parameters()) == 79_674_391_296


@pytest.mark.parametrize("opt_level", [0, 2])
def test_qwen3_next_equals_transformers(opt_level):
    cfg = config()
    ref = reference(cfg)
    ours = gatedsl.compile(SPEC, params_of(cfg), opt_level=opt_level).double().eval()
    mapping = mapping_of(cfg)
    assert sorted(load_state_dict(ours, ref, mapping)) == sorted(k for k, _ in ours.named_parameters())

    logits = ours(IDS)
    out = ref(IDS, labels=IDS)
    torch.testing.assert_close(logits, out.logits, **TOL)
    loss = lm_loss(logits, IDS)
    torch.testing.assert_close(loss, out.loss.double(), **TOL)  # its loss is taken in float32
    loss.backward()
    out.loss.backward()
    assert_same_grads(ours, ref, mapping, **TOL)

    back = Qwen3NextForCausalLM(cfg).double().eval()
    back.load_state_dict(export_state_dict(ours, mapping), strict=True)
    torch.testing.assert_close(back(IDS).logits, out.logits, rtol=0, atol=0)


def test_tied_with_attention_biases_and_no_experts():
    """tie_word_embeddings (one table), attention_bias, and num_experts=0 (every layer's FFN a Qwen3NextMLP)."""
    cfg = config(tie_word_embeddings=True, attention_bias=True, num_experts=0)
    ref = reference(cfg)
    ours = gatedsl.compile(SPEC, params_of(cfg, num_experts=0), opt_level=2).double().eval()
    mapping = mapping_of(cfg)
    load_state_dict(ours, ref, mapping)
    torch.testing.assert_close(ours(IDS), ref(IDS).logits, **TOL)
    back = Qwen3NextForCausalLM(cfg).double().eval()
    back.load_state_dict(export_state_dict(ours, mapping), strict=True)
    assert back.lm_head.weight is back.model.embed_tokens.weight


def test_the_attention_gate_switched_off_on_import(monkeypatch):
    """attention_gate="none" loads a Qwen3-Next checkpoint with each q_proj's gate rows dropped (the queries kept, as
    the head layout [q_h; g_h] has them) and computes what Qwen3NextForCausalLM computes with its attention output gate
    held open (σ(g) = 1: its one torch.sigmoid, in Qwen3NextAttention, patched to ones for the reference's call); the
    model does not export, Qwen3NextAttention having no ungated form, and a "headwise" gate has no checkpoint."""
    cfg = config()
    ref = reference(cfg)
    mapping = mapping_of(cfg, attention_gate="none")
    for opt_level in (0, 2):
        ours = gatedsl.compile(SPEC, params_of(cfg, attention_gate="none"), opt_level=opt_level).double().eval()
        load_state_dict(ours, ref, mapping)
        q_proj = ref.model.layers[3].self_attn.q_proj.weight.reshape(2, 2 * 8, 16)
        torch.testing.assert_close(ours.get_parameter("layers.3.gated_attention.q.x_proj.weight"),
                                   q_proj[:, :8].reshape(16, 16), rtol=0, atol=0)
        logits = ours(IDS)
        gated = ref(IDS).logits
        with monkeypatch.context() as patch:
            patch.setattr(modeling_qwen3_next.torch, "sigmoid", torch.ones_like)
            open_gate = ref(IDS).logits
        torch.testing.assert_close(logits, open_gate, **TOL)
        assert not torch.allclose(logits, gated, **TOL)
    with pytest.raises(MappingError, match="gate was dropped"):
        export_state_dict(ours, mapping)
    with pytest.raises(MappingError, match="headwise"):
        mapping_of(cfg, attention_gate="headwise")


def test_a_checkpoint_of_another_width_is_refused_by_key_and_shapes():
    ours = gatedsl.compile(SPEC, params_of(config()), opt_level=0)
    wider = Qwen3NextForCausalLM(config(hidden_size=24))
    shapes = r"model\.norm\.weight is \[24\], but the spec's norm\.norm\.weight is \[16\]"
    with pytest.raises(MappingError, match=shapes):
        load_state_dict(ours, wider, mapping_of(config()))


def test_initialisation_matches_transformers():
    """Qwen3NextPreTrainedModel's init: the embeddings, the head, attention, experts, routers and MLPs N(0,
    initializer_range), the zero-centred norms 0, the delta nets' dt_bias 1, A_log = log U(0.01, 16) and gated norm
    1. By a two-sample KS test at α = 0.001 for the random ones, exactly for the constants. (The delta nets'
    projections and convolution are not compared: transformers redraws them N(0, initializer_range) in the whole
    model, std.linear_rnn's GatedDeltaNet keeps PyTorch's default, as the spec says.)"""
    cfg = Qwen3NextConfig(**{**SIZES, "vocab_size": 500, "hidden_size": 64, "intermediate_size": 96})
    torch.manual_seed(0)
    ref = Qwen3NextForCausalLM(cfg).state_dict()
    torch.manual_seed(1)
    ours = export_state_dict(gatedsl.compile(SPEC, params_of(cfg), opt_level=0), mapping_of(cfg))
    assert ours.keys() == ref.keys()
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.3.self_attn.q_proj.weight",
                 "model.layers.3.self_attn.o_proj.weight", "model.layers.1.mlp.experts.gate_up_proj",
                 "model.layers.1.mlp.gate.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.2.linear_attn.A_log"):
        n = ours[name].numel()
        assert ks_distance(ours[name], ref[name]) < 1.95 * (2 / n) ** 0.5, name
    for name in ("model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.3.self_attn.q_norm.weight",
                 "model.layers.0.linear_attn.dt_bias", "model.layers.0.linear_attn.norm.weight"):
        assert torch.equal(ours[name], ref[name]), name
