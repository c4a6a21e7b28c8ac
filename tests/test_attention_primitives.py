"""The attention primitives (issue 11 §2) against plain PyTorch and transformers, in float64, outputs and gradients.

rope (full and partial, θ, explicit positions) against transformers' own apply_rotary_pos_emb and rotary modules and
against a pairwise rotation written here; grouped-query attention against transformers' repeat_kv and torch's SDPA
with enable_gqa; padding masks from lengths, causal masks, sliding windows and additive float biases, alone and
together, against masks built element by element here and against the masks transformers builds from its own
attention_mask and sliding_window; the zero-centred rms_norm against Qwen3NextRMSNorm, and rms_norm's half-precision
rounding against LlamaRMSNorm. Each primitive's misuse is a SpecError, and FLOPs and -O0/-O2 cover the new forms.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_primitives import P, bools, check, compile_double, ints, model, param_names, randn

import gatedsl
from gatedsl import SpecError

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, Qwen3NextConfig  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, repeat_kv  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import (  # noqa: E402
    Qwen3NextRMSNorm,
    Qwen3NextRotaryEmbedding,
)
from transformers.models.qwen3_next.modeling_qwen3_next import apply_rotary_pos_emb as partial_rope  # noqa: E402

EXACT = dict(atol=1e-12, rtol=1e-12)  # float64 against float64: the same products, at most summed in another order


# -------------------------------------------------------------------- rope
def _llama_rotary(head_dim: int, theta: float) -> LlamaRotaryEmbedding:
    """Llama's rotary module for heads of head_dim features, base θ."""
    return LlamaRotaryEmbedding(LlamaConfig(head_dim=head_dim, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": theta}))


def _qwen3_next_rotary(head_dim: int, factor: float, theta: float) -> Qwen3NextRotaryEmbedding:
    """Qwen3-Next's rotary module for heads of head_dim features, partial_rotary_factor `factor`, base θ."""
    config = Qwen3NextConfig(head_dim=head_dim, rope_parameters={"rope_type": "default", "rope_theta": theta,
                                                                  "partial_rotary_factor": factor})
    return Qwen3NextRotaryEmbedding(config)


def rope_pairs(x, positions, theta, rotary_dim):
    """Feature i < r/2 and feature i + r/2 turned together by the angle p·θ^(−2i/r): the rotation written pair by
    pair, with the angles in float32 as the primitive documents (and transformers computes them)."""
    half = rotary_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    out = x.clone()
    for i in range(half):
        angle = positions.float() * inv_freq[i]  # [T] or [B, T]
        if positions.dim() == 2:
            angle = angle.reshape(angle.shape[0], *(1,) * (x.dim() - 3), angle.shape[1])
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * cos - b * sin
        out[..., i + half] = b * cos + a * sin
    return out


@pytest.mark.parametrize("positions", ["default", "shared", "per sample"])
@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_full_rope_equals_transformers_llama(positions, theta):
    B, H, T, d = 2, 3, 6, 8
    pos = {"default": torch.arange(T).expand(B, T), "shared": ints(T, high=50, seed=3).expand(B, T),
           "per sample": ints(B, T, high=50, seed=4)}[positions]
    decls, args, inputs = ["x: [B, H, T, 8]"], "", [randn(B, H, T, d, seed=1)]
    if positions == "shared":
        decls, args, inputs = decls + ["p: int[T]"], "p, ", inputs + [pos[0]]
    elif positions == "per sample":
        decls, args, inputs = decls + ["p: int[B, T]"], "p, ", inputs + [pos]

    def ref(gm, x, *given):
        cos, sin = _llama_rotary(d, theta)(x, pos)
        return llama_rope(x, x, cos, sin)[0]

    check(model(f"output y = rope(x, {args}theta={theta})", *decls), inputs, ref, atol=0, rtol=0)
    check(model(f"output y = rope(x, {args}theta={theta})", *decls), inputs,
          lambda gm, x, *given: rope_pairs(x, pos, theta, d), **EXACT)


@pytest.mark.parametrize("factor", [0.25, 0.5, 0.75])
def test_partial_rope_equals_transformers_qwen3_next(factor):
    """rotary_dim = int(head_dim · partial_rotary_factor): the rest of each head passes unchanged."""
    B, H, T, d = 2, 2, 5, 16
    rotary_dim = int(d * factor)
    pos = ints(B, T, high=1000, seed=2)

    def ref(gm, x, p):
        cos, sin = _qwen3_next_rotary(d, factor, 10000.0)(x, p)
        assert cos.shape[-1] == rotary_dim
        return partial_rope(x, x, cos, sin)[0]

    spec = model(f"output y = rope(x, p, rotary_dim={rotary_dim})", "x: [B, H, T, 16]", "p: int[B, T]")
    check(spec, [randn(B, H, T, d, seed=5), pos], ref, atol=0, rtol=0)
    check(spec, [randn(B, H, T, d, seed=5), pos], lambda gm, x, p: rope_pairs(x, p, 10000.0, rotary_dim), **EXACT)


def test_rope_without_heads_and_with_extra_leading_dims():
    pos = ints(2, 7, high=30, seed=1)
    check(model("output y = rope(x, p, rotary_dim=4, theta=500.0)", "x: [B, T, 6]", "p: int[B, T]"),
          [randn(2, 7, 6), pos], lambda gm, x, p: rope_pairs(x, p, 500.0, 4), **EXACT)
    check(model("output y = rope(x)", "x: [B, C, H, T, 4]"), [randn(2, 3, 2, 5, 4)],
          lambda gm, x: rope_pairs(x, torch.arange(5), 10000.0, 4), **EXACT)


def test_rope_of_nothing_is_the_identity():
    check(model("output y = rope(x, rotary_dim=0)", "x: [B, T, 4]"), [randn(2, 3, 4)], lambda gm, x: x, atol=0, rtol=0)
    check(model("output y = rope(x, p, rotary_dim=0)", "x: [B, T, 4]", "p: int[T]"), [randn(2, 3, 4), ints(3)],
          lambda gm, x, p: x, atol=0, rtol=0)


@pytest.mark.parametrize("body,decls,message", [
    ("rope(x, rotary_dim=3)", ["x: [B, T, 8]"], "rotary_dim must be even and at most d = 8, got 3"),
    ("rope(x, rotary_dim=10)", ["x: [B, T, 8]"], "rotary_dim must be even and at most d = 8, got 10"),
    ("rope(x, theta=0.0)", ["x: [B, T, 8]"], "base theta must be positive"),
    ("rope(x)", ["x: [B, T, D]"], "rope needs a static size"),
    ("rope(x)", ["x: [8]"], r"rope needs \[\*, T, d\]"),
    ("rope(x, p)", ["x: [B, T, 8]", "p: [B, T]"], r"rope positions are int\[T\] or int\[B, T\]"),
    ("rope(x, p)", ["x: [B, H, T, 8]", "p: int[H, T]"], r"rope positions are int\[T\] or int\[B, T\]"),
    ("rope(x, p)", ["x: [B, T, 8]", "p: int[S]"], r"rope positions are int\[T\] or int\[B, T\] .* got int\[S\]"),
])
def test_rope_misuse_is_a_spec_error(body, decls, message):
    with pytest.raises(SpecError, match=message):
        gatedsl.check(model(f"output y = {body}", *decls))


# ------------------------------------------------------ attention's masks
def _attention_ref(q, k, v, keep=None, bias=None, scale=None):
    """softmax(q kᵀ · scale + bias, over the keys `keep` allows) v, summed out by hand; zeros where nothing is kept."""
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * s
    if bias is not None:
        scores = scores + bias
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(-1, keepdim=True).detach()
    p = torch.exp(scores - torch.where(torch.isfinite(top), top, 0))
    total = p.sum(-1, keepdim=True)
    p = torch.where(total > 0, p / torch.where(total > 0, total, 1), 0)
    return (p.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)


def _keep(B, T, S, causal=False, window=None, lengths=None, left=False):
    """[B, 1, T, S] (or [T, S]): whether query t may see key s, element by element."""
    keep = torch.ones(B, 1, T, S, dtype=torch.bool)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                ok = not causal or s <= t
                ok = ok and (window is None or s > t - window)
                if lengths is not None:
                    ok = ok and (s >= S - lengths[b] if left else s < lengths[b])
                keep[b, 0, t, s] = ok
    return keep


def test_grouped_query_attention_equals_repeat_kv_and_sdpa(monkeypatch):
    """Four query heads over two key/value heads: query head h reads key/value head h // 2, as transformers' repeat_kv
    (and torch's SDPA with enable_gqa) group them; one key/value head serves all (multi-query)."""
    B, T, S = 2, 4, 5
    decls = ["q: [B, 4, T, 6]", "k: [B, 2, S, 6]", "v: [B, 2, S, 3]", "k1: [B, 1, S, 6]", "v1: [B, 1, S, 3]"]
    spec = model("output y = attention(q, k, v)\noutput c = attention(q, k, v, causal=true, scale=0.4)\n"
                 "output m = attention(q, k1, v1)", *decls)
    inputs = [randn(B, 4, T, 6, seed=1), randn(B, 2, S, 6, seed=2), randn(B, 2, S, 3, seed=3),
              randn(B, 1, S, 6, seed=4), randn(B, 1, S, 3, seed=5)]
    causal = _keep(B, T, S, causal=True)

    def ref(gm, q, k, v, k1, v1):
        k, v = repeat_kv(k, 2), repeat_kv(v, 2)
        return (_attention_ref(q, k, v), _attention_ref(q, k, v, causal, scale=0.4),
                _attention_ref(q, repeat_kv(k1, 4), repeat_kv(v1, 4)))

    check(spec, inputs, ref, **EXACT)
    check(spec, inputs, lambda gm, q, k, v, k1, v1: (
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal[:, 0, :, :].unsqueeze(1), scale=0.4, enable_gqa=True),
        F.scaled_dot_product_attention(q, k1, v1, enable_gqa=True)), **EXACT)
    monkeypatch.setattr(torch, "__version__", "2.4.1")  # an SDPA without enable_gqa: the heads are repeated instead
    check(spec, inputs, ref, **EXACT)


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_padding_masks_from_lengths(left, causal):
    """lengths[b] valid keys per sample, the first ones (right padding) or the last (padding="left")."""
    B, H, T = 3, 2, 5
    lengths = torch.tensor([5, 3, 1])
    keep = _keep(B, T, T, causal=causal, lengths=lengths, left=left)
    args = ("causal=true, " if causal else "") + "lengths=n" + (', padding="left"' if left else "")
    spec = model(f"output y = attention(q, k, v, {args})", "q: [B, H, T, 4]", "k: [B, H, T, 4]", "v: [B, H, T, 4]",
                 "n: int[B]")
    inputs = [randn(B, H, T, 4, seed=i) for i in range(3)] + [lengths]
    check(spec, inputs, lambda gm, q, k, v, n: _attention_ref(q, k, v, keep), **EXACT)


@pytest.mark.parametrize("left", [False, True])
def test_lengths_agree_with_transformers_attention_mask(left):
    """A transformers user's batch: attention_mask [B, S] (1 at tokens, 0 at padding) with padding on the right, or on
    the left as for generation. Through the causal mask transformers builds from it, every real token's output equals
    attention(..., causal=true, lengths=attention_mask.sum(-1), padding=...). Queries at padding positions are
    garbage either way (transformers attends them to something, gatedsl gives zeros where nothing is visible)."""
    B, H, T = 3, 2, 6
    lengths = torch.tensor([6, 4, 2])
    attention_mask = (torch.arange(T) >= T - lengths[:, None]) if left else (torch.arange(T) < lengths[:, None])
    theirs = sdpa_mask(batch_size=B, q_length=T, kv_length=T, mask_function=causal_mask_function,
                       attention_mask=attention_mask, allow_is_causal_skip=False)  # [B, 1, T, T] bool
    args = 'causal=true, lengths=n' + (', padding="left"' if left else "")
    gm = compile_double(model(f"output y = attention(q, k, v, {args})", "q: [B, H, T, 8]", "k: [B, H, T, 8]",
                              "v: [B, H, T, 8]", "n: int[B]"))
    q, k, v = (randn(B, H, T, 8, seed=i) for i in range(3))
    ours = gm(q, k, v, attention_mask.sum(-1))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=theirs)
    real = attention_mask[:, None, :, None].expand_as(ours)
    torch.testing.assert_close(ours[real], ref[real], **EXACT)


