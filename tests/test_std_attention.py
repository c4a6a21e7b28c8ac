"""std.attention's self_attention and gated_attention against transformers' attention layers and their equations.

self_attention is MixtralAttention (and LlamaAttention, with its attention_bias); gated_attention is
Qwen3NextAttention by default, and Qwen3Attention with gate="none", zero_centered=false. Each reference is
transformers' own module, built from a tiny config of its own class, called as its model calls it: with the cos/sin
of its model's rotary module and the mask its model builds (masking_utils). Its weights come in through the block's
checkpoint mapping (gatedsl.interop.attention); outputs and gradients w.r.t. the input and every weight are
compared in float64; then the weights go back out through export_state_dict into a fresh reference
(load_state_dict(strict=True)), which computes the same. The default initialisation is compared with what
transformers' models give these layers. The head-wise gate, which no reference ships, is checked with the other
variants against the equations written here.

Tolerances: with "sdpa" attention transformers stays in float64, and MixtralAttention matches to 1e-12. Its "eager"
attention takes the softmax in float32, and Qwen3-Next's and Qwen3's RMSNorms cast their input to float32 even in a
float64 model (`x.float()`, `hidden_states.to(torch.float32)`): those comparisons agree to ~1e-7 and are checked at
1e-6, while the equations below check the same blocks in float64 at 1e-12.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_attention_primitives import rope_pairs

import gatedsl
from gatedsl import SpecError
from gatedsl.interop.attention import gated_attention_from_qwen3_next, self_attention_from_llama
from gatedsl.interop.mapping import export_state_dict, load_state_dict

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, MixtralConfig, Qwen3Config, Qwen3NextConfig  # noqa: E402
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralAttention,
    MixtralModel,
    MixtralRotaryEmbedding,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import (  # noqa: E402
    Qwen3NextAttention,
    Qwen3NextModel,
    Qwen3NextRotaryEmbedding,
)

F64 = torch.float64
EXACT = dict(atol=1e-12, rtol=1e-12)
FLOAT32_INSIDE = dict(atol=1e-5, rtol=1e-5)  # the reference takes a norm or its softmax in float32
B, T, D = 2, 7, 16
ROTARY = {MixtralAttention: MixtralRotaryEmbedding, LlamaAttention: LlamaRotaryEmbedding,
          Qwen3NextAttention: Qwen3NextRotaryEmbedding, Qwen3Attention: Qwen3RotaryEmbedding}


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def ours(call: str, seed: int = 0) -> torch.nn.Module:
    """A model applying one std.attention block to x: [B, T, 16], compiled in float64."""
    torch.manual_seed(seed)
    return gatedsl.compile(f"import std.attention\nmodel M() {{\n  input x: [B, T, {D}]\n  output y = {call}\n}}\n"
                           ).double()


def randomize(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random weights everywhere: norm weights start at 0 or 1, which would hide a swapped or unused one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return module


def as_the_model_calls(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x) with the rotary cos/sin and the causal (or sliding-window) mask its model would give it."""
    config = layer.config
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    masking = create_sliding_window_causal_mask if getattr(config, "sliding_window", None) else create_causal_mask
    mask = masking(config, x, None, None, position_ids=positions)
    return layer(x, ROTARY[type(layer)](config)(x, positions), mask)[0]