@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_sliding_window_is_transformers_sliding_window(window):
    """window w: query t sees keys t − w < s ≤ t, its w latest keys with itself, exactly the mask transformers builds
    for Mistral's and Mixtral's sliding_window (masking_utils.sliding_window_causal_mask_function)."""
    B, T = 2, 6
    theirs = sdpa_mask(batch_size=B, q_length=T, kv_length=T, mask_function=sliding_window_causal_mask_function(window),
                       allow_is_causal_skip=False)
    assert torch.equal(theirs, _keep(B, T, T, causal=True, window=window))
    if window == 2:
        assert [torch.nonzero(theirs[0, 0, t]).flatten().tolist() for t in range(T)] == \
               [[0], [0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]
    spec = model(f"output y = attention(q, k, v, causal=true, window={window})", "q: [B, 2, T, 4]", "k: [B, 1, T, 4]",
                 "v: [B, 1, T, 4]")
    inputs = [randn(B, 2, T, 4, seed=1), randn(B, 1, T, 4, seed=2), randn(B, 1, T, 4, seed=3)]
    check(spec, inputs, lambda gm, q, k, v: _attention_ref(q, k, v, theirs), **EXACT)


def test_masks_combine():
    """A bool mask, a float bias, causal=true, lengths and a window all at once: the allowed keys are those every
    mask allows, and the bias adds to their scores."""
    B, H, T = 2, 2, 6
    lengths = torch.tensor([6, 4])
    m = bools(T, T, seed=9)
    bias = randn(B, 1, T, T, seed=8)
    spec = model("output a = attention(q, k, v, causal=true, mask=m, lengths=n, window=4)\n"
                 "output b = attention(q, k, v, causal=true, mask=f, lengths=n, window=3, scale=0.7)\n"
                 "output c = attention(q, k, v, causal=true, mask=f)",
                 "q: [B, H, T, 4]", "k: [B, H, T, 4]", "v: [B, H, T, 4]", "m: bool[T, T]", "f: [B, 1, T, T]",
                 "n: int[B]")
    inputs = [randn(B, H, T, 4, seed=i) for i in range(3)] + [m, bias, lengths]

    def ref(gm, q, k, v, m, f, n):
        return (_attention_ref(q, k, v, _keep(B, T, T, True, 4, lengths) & m),
                _attention_ref(q, k, v, _keep(B, T, T, True, 3, lengths), bias=f, scale=0.7),
                _attention_ref(q, k, v, _keep(B, T, T, True), bias=f))

    check(spec, inputs, ref, **EXACT)


def test_the_additive_float_bias():
    """mask= a float tensor is added to the scores (ALiBi-style biases, or -inf where a key is hidden)."""
    bias = randn(3, 5, seed=4)
    bias[1, 2] = float("-inf")
    spec = model("output y = attention(q, k, v, mask=f)", "q: [B, H, T, 4]", "k: [B, H, S, 4]", "v: [B, H, S, 2]",
                 "f: [T, S]")
    check(spec, [randn(2, 2, 3, 4, seed=1), randn(2, 2, 5, 4, seed=2), randn(2, 2, 5, 2, seed=3), bias],
          lambda gm, q, k, v, f: _attention_ref(q, k, v, bias=f), **EXACT)


def test_a_query_that_sees_nothing_gives_zeros_and_finite_gradients():
    gm = compile_double(model("output y = attention(q, k, v, causal=true, lengths=n, padding=\"left\")",
                              "q: [B, T, 4]", "k: [B, T, 4]", "v: [B, T, 4]", "n: int[B]"))
    q, k, v = (randn(2, 4, 4, seed=i).requires_grad_() for i in range(3))
    y = gm(q, k, v, torch.tensor([4, 0]))
    assert torch.equal(y[1], torch.zeros(4, 4, dtype=y.dtype))
    y.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("body,decls,message", [
    ("attention(q, k, v)", ["q: [B, 4, T, 8]", "k: [B, 3, T, 8]", "v: [B, 3, T, 8]"],
     "q has 4 heads .* and k 3; grouped-query attention needs the query heads to be a multiple"),
    ("attention(q, k, v)", ["q: [B, 4, T, 8]", "k: [B, 2, T, 8]", "v: [B, 4, T, 8]"],
     "grouped-query attention needs k and v of one rank with q and the same heads"),
    ("attention(q, k, v, window=2)", ["q: [B, T, 8]", "k: [B, T, 8]", "v: [B, T, 8]"],
     "a sliding window .* is causal: give causal=true too"),
    ("attention(q, k, v, causal=true, window=0)", ["q: [B, T, 8]", "k: [B, T, 8]", "v: [B, T, 8]"],
     "a sliding window holds at least one key, got window=0"),
    ("attention(q, k, v, lengths=n)", ["q: [B, T, 8]", "k: [B, T, 8]", "v: [B, T, 8]", "n: [B]"],
     r"attention lengths are int\[B\], one valid length per sample"),
    ("attention(q, k, v, lengths=n)", ["q: [B, T, 8]", "k: [B, T, 8]", "v: [B, T, 8]", "n: int[T]"],
     r"attention lengths are int\[B\].*got int\[T\]"),
    ("attention(q, k, v, lengths=n)", ["q: [T, 8]", "k: [T, 8]", "v: [T, 8]", "n: int[T]"],
     r"attention lengths are int\[B\]"),
    ('attention(q, k, v, padding="left")', ["q: [B, T, 8]", "k: [B, T, 8]", "v: [B, T, 8]"],
     'padding="left" says where the padding of lengths= is'),
    ('attention(q, k, v, lengths=n, padding="middle")', ["q: [B, T, 8]", "k: [B, T, 8]", "v: [B, T, 8]", "n: int[B]"],
     'padding is "right" or "left", got "middle"'),
    ("attention(q, k, v, mask=m)", ["q: [B, T, 8]", "k: [B, T, 8]", "v: [B, T, 8]", "m: int[T, T]"],
     "an attention mask is bool .* or float"),
    ("attention(q, k, v, mask=m)", ["q: [B, T, 8]", "k: [B, T, 8]", "v: [B, T, 8]", "m: bool[C, B, T, T]"],
     "does not broadcast to the scores"),
])
def test_attention_misuse_is_a_spec_error(body, decls, message):
    with pytest.raises(SpecError, match=message):
        gatedsl.check(model(f"output y = {body}", *decls))


# ------------------------------------------------------------------ rms_norm
def test_zero_centred_rms_norm():
    """x / rms(x) ⊙ (1 + w), w starting at zeros: Qwen3NextRMSNorm. In float64 it equals the formula exactly; the
    transformers module computes in float32 even for float64 input (its x.float()), hence 1e-6 against it."""
    spec = model("output y = rms_norm(x, zero_centered=true)\noutput z = rms_norm(x, eps=1e-3, zero_centered=true)",
                 "x: [B, H, T, 8]")
    x = randn(2, 3, 4, 8, scale=2)

    def formula(gm, x):
        return tuple(x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + P(gm, f"{n}.norm.weight"))
                     for n, eps in (("y", 1e-6), ("z", 1e-3)))

    gm = check(spec, [x], formula, **EXACT)
    assert param_names(gm) == {"y.norm.weight", "z.norm.weight"}
    theirs = Qwen3NextRMSNorm(8, eps=1e-6).double()
    with torch.no_grad():
        theirs.weight.copy_(P(gm, "y.norm.weight"))
    torch.testing.assert_close(gm(x)[0], theirs(x), atol=1e-6, rtol=1e-6)
    fresh = gatedsl.compile(spec)
    assert torch.equal(fresh.get_parameter("y.norm.weight"), torch.zeros(8))  # Qwen3-Next's init: the identity
    torch.testing.assert_close(fresh(x.float())[0], Qwen3NextRMSNorm(8)(x.float()), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_rounds_as_transformers(dtype):
    """Statistics in float32 for half-precision input; LlamaRMSNorm's order (cast x / rms(x) back, then scale by w)
    and Qwen3NextRMSNorm's (scale by 1 + w in float32, then cast): the same bits as transformers in every dtype."""
    spec = model("output y = rms_norm(x)\noutput z = rms_norm(x, zero_centered=true)", "x: [B, 64]")
    gm = gatedsl.compile(spec).to(dtype)
    llama, qwen = LlamaRMSNorm(64, eps=1e-6).to(dtype), Qwen3NextRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        for ours, theirs in ((gm.get_parameter("y.norm.weight"), llama.weight),
                             (gm.get_parameter("z.norm.weight"), qwen.weight)):
            ours.copy_(torch.randn(64, generator=torch.Generator().manual_seed(3)))
            theirs.copy_(ours)
    x = (torch.randn(32, 64, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    y, z = gm(x)
    exact = dict(atol=0, rtol=0) if dtype != torch.float32 else dict(atol=1e-6, rtol=1e-6)  # float32: fused vs not
    torch.testing.assert_close(y, llama(x), **exact)
    torch.testing.assert_close(z, qwen(x), **exact)


def test_zero_centred_rms_norm_needs_its_weight():
    with pytest.raises(SpecError, match="a zero-centred rms_norm scales by 1 \\+ w: it needs its weight"):
        gatedsl.check(model("output y = rms_norm(x, affine=false, zero_centered=true)", "x: [B, 8]"))
    with pytest.raises(SpecError, match="layer_norm has no argument 'zero_centered'"):
        gatedsl.check(model("output y = layer_norm(x, zero_centered=true)", "x: [B, 8]"))


# ------------------------------------------------- FLOPs and optimisation levels
def test_flops_of_rope_and_grouped_attention():
    """rope: 3 FLOPs per turned feature (two products and a sum); grouped-query attention: 2·T·S·(d_k + d_v) per
    query head, as the key/value heads are read once per query head."""
    rope = gatedsl.check(model("output y = rope(x, rotary_dim=4)", "x: [B, H, T, 8]"), dims={"B": 2, "H": 3, "T": 5})
    assert rope.flops == 2 * 3 * 5 * 3 * 4
    gqa = gatedsl.check(model("output y = attention(q, k, v, causal=true, window=2)", "q: [B, 4, T, 8]",
                              "k: [B, 2, T, 8]", "v: [B, 2, T, 6]"), dims={"B": 2, "T": 5})
    assert gqa.flops == 2 * 4 * 5 * 5 * (8 + 6) * 2


GQA_SPEC = """
model M() {
  input x: [B, T, 16]
  input p: int[B, T]
  input n: int[B]
  q = rope(split_heads(linear(x, 16), 4), p, rotary_dim=2)
  k = rope(split_heads(linear(x, 8), 2), p, rotary_dim=2)
  v = split_heads(linear(x, 8), 2)
  a = attention(rms_norm(q, zero_centered=true), k, v, causal=true, lengths=n, window=3)
  output y = linear(merge_heads(a, 4), 16) + linear(merge_heads(attention(q, k, v), 4), 16)
}
"""


def test_optimised_equals_unoptimised_and_the_export(tmp_path):
    """-O0 and -O2 agree on the new forms (projections of x fuse at -O2; the attention ops stay as they are), and a
    standalone export (runtime's helpers copied, torch alone) computes the same."""
    import importlib.util

    from gatedsl.backend.export import export_standalone

    torch.manual_seed(0)
    plain = gatedsl.compile(GQA_SPEC, opt_level=0).double()
    fast = gatedsl.compile(GQA_SPEC, opt_level=2).double()
    fast.load_state_dict(plain.state_dict())
    x = randn(2, 5, 16).requires_grad_()
    p, n = ints(2, 5, high=40, seed=1), torch.tensor([5, 3])
    ys = [m(x, p, n) for m in (plain, fast)]
    torch.testing.assert_close(ys[1], ys[0], **EXACT)
    grads = [torch.autograd.grad(y.sum(), [x, *m.parameters()]) for y, m in zip(ys, (plain, fast))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, **EXACT)
    exported = gatedsl.compile(GQA_SPEC, standalone=True)
    exported.load_state_dict(plain.state_dict())
    export_standalone(exported, tmp_path / "gqa.py", "gqa.gate")
    found = importlib.util.spec_from_file_location("gqa", tmp_path / "gqa.py")
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    torch.testing.assert_close(module.load().double()(x, p, n), ys[0], **EXACT)