def compare_both_ways(model: torch.nn.Module, ref: torch.nn.Module, mapping, tolerance) -> None:
    """Import the reference's weights, compare outputs and gradients, export them into a fresh reference."""
    written = load_state_dict(model, ref, mapping)
    assert sorted(written) == sorted(model.state_dict())
    x = randn(B, T, D, seed=3)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = model(x_ours), as_the_model_calls(ref, x_ref)
    torch.testing.assert_close(y, expected, **tolerance)
    cotangent = randn(*y.shape, seed=4)
    (y * cotangent).sum().backward()
    (expected * cotangent).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tolerance)
    grads = copy.deepcopy(model)  # our gradients as weights, exported onto the reference's keys through the mapping
    with torch.no_grad():
        for p, g in zip(grads.parameters(), model.parameters()):
            p.copy_(g.grad)
    for key, grad in export_state_dict(grads, mapping).items():
        torch.testing.assert_close(grad, ref.get_parameter(key).grad, **tolerance)

    fresh = type(ref)(ref.config, 0).double()
    fresh.load_state_dict(export_state_dict(model, mapping), strict=True)
    torch.testing.assert_close(as_the_model_calls(fresh, x), expected.detach(), rtol=0, atol=0)


# ------------------------------------------------------------ self_attention
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads,window", [(2, None), (4, None), (1, 3), (2, 2)])
def test_self_attention_is_mixtral_attention(implementation, kv_heads, window):
    config = MixtralConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=kv_heads, sliding_window=window)
    config._attn_implementation = implementation
    assert config.rope_parameters["rope_theta"] == 1e6
    ref = randomize(MixtralAttention(config, 0).double())
    call = f"self_attention(x, heads=4, kv_heads={kv_heads}, theta=1000000.0{f', window={window}' if window else ''})"
    compare_both_ways(ours(call), ref, self_attention_from_llama().under("self_attention", ""),
                      EXACT if implementation == "sdpa" else FLOAT32_INSIDE)


def test_self_attention_with_biases_and_its_own_head_size_is_llama_attention():
    config = LlamaConfig(hidden_size=D, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                         attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    config._attn_implementation = "sdpa"
    ref = randomize(LlamaAttention(config, 0).double())
    compare_both_ways(ours("self_attention(x, heads=2, kv_heads=1, head_dim=12, theta=500.0, bias=true)"), ref,
                      self_attention_from_llama(bias=True).under("self_attention", ""), EXACT)


# ----------------------------------------------------------- gated_attention
def qwen3_next_config(kv_heads=2, head_dim=8, factor=0.25, theta=10000.0, implementation="sdpa"):
    config = Qwen3NextConfig(hidden_size=D, num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                             rope_parameters={"rope_type": "default", "rope_theta": theta,
                                              "partial_rotary_factor": factor})
    config._attn_implementation = implementation
    return config


@pytest.mark.parametrize("kv_heads,head_dim,factor,theta", [(2, 8, 0.25, 10000.0), (4, 8, 0.5, 300.0),
                                                            (1, 4, 1.0, 10000.0), (2, 16, 0.25, 10000.0)])
def test_gated_attention_is_qwen3_next_attention(kv_heads, head_dim, factor, theta):
    ref = randomize(Qwen3NextAttention(qwen3_next_config(kv_heads, head_dim, factor, theta), 0).double())
    call = (f"gated_attention(x, heads=4, kv_heads={kv_heads}, head_dim={head_dim}, partial_rotary={factor}, "
            f"theta={theta})")
    compare_both_ways(ours(call), ref, gated_attention_from_qwen3_next().under("gated_attention", ""), FLOAT32_INSIDE)


def test_gated_attention_with_eager_attention_and_a_test_that_can_fail():
    ref = randomize(Qwen3NextAttention(qwen3_next_config(implementation="eager"), 0).double())
    mapping = gated_attention_from_qwen3_next().under("gated_attention", "")
    compare_both_ways(ours("gated_attention(x, heads=4, kv_heads=2, head_dim=8)"), ref, mapping, FLOAT32_INSIDE)
    for wrong in ("zero_centered=false", "eps=1e-4", "partial_rotary=0.5"):
        model = ours(f"gated_attention(x, heads=4, kv_heads=2, head_dim=8, {wrong})")
        load_state_dict(model, ref, mapping)
        x = randn(B, T, D, seed=3)
        assert not torch.allclose(model(x), as_the_model_calls(ref, x), **FLOAT32_INSIDE), wrong


def test_gated_attention_without_its_gate_is_qwen3_attention():
    config = Qwen3Config(hidden_size=D, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "sdpa"
    ref = randomize(Qwen3Attention(config, 0).double())
    call = 'gated_attention(x, heads=4, kv_heads=2, head_dim=8, gate="none", zero_centered=false, partial_rotary=1.0)'
    compare_both_ways(ours(call), ref, gated_attention_from_qwen3_next(gate="none").under("gated_attention", ""),
                      FLOAT32_INSIDE)


def gated_attention_equations(x, p, heads, kv_heads, d, gate, qk_norm, zero_centered, rotary, theta=10000.0, eps=1e-6):
    """[q_h, g_h] = x W_q per head; q, k RMS-normalised per head (x/rms ⊙ (1 + w) or ⊙ w), turned by RoPE on their
    first `rotary` features; head h reads key/value head h // (heads / kv_heads); causal softmax(q kᵀ/√d) v ⊙ σ(g)."""
    batch, steps, _ = x.shape
    width = {"elementwise": 2 * d, "headwise": d + 1, "none": d}[gate]
    qg = (x @ p["qg.x_proj.weight" if gate != "none" else "q.x_proj.weight"].T).reshape(batch, steps, heads, width)
    q, g = qg[..., :d], qg[..., d:]
    k = (x @ p["k.x_proj.weight"].T).reshape(batch, steps, kv_heads, d)
    v = (x @ p["v.x_proj.weight"].T).reshape(batch, steps, kv_heads, d)
    if qk_norm:
        def norm(t, w):
            return t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps) * ((1 + w) if zero_centered else w)

        q, k = norm(q, p["q_norm.norm.weight"]), norm(k, p["k_norm.norm.weight"])
    positions = torch.arange(steps)
    q = rope_pairs(q.transpose(1, 2), positions, theta, rotary)  # [B, heads, T, d]
    k = rope_pairs(k.transpose(1, 2), positions, theta, rotary)
    group = heads // kv_heads
    k, v = k[:, [h // group for h in range(heads)]], v.transpose(1, 2)[:, [h // group for h in range(heads)]]
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(steps, steps, dtype=torch.bool).triu(1), float("-inf"))
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    a = ((weights / weights.sum(-1, keepdim=True)).unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)  # [B, heads, T, d]
    if gate != "none":
        a = a * torch.sigmoid(g.transpose(1, 2))
    return a.transpose(1, 2).reshape(batch, steps, heads * d) @ p["y.o_proj.weight"].T


@pytest.mark.parametrize("gate", ["elementwise", "headwise", "none"])
@pytest.mark.parametrize("qk_norm,zero_centered", [(True, True), (True, False), (False, True)])
def test_gated_attention_equals_its_equations(gate, qk_norm, zero_centered):
    call = (f'gated_attention(x, heads=4, kv_heads=2, head_dim=6, gate="{gate}", qk_norm={str(qk_norm).lower()}, '
            f'zero_centered={str(zero_centered).lower()}, partial_rotary=0.75)')
    model = randomize(ours(call))
    p = {name[len("gated_attention."):]: w for name, w in model.named_parameters()}
    x = randn(B, T, D, seed=5)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, expected = model(x_ours), gated_attention_equations(x_ref, p, 4, 2, 6, gate, qk_norm, zero_centered, rotary=4)
    torch.testing.assert_close(y, expected, **EXACT)
    grads = torch.autograd.grad(y.sum(), [x_ours, *p.values()])
    expected_grads = torch.autograd.grad(expected.sum(), [x_ref, *p.values()])
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, **EXACT)
    gate_width = {"elementwise": 6, "headwise": 1, "none": 0}[gate]
    assert sum(w.numel() for w in p.values()) == D * 4 * (6 + gate_width) + 2 * D * 2 * 6 + 4 * 6 * D + 2 * 6 * qk_norm
    report = gatedsl.check(f"import std.attention\nmodel M() {{\n  input x: [B, T, {D}]\n  output y = {call}\n}}\n")
    assert [(g.name, g.kind) for g in report.gates] == ([] if gate == "none" else [("gated_attention.g", "sigmoid")])


def test_the_existing_call_still_works():
    """gated_attention(x, heads=h), as the forecaster and the examples call it: head_dim D / heads, kv_heads = heads."""
    model = randomize(ours("gated_attention(x, heads=2)"))
    p = {name[len("gated_attention."):]: w for name, w in model.named_parameters()}
    x = randn(B, T, D, seed=6)
    torch.testing.assert_close(model(x), gated_attention_equations(x, p, 2, 2, 8, "elementwise", True, True, 2),
                               **EXACT)


# ------------------------------------------------------------- initialisation
def _normal(weight: torch.Tensor, std: float) -> bool:
    """Drawn from N(0, std²), by statistics: mean and spread, and tails a uniform of that spread would not have."""
    w = weight.detach().double().flatten()
    return abs(w.mean()) < 4 * std / math.sqrt(w.numel()) and abs(w.std() / std - 1) < 0.05 and w.abs().max() > 2.5 * std


def test_default_initialisation_is_transformers():
    """transformers' models draw every projection from N(0, initializer_range² = 0.02²), zero the zero-centred norms'
    weights (Qwen3-Next) and set the others' to ones; the blocks do the same by default."""
    mixtral = MixtralModel(MixtralConfig(vocab_size=8, hidden_size=128, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=2))
    qwen = Qwen3NextModel(Qwen3NextConfig(vocab_size=8, hidden_size=128, num_hidden_layers=1,
                                          layer_types=["full_attention"], num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=32, num_experts=2, moe_intermediate_size=8,
                                          shared_expert_intermediate_size=8))
    torch.manual_seed(0)
    spec = ("import std.attention\nmodel M() {\n  input x: [B, T, 128]\n"
            "  output y = self_attention(x, heads=4, kv_heads=2) + gated_attention(x, heads=4, kv_heads=2, head_dim=32)"
            "\n}\n")
    model = gatedsl.compile(spec)
    for ref, prefix, mapping in ((mixtral.layers[0].self_attn, "self_attention", self_attention_from_llama()),
                                 (qwen.layers[0].self_attn, "gated_attention", gated_attention_from_qwen3_next())):
        exported = export_state_dict(model, mapping.under(prefix, ""), partial=True)
        assert exported.keys() == ref.state_dict().keys()
        for key, theirs in ref.state_dict().items():
            if "norm" in key:
                assert torch.equal(theirs, torch.zeros_like(theirs)) and torch.equal(exported[key], theirs), key
            else:
                assert _normal(theirs, 0.02) and _normal(exported[key], 0.02), key


# ---------------------------------------------------------------- misuse
@pytest.mark.parametrize("call,message", [
    ("gated_attention(x, heads=4, kv_heads=3)", "kv_heads must divide heads"),
    ("gated_attention(x, heads=3)", r"heads must divide D \(or give head_dim\)"),
    ("gated_attention(x, heads=4, partial_rotary=1.5)", "partial_rotary is the fraction of each head RoPE turns"),
    ('gated_attention(x, heads=4, gate="sigmoid")',
     r"'gate' must be one of \{elementwise, headwise, none\}, got sigmoid"),
    ("self_attention(x, heads=4, kv_heads=8)", "kv_heads must divide heads"),
    ("self_attention(x, heads=5)", r"heads must divide D \(or give head_dim\)"),
    ("self_attention(x, heads=4, window=-1)", "head_dim and window are sizes"),
    ("self_attention(x, heads=2, head_dim=5)", "RoPE turns pairs of features: head_dim must be even"),
])
def test_misuse_is_a_spec_error(call, message):
    with pytest.raises(SpecError, match=message):
        ours(call)
