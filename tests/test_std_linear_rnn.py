"""specs/std/linear_rnn.gate, the gated linear recurrences of GATES.md §5, equal their equations.

Every reference below is plain PyTorch written from the equations (GATES.md and the papers named
in the spec's comments), independent of gatedsl: the recurrences are loops over time that update
the state exactly as the paper writes it (S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ is
computed with the identity matrix, not factored), convolutions are sums of shifted inputs, norms
are written out. Each reference is fed the compiled module's own weights (fetched by name), after
every weight has been moved off its init so that a weight that starts at 0 or 1 still matters.
Outputs, gradients with respect to the inputs and to every weight are compared in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gatedsl

TOL = dict(rtol=1e-10, atol=1e-10)
DT = torch.float64


# ------------------------------------------------------------------ helpers
def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def wrapper(call: str, inputs: str) -> str:
    """A model around one std.linear_rnn definition: `inputs` are its `input` lines."""
    return f"import std.linear_rnn\nmodel Wrap() {{\n{inputs}\n  output y = {call}\n}}\n"


def build(source: str, seed: int = 0):
    """Compile in float64 and move every weight off its init (A_log = 0, norm weights = 1, ...)."""
    model = gatedsl.compile(source).double()
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=DT, generator=gen))
    return model


def check_against(model, reference, inputs, seed=0, outputs=1):
    """Outputs and gradients (inputs and every weight) of `model(*inputs)` against `reference(*inputs, weights)`."""
    ours = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    theirs = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    weights = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    got = model(*ours)
    want = reference(*theirs, weights)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    assert len(got) == len(want) == outputs
    loss_ours, loss_ref = 0, 0
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, **TOL)
        probe = randn(*g.shape, seed=seed + 7 + i)  # a random cotangent, so no gradient cancels by symmetry
        loss_ours = loss_ours + (g * probe).sum()
        loss_ref = loss_ref + (w * probe).sum()
    loss_ours.backward()
    loss_ref.backward()
    for a, b in zip(ours, theirs):
        if a.is_floating_point():
            torch.testing.assert_close(a.grad, b.grad, **TOL)
    for name, p in model.named_parameters():
        assert weights[name].grad is not None, f"the reference does not use {name}"
        assert p.grad is not None, f"{name} gets no gradient"
        torch.testing.assert_close(p.grad, weights[name].grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    return got


def lin(x, W, name, bias):
    """x Wᵀ (+ b): the weights of the projection `name`."""
    return F.linear(x, W[name + ".weight"], W[name + ".bias"] if bias else None)


def causal_depthwise_conv(x, weight, bias=None):
    """out[t, c] = Σ_j w[c, j] x[t − (K − 1) + j, c] (+ b[c]), x before the first step being 0; x: [..., T, C]."""
    kernel = weight.shape[-1]
    time = x.shape[-2]
    padded = torch.cat([torch.zeros(*x.shape[:-2], kernel - 1, x.shape[-1], dtype=x.dtype), x], -2)
    out = sum(weight[:, 0, j] * padded[..., j:j + time, :] for j in range(kernel))
    return out if bias is None else out + bias


def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def per_head(t, heads):
    """[B, T, heads·d] -> [B, T, heads, d]"""
    return t.reshape(*t.shape[:-1], heads, t.shape[-1] // heads)


def silu(x):
    return x * torch.sigmoid(x)


# --------------------------------------------------------- the five cells
# Each cell scanned directly, with a given initial state: every step's output and the final state.
CELL_SHAPES = [(2, 5, 2, 3, 4), (1, 1, 1, 2, 2), (3, 4, 3, 4, 3)]  # batch, time, heads, dk, dv


def _scan_model(cell, args, dims):
    decl = "\n".join(f"  input {n}: [{', '.join(str(d) for d in shape)}]" for n, shape in dims.items())
    return (f"import std.linear_rnn\nmodel Wrap() {{\n{decl}\n"
            f"  y, final = scan {cell}({args}) over T\n  output y\n  output final\n}}\n")


@pytest.mark.parametrize("batch, time, heads, dk, dv", CELL_SHAPES)
def test_scalar_decay_step_is_the_recurrence(batch, time, heads, dk, dv):
    dims = {"q": ("B", heads, "T", dk), "k": ("B", heads, "T", dk), "v": ("B", heads, "T", dv),
            "gamma": ("B", heads, "T", 1), "S0": ("B", heads, dk, dv)}
    model = build(_scan_model("ScalarDecayStep", "q, k, v, gamma, S=S0", dims))
    q, k = randn(batch, heads, time, dk, seed=1), randn(batch, heads, time, dk, seed=2)
    v = randn(batch, heads, time, dv, seed=3)
    gamma = torch.rand(batch, heads, time, 1, dtype=DT, generator=torch.Generator().manual_seed(4))
    S0 = randn(batch, heads, dk, dv, seed=5)

    def reference(q, k, v, gamma, S, W):  # S_t = γ_t S_{t−1} + k_tᵀ v_t, o_t = q_t S_t
        outs = []
        for t in range(time):
            kv = k[:, :, t, :, None] @ v[:, :, t, None, :]             # k_tᵀ v_t: [B, heads, dk, dv]
            S = gamma[:, :, t, :, None] * S + kv
            outs.append((q[:, :, t, None, :] @ S).squeeze(-2))        # q_t S_t
        return torch.stack(outs, 2), S

    check_against(model, reference, [q, k, v, gamma, S0], outputs=2)


@pytest.mark.parametrize("batch, time, heads, dk, dv", CELL_SHAPES)
def test_gla_step_is_the_recurrence(batch, time, heads, dk, dv):
    dims = {"q": ("B", heads, "T", dk), "k": ("B", heads, "T", dk), "v": ("B", heads, "T", dv),
            "alpha": ("B", heads, "T", dk), "S0": ("B", heads, dk, dv)}
    model = build(_scan_model("GLAStep", "q, k, v, alpha, S=S0", dims))
    q, k = randn(batch, heads, time, dk, seed=1), randn(batch, heads, time, dk, seed=2)
    v = randn(batch, heads, time, dv, seed=3)
    alpha = torch.rand(batch, heads, time, dk, dtype=DT, generator=torch.Generator().manual_seed(4))
    S0 = randn(batch, heads, dk, dv, seed=5)

    def reference(q, k, v, alpha, S, W):  # S_t = diag(α_t) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t
        outs = []
        for t in range(time):
            S = torch.diag_embed(alpha[:, :, t]) @ S + k[:, :, t, :, None] @ v[:, :, t, None, :]
            outs.append((q[:, :, t, None, :] @ S).squeeze(-2))
        return torch.stack(outs, 2), S

    check_against(model, reference, [q, k, v, alpha, S0], outputs=2)


@pytest.mark.parametrize("batch, time, heads, dk, dv", CELL_SHAPES)
def test_gated_delta_step_is_the_recurrence(batch, time, heads, dk, dv):
    dims = {"q": ("B", heads, "T", dk), "k": ("B", heads, "T", dk), "v": ("B", heads, "T", dv),
            "alpha": ("B", heads, "T", 1), "beta": ("B", heads, "T", 1), "S0": ("B", heads, dv, dk)}
    model = build(_scan_model("GatedDeltaStep", "q, k, v, alpha, beta, S=S0", dims))
    q, k = randn(batch, heads, time, dk, seed=1), randn(batch, heads, time, dk, seed=2)
    v = randn(batch, heads, time, dv, seed=3)
    gen = torch.Generator().manual_seed(4)
    alpha, beta = (torch.rand(batch, heads, time, 1, dtype=DT, generator=gen) for _ in range(2))
    S0 = randn(batch, heads, dv, dk, seed=5)

    def reference(q, k, v, alpha, beta, S, W):  # S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t
        eye = torch.eye(dk, dtype=DT)
        outs = []
        for t in range(time):
            a, b = alpha[:, :, t, :, None], beta[:, :, t, :, None]      # [B, heads, 1, 1]
            kt, vt, qt = k[:, :, t, :, None], v[:, :, t, :, None], q[:, :, t, :, None]  # columns
            S = a * S @ (eye - b * kt @ kt.transpose(-1, -2)) + b * vt @ kt.transpose(-1, -2)
            outs.append((S @ qt).squeeze(-1))
        return torch.stack(outs, 2), S

    check_against(model, reference, [q, k, v, alpha, beta, S0], outputs=2)


@pytest.mark.parametrize("batch, time, d", [(2, 5, 3), (1, 1, 4), (3, 6, 1)])
def test_hgrn_step_is_the_recurrence(batch, time, d):
    dims = {"i": ("B", "T", d), "f": ("B", "T", d), "h0": ("B", d)}
    model = build(_scan_model("HGRNStep", "i, f, h=h0", dims))
    i, h0 = randn(batch, time, d, seed=1), randn(batch, d, seed=2)
    f = torch.rand(batch, time, d, dtype=DT, generator=torch.Generator().manual_seed(3))

    def reference(i, f, h, W):  # h_t = f_t ⊙ h_{t−1} + (1 − f_t) ⊙ i_t
        outs = []
        for t in range(time):
            h = f[:, t] * h + (1 - f[:, t]) * i[:, t]
            outs.append(h)
        return torch.stack(outs, 1), h

    check_against(model, reference, [i, f, h0], outputs=2)


@pytest.mark.parametrize("batch, time, e, n", [(2, 5, 3, 4), (1, 1, 2, 2), (3, 4, 5, 1)])
def test_selective_scan_step_is_the_recurrence(batch, time, e, n):
    dims = {"decay": ("B", "T", e, n), "drive": ("B", "T", e, n), "C": ("B", "T", n), "h0": ("B", e, n)}
    model = build(_scan_model("SelectiveScanStep", "decay, drive, C, h=h0", dims))
    decay = torch.rand(batch, time, e, n, dtype=DT, generator=torch.Generator().manual_seed(1))
    drive, C, h0 = randn(batch, time, e, n, seed=2), randn(batch, time, n, seed=3), randn(batch, e, n, seed=4)

    def reference(decay, drive, C, h, W):  # h_t = exp(Δ_t A) ⊙ h_{t−1} + Δ_t B_t x_t, y_t = C_t h_t
        outs = []
        for t in range(time):
            h = decay[:, t] * h + drive[:, t]
            outs.append((h @ C[:, t, :, None]).squeeze(-1))
        return torch.stack(outs, 1), h

    check_against(model, reference, [decay, drive, C, h0], outputs=2)


# --------------------------------------------------------------- the blocks
BLOCK_SHAPES = [(2, 5, 8, 2), (1, 1, 6, 1), (3, 4, 12, 3)]  # batch, time, D, heads


def qkv(x, W, p, heads, short_conv):
    """q, k, v per head: x W, through SiLU(causal depthwise conv) with short convolutions: [B, T, heads, d] each."""
    def branch(name):
        y = lin(x, W, f"{p}.{name}.x_proj", False)
        return silu(causal_depthwise_conv(y, W[f"{p}.{name}_1.conv.weight"])) if short_conv else y

    return tuple(per_head(branch(n), heads) for n in "qkv")


def rotary(t):
    """RoPE on [B, T, heads, dk]: the halves (t₁, t₂) ↦ (t₁ cos − t₂ sin, t₂ cos + t₁ sin) at angle s θ_i,
    θ_i = 10000^{−2i/dk}, for position s = 0, 1, …; the angles, cosines and sines in float32, as fla's
    RotaryEmbedding computes them (whatever the model's dtype)."""
    time, dk = t.shape[1], t.shape[-1]
    theta = 1.0 / 10000.0 ** (torch.arange(0, dk, 2, dtype=torch.float32) / dk)  # [dk/2]
    angle = torch.arange(time, dtype=torch.float32)[:, None] * theta             # [T, dk/2]
    cos, sin = (f(angle).to(DT)[:, None, :] for f in (torch.cos, torch.sin))     # [T, 1, dk/2]
    t1, t2 = t[..., :dk // 2], t[..., dk // 2:]
    return torch.cat([t1 * cos - t2 * sin, t2 * cos + t1 * sin], -1)


def group_norm_per_head(o, W, name, eps=1e-5):
    """GroupNorm with one group per head over [B, T, heads, dv], a weight and bias per channel: [B, T, heads·dv]."""
    batch, time = o.shape[:2]
    mean, var = o.mean(-1, keepdim=True), o.var(-1, unbiased=False, keepdim=True)
    return ((o - mean) / torch.sqrt(var + eps)).reshape(batch, time, -1) * W[f"{name}.weight"] + W[f"{name}.bias"]


def retnet_reference(x, W, heads, key_dim, value_dim, paper=False, p="RetNet"):
    """Multi-scale retention (Sun et al. 2023), recurrent form, as fla's MultiScaleRetention: q, k rotated (RoPE),
    q scaled by dk^{−½}, γ_h = 1 − 2^{−5−h}; y = (RMSNorm_h(o) ⊙ swish(x W_G)) W_O. `paper`: no rotation or scale,
    GroupNorm_h."""
    batch, time, d = x.shape
    q, k, v = qkv(x, W, p, heads, False)
    if not paper:
        q, k = rotary(q) * (key_dim // heads) ** -0.5, rotary(k)
    gamma = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(heads)], dtype=DT)[:, None, None]
    S = torch.zeros(batch, heads, key_dim // heads, value_dim // heads, dtype=DT)
    outs = []
    for t in range(time):
        S = gamma * S + k[:, t, :, :, None] @ v[:, t, :, None, :]     # S_t = γ S_{t−1} + k_tᵀ v_t
        outs.append((q[:, t, :, None, :] @ S).squeeze(-2))           # o_t = q_t S_t
    o = torch.stack(outs, 1)                                          # [B, T, heads, dv]
    if paper:
        o = group_norm_per_head(o, W, f"{p}.o_norm.norm")
    else:
        o = rms_norm(o, W[f"{p}.o_norm.norm.weight"], 1e-5).reshape(batch, time, value_dim)
    g = silu(lin(x, W, f"{p}.g.x_proj", False))
    return lin(g * o, W, f"{p}.y.proj", False)


@pytest.mark.parametrize("batch, time, d, heads", BLOCK_SHAPES)
def test_retnet_equals_its_equation(batch, time, d, heads):
    model = build(wrapper(f"RetNet(x, heads={heads})", f"  input x: [B, T, {d}]"))
    check_against(model, lambda x, W: retnet_reference(x, W, heads, d, 2 * d), [randn(batch, time, d, seed=1)])


def test_retnet_in_the_papers_form():
    batch, time, d, heads = 2, 5, 8, 2
    model = build(wrapper(f'RetNet(x, heads={heads}, value_dim={d}, rotary=false, norm="group", scale=1.0)',
                          f"  input x: [B, T, {d}]"))
    check_against(model, lambda x, W: retnet_reference(x, W, heads, d, d, paper=True), [randn(batch, time, d, seed=3)])


def simple_gla_reference(x, W, heads, key_dim, value_dim, tau=16.0, short_conv=True, scale=None, p="SimpleGLA"):
    """As fla's SimpleGatedLinearAttention: q, k, v through short convolutions, q scaled by dk^{−½};
    γ_t = σ(x w_γ + b)^{1/τ} per head, S_t = γ_t S_{t−1} + k_tᵀ v_t, o_t = q_t S_t; y = (RMSNorm_h(o) ⊙ SiLU(x W_g)) W_O."""
    batch, time, d = x.shape
    q, k, v = qkv(x, W, p, heads, short_conv)
    q = q * ((key_dim // heads) ** -0.5 if scale is None else scale)
    gamma = torch.sigmoid(lin(x, W, f"{p}.gamma.x_proj", True)) ** (1 / tau)   # [B, T, heads]
    S = torch.zeros(batch, heads, key_dim // heads, value_dim // heads, dtype=DT)
    outs = []
    for t in range(time):
        S = gamma[:, t, :, None, None] * S + k[:, t, :, :, None] @ v[:, t, :, None, :]
        outs.append((q[:, t, :, None, :] @ S).squeeze(-2))
    o = rms_norm(torch.stack(outs, 1), W[f"{p}.o_norm.norm.weight"], 1e-5).reshape(batch, time, value_dim)
    g = silu(lin(x, W, f"{p}.g.x_proj", False))
    return lin(o * g, W, f"{p}.y.proj", False)


@pytest.mark.parametrize("batch, time, d, heads", BLOCK_SHAPES)
def test_simple_gla_equals_its_equation(batch, time, d, heads):
    model = build(wrapper(f"SimpleGLA(x, heads={heads})", f"  input x: [B, T, {d}]"))
    check_against(model, lambda x, W: simple_gla_reference(x, W, heads, d, d), [randn(batch, time, d, seed=1)])


def test_simple_gla_with_other_sizes_and_tau_without_convolutions_or_scale():
    batch, time, d, heads, key_dim, value_dim, tau = 2, 4, 6, 2, 10, 4, 4.0
    model = build(wrapper(f"SimpleGLA(x, heads={heads}, key_dim={key_dim}, value_dim={value_dim}, tau={tau}, "
                          "short_conv=false, scale=1.0)", f"  input x: [B, T, {d}]"))
    check_against(model, lambda x, W: simple_gla_reference(x, W, heads, key_dim, value_dim, tau, False, 1.0),
                  [randn(batch, time, d, seed=3)])


def gla_reference(x, W, heads, key_dim, tau=16.0, paper=False, p="GLA"):
    """GLA (Yang et al. 2024) as fla's GatedLinearAttention: q scaled by dk^{−½}, α_t = σ(x W¹ W² + b)^{1/τ},
    S_t = diag(α_t) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t; y = (RMSNorm_h(o) ⊙ SiLU(x W_g)) W_O. `paper`: q unscaled,
    y = (LayerNorm_h(o) ⊙ SiLU(x W_r + b_r)) W_O."""
    batch, time, d = x.shape
    q, k, v = qkv(x, W, p, heads, False)
    if not paper:
        q = q * (key_dim // heads) ** -0.5
    low_rank = W[f"{p}.alpha.x_proj.weight"].T @ W[f"{p}.alpha.proj.weight"].T          # W¹ W²: [D, dk]
    alpha = per_head(torch.sigmoid(x @ low_rank + W[f"{p}.alpha.proj.bias"]) ** (1 / tau), heads)
    S = torch.zeros(batch, heads, key_dim // heads, d // heads, dtype=DT)
    outs = []
    for t in range(time):
        S = torch.diag_embed(alpha[:, t]) @ S + k[:, t, :, :, None] @ v[:, t, :, None, :]
        outs.append((q[:, t, :, None, :] @ S).squeeze(-2))
    o = torch.stack(outs, 1)
    if paper:
        o = layer_norm(o, W[f"{p}.o_norm.norm.weight"], W[f"{p}.o_norm.norm.bias"], 1e-5)
    else:
        o = rms_norm(o, W[f"{p}.o_norm.norm.weight"], 1e-5)
    g = silu(lin(x, W, f"{p}.g.x_proj", paper))
    return lin(o.reshape(batch, time, d) * g, W, f"{p}.y.proj", False)


@pytest.mark.parametrize("batch, time, d, heads", BLOCK_SHAPES)
def test_gla_equals_its_equation(batch, time, d, heads):
    model = build(wrapper(f"GLA(x, heads={heads})", f"  input x: [B, T, {d}]"))
    check_against(model, lambda x, W: gla_reference(x, W, heads, d // 2), [randn(batch, time, d, seed=1)])


def test_gla_with_other_key_dim_rank_and_tau():
    batch, time, d, heads, key_dim, tau = 2, 6, 8, 4, 12, 2.0
    model = build(wrapper(f"GLA(x, heads={heads}, key_dim={key_dim}, rank=3, tau={tau})", f"  input x: [B, T, {d}]"))
    assert model.get_parameter("GLA.alpha.x_proj.weight").shape == (3, d)
    check_against(model, lambda x, W: gla_reference(x, W, heads, key_dim, tau), [randn(batch, time, d, seed=2)])


def test_gla_in_the_papers_form():
    batch, time, d, heads = 2, 5, 8, 2
    model = build(wrapper(f'GLA(x, heads={heads}, norm="layer", gate_bias=true, scale=1.0)', f"  input x: [B, T, {d}]"))
    check_against(model, lambda x, W: gla_reference(x, W, heads, d // 2, paper=True), [randn(batch, time, d, seed=3)])


def gated_deltanet_reference(x, W, heads, head_dim=None, v_heads=None, v_head_dim=None, norm_eps=1e-5, gate=True,
                             conv_bias=False, p="GatedDeltaNet"):
    """Gated DeltaNet as fla's layer: q, k, v = SiLU(causal conv(x W)), q ← q/‖q‖·dk^−½, k ← k/‖k‖; each key
    head serving v_heads/heads consecutive value heads; α_t = exp(−exp(A_log) softplus(x w_α + dt_bias)),
    β_t = σ(x w_β); S_t = α_t S_{t−1}(I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t;
    y = (RMSNorm_h(o) ⊙ SiLU(x W_g)) W_O."""
    batch, time, d = x.shape
    head_dim = head_dim or math.ceil(3 * d / (4 * heads))
    v_heads, v_head_dim = v_heads or heads, v_head_dim or 2 * head_dim

    def branch(name):
        conv = f"{p}.{name}.conv"
        return silu(causal_depthwise_conv(lin(x, W, f"{p}.{name}.x_proj", False), W[conv + ".weight"],
                                          W[conv + ".bias"] if conv_bias else None))

    q, k, v = per_head(branch("q"), heads), per_head(branch("k"), heads), per_head(branch("v"), v_heads)
    q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6) / math.sqrt(head_dim)
    k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    q, k = (t.repeat_interleave(v_heads // heads, dim=2) for t in (q, k))  # [B, T, v_heads, dk]
    pre = lin(x, W, f"{p}.alpha.x_proj", False) + W[f"{p}.dt_bias"]
    alpha = torch.exp(-torch.exp(W[f"{p}.A_log"]) * F.softplus(pre))  # [B, T, v_heads]
    beta = torch.sigmoid(lin(x, W, f"{p}.beta.x_proj", False))
    eye = torch.eye(head_dim, dtype=DT)
    S = torch.zeros(batch, v_heads, v_head_dim, head_dim, dtype=DT)  # [B, v_heads, dv, dk]
    outs = []
    for t in range(time):
        a, b = alpha[:, t, :, None, None], beta[:, t, :, None, None]
        kt, vt, qt = k[:, t, :, :, None], v[:, t, :, :, None], q[:, t, :, :, None]
        S = a * S @ (eye - b * kt @ kt.transpose(-1, -2)) + b * vt @ kt.transpose(-1, -2)
        outs.append((S @ qt).squeeze(-1))
    o = rms_norm(torch.stack(outs, 1), W[f"{p}.o_norm.norm.weight"], norm_eps).reshape(batch, time, -1)
    if gate:
        o = o * silu(lin(x, W, f"{p}.g.x_proj", False))
    return lin(o, W, f"{p}.y.o_norm_proj", False)


@pytest.mark.parametrize("batch, time, d, heads", BLOCK_SHAPES)
def test_gated_deltanet_equals_its_equation(batch, time, d, heads):
    model = build(wrapper(f"GatedDeltaNet(x, heads={heads})", f"  input x: [B, T, {d}]"))
    check_against(model, lambda x, W: gated_deltanet_reference(x, W, heads), [randn(batch, time, d, seed=1)])


@pytest.mark.parametrize("sizes", [dict(heads=2, head_dim=3, v_heads=4, v_head_dim=5),
                                   dict(heads=1, head_dim=4, v_heads=3, v_head_dim=2, gate=False),
                                   dict(heads=2, head_dim=2, v_heads=2, v_head_dim=3, norm_eps=1e-6, conv_bias=True)])
def test_gated_deltanet_with_value_heads_sizes_and_options(sizes):
    """More value heads than key heads, key and value head sizes set apart, no output gate, another eps, conv biases."""
    args = ", ".join(f"{k}={str(v).lower()}" for k, v in sizes.items())
    model = build(wrapper(f"GatedDeltaNet(x, {args})", "  input x: [B, T, 8]"))
    check_against(model, lambda x, W: gated_deltanet_reference(x, W, **sizes), [randn(2, 5, 8, seed=3)])


def hgrn_layer_reference(x, lower, W, p):
    """HGRN: f_t = lb + (1 − lb) σ(x W_f), i_t = SiLU(x W_i), h_t = f_t h_{t−1} + (1 − f_t) i_t;
    y = (RMSNorm(h) ⊙ SiLU(x W_g)) W_O."""
    f = lower + (1 - lower) * torch.sigmoid(lin(x, W, f"{p}.f.x_proj", False))
    i = silu(lin(x, W, f"{p}.i.x_proj", False))
    h = torch.zeros(x.shape[0], x.shape[-1], dtype=DT)
    outs = []
    for t in range(x.shape[1]):
        h = f[:, t] * h + (1 - f[:, t]) * i[:, t]
        outs.append(h)
    h = torch.stack(outs, 1)
    g = silu(lin(x, W, f"{p}.g.x_proj", False))
    return lin(rms_norm(h, W[f"{p}.y.norm.weight"], 1e-5) * g, W, f"{p}.y.proj", False)


@pytest.mark.parametrize("batch, time, d", [(2, 5, 4), (1, 1, 3), (3, 4, 6)])
def test_hgrn_equals_its_equation(batch, time, d):
    model = build(wrapper("HGRN(x, lb)", f"  input x: [B, T, {d}]\n  input lb: [{d}]"))
    lb = torch.rand(d, dtype=DT, generator=torch.Generator().manual_seed(2))
    check_against(model, lambda x, lb, W: hgrn_layer_reference(x, lb, W, "HGRN"), [randn(batch, time, d, seed=1), lb])


@pytest.mark.parametrize("batch, time, d, layers", [(2, 5, 4, 3), (1, 1, 3, 1), (3, 4, 6, 2)])
def test_hgrn_stack_equals_its_equation(batch, time, d, layers):
    """lb = cumsum(softmax(Γ, over layers)) − softmax(Γ)_0; h ← h + HGRN(RMSNorm(h), lb_l)."""
    model = build(wrapper(f"HGRNStack(x, layers={layers})", f"  input x: [B, T, {d}]"))

    def reference(x, W):
        w = torch.softmax(W["HGRNStack.bounds"], dim=0)
        bounds = torch.cumsum(w, 0) - w[0]
        h = x
        for layer in range(layers):
            scope = f"HGRNStack.layers.{layer}"
            h = h + hgrn_layer_reference(rms_norm(h, W[f"{scope}.h.norm.weight"], 1e-5), bounds[layer], W,
                                         f"{scope}.HGRN")
        return h

    check_against(model, reference, [randn(batch, time, d, seed=1)])


def test_hgrn_stack_lower_bounds_start_at_zero_and_rise():
    model = gatedsl.compile(wrapper("HGRNStack(x, layers=4)", "  input x: [B, T, 3]"))
    gamma = model.get_parameter("HGRNStack.bounds")
    assert torch.equal(gamma, torch.zeros(4, 3))  # Γ from zeros: the bounds are 0, 1/4, 2/4, 3/4
    w = torch.softmax(gamma, 0)
    torch.testing.assert_close(torch.cumsum(w, 0) - w[0], torch.tensor([0, 0.25, 0.5, 0.75])[:, None].expand(4, 3))


def mamba_reference(x, W, state_size, conv, p="Mamba"):
    """Mamba (Gu & Dao 2023), A_log stored as MambaMixer stores it:
    u = SiLU(conv(x W_u)), z = x W_z, Δ = softplus(u W¹ W² + b), B = u W_B, C = u W_C, A = −exp(A_log);
    h_t = exp(Δ_t A) h_{t−1} + Δ_t B_t u_t, y_t = C_t h_t + D u_t; out = (y ⊙ SiLU(z)) W_out."""
    batch, time, _ = x.shape
    u = silu(causal_depthwise_conv(lin(x, W, f"{p}.u.x_proj", False), W[f"{p}.u.conv.weight"],
                                   W[f"{p}.u.conv.bias"]))
    z = lin(x, W, f"{p}.z.x_proj", False)
    dt = F.softplus(lin(lin(u, W, f"{p}.dt.u_proj", False), W, f"{p}.dt.proj", True))      # [B, T, E]
    B, C = lin(u, W, f"{p}.B_t.u_proj", False), lin(u, W, f"{p}.C_t.u_proj", False)          # [B, T, N]
    A = -torch.exp(W[f"{p}.A_log"])                                                          # [E, N]
    h = torch.zeros(batch, u.shape[-1], state_size, dtype=DT)
    ys = []
    for t in range(time):
        h = torch.exp(dt[:, t, :, None] * A) * h + dt[:, t, :, None] * B[:, t, None, :] * u[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + W[f"{p}.D_skip"] * u[:, t])
    y = torch.stack(ys, 1)
    return lin(y * silu(z), W, f"{p}.out.proj", False)


@pytest.mark.parametrize("batch, time, d, state_size, expand, conv", [
    (2, 5, 4, 3, 2, 4), (1, 1, 3, 2, 1, 4), (3, 6, 5, 4, 2, 2), (2, 3, 34, 2, 1, 3)])
def test_mamba_equals_its_equation(batch, time, d, state_size, expand, conv):
    model = build(wrapper(f"Mamba(x, state_size={state_size}, expand={expand}, conv={conv})",
                          f"  input x: [B, T, {d}]"))
    dt_rank = math.ceil(d / 16)
    assert model.get_parameter("Mamba.dt.u_proj.weight").shape == (dt_rank, expand * d)
    check_against(model, lambda x, W: mamba_reference(x, W, state_size, conv), [randn(batch, time, d, seed=1)])


def test_mamba_initialisation():
    """At init: the S4D-real A_n = −n, D = 1, and Δ = softplus(b) in [0.001, 0.1] (tests/test_mamba_vs_transformers.py
    compares every parameter's init with MambaMixer's)."""
    n, d, expand = 5, 4, 2
    model = gatedsl.compile(wrapper(f"Mamba(x, state_size={n}, expand={expand})", f"  input x: [B, T, {d}]"))
    A = -torch.exp(model.get_parameter("Mamba.A_log"))
    torch.testing.assert_close(A, -torch.arange(1, n + 1, dtype=torch.float32).expand(expand * d, n))
    assert torch.equal(model.get_parameter("Mamba.D_skip"), torch.ones(expand * d))
    dt = F.softplus(model.get_parameter("Mamba.dt.proj.bias"))
    assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)


def gam_reference(x, W, p="GatedAssociativeMemory"):
    """y = σ(x W_l + b_l) ⊙ CausalConv(x) + σ(x W_g + b_g) ⊙ softmax(x Mᵀ) M (Acharya 2025)."""
    local = causal_depthwise_conv(x, W[f"{p}.local.conv.weight"], W[f"{p}.local.conv.bias"])
    M = W[f"{p}.bank"]
    memory = torch.softmax(x @ M.T, dim=-1) @ M
    return (torch.sigmoid(lin(x, W, f"{p}.g_l.x_proj", True)) * local
            + torch.sigmoid(lin(x, W, f"{p}.g_g.x_proj", True)) * memory)


@pytest.mark.parametrize("batch, time, d, slots, kernel", [(2, 5, 4, 7, 3), (1, 1, 3, 2, 3), (3, 6, 5, 16, 1)])
def test_gated_associative_memory_equals_its_equation(batch, time, d, slots, kernel):
    model = build(wrapper(f"GatedAssociativeMemory(x, slots={slots}, kernel={kernel})", f"  input x: [B, T, {d}]"))
    check_against(model, gam_reference, [randn(batch, time, d, seed=1)])


def test_gated_associative_memory_bank_is_xavier_uniform():
    d, slots = 6, 512
    model = gatedsl.compile(wrapper("GatedAssociativeMemory(x)", f"  input x: [B, T, {d}]"))
    bank = model.get_parameter("GatedAssociativeMemory.bank")
    assert bank.shape == (slots, d)
    bound = math.sqrt(6 / (slots + d))
    assert bank.abs().max() <= bound and bank.abs().max() > 0.9 * bound


# ----------------------------------------- any time-axis name, extra batch dims
@pytest.mark.parametrize("call, reference", [
    ("GLA(x, heads=2)", lambda x, W: gla_reference(x, W, 2, 4)),
    ("GatedDeltaNet(x, heads=2)", lambda x, W: gated_deltanet_reference(x, W, 2)),
    ("Mamba(x, state_size=3)", lambda x, W: mamba_reference(x, W, 3, 4)),
    ("RetNet(x, heads=4)", lambda x, W: retnet_reference(x, W, 4, 8, 16)),
])
def test_blocks_scan_the_callers_time_axis_under_any_name_with_extra_batch_dims(call, reference):
    """x: [N, C, L, 8]: the block's `*` is [N, C] and its T is the caller's L; the same as [N·C, L, 8]."""
    model = build(wrapper(call, "  input x: [N, C, L, 8]"))

    def flat_reference(x, W):
        return reference(x.reshape(-1, *x.shape[2:]), W).reshape(*x.shape[:2], *x.shape[2:])

    check_against(model, flat_reference, [randn(2, 3, 5, 8, seed=4)])


# -------------------------------------------------------- parameter counts
def _count(call: str, d: int) -> int:
    report = gatedsl.check(wrapper(call, f"  input x: [B, T, {d}]"))
    model = gatedsl.compile(wrapper(call, f"  input x: [B, T, {d}]"))
    assert sum(p.numel() for p in model.parameters()) == report.params
    return report.params


@pytest.mark.parametrize("d, heads, key_dim", [(8, 2, 8), (12, 3, 6), (16, 1, 4)])
def test_retnet_and_simple_gla_parameter_counts(d, heads, key_dim):
    # RetNet: W_Q, W_K (D x dk), W_V, W_G (D x 2D), W_O (2D x D), RMSNorm weight (dv = 2D/heads)
    assert _count(f"RetNet(x, heads={heads}, key_dim={key_dim})", d) == 2 * d * key_dim + 6 * d * d + 2 * d // heads
    # Simple GLA: W_Q, W_K (D x dk), W_V, W_g, W_O (D x D), the convolutions of width 4 (dk, dk, D channels),
    # w_γ (D x heads) + b_γ (heads), RMSNorm weight (dv = D/heads)
    assert _count(f"SimpleGLA(x, heads={heads}, key_dim={key_dim})", d) == \
        2 * d * key_dim + 3 * d * d + 4 * (2 * key_dim + d) + (d * heads + heads) + d // heads


@pytest.mark.parametrize("d, heads, key_dim, rank", [(8, 2, 4, 16), (12, 3, 6, 4), (16, 4, 16, 2)])
def test_gla_parameter_count(d, heads, key_dim, rank):
    # W_Q, W_K (D x dk), W_V (D x D), W¹ (D x r), W² (r x dk) + b (dk), RMSNorm (dv), W_g (D x D), W_O (D x D)
    expected = 2 * d * key_dim + d * d + (d * rank + rank * key_dim + key_dim) + d // heads + d * d + d * d
    assert _count(f"GLA(x, heads={heads}, key_dim={key_dim}, rank={rank})", d) == expected


@pytest.mark.parametrize("d, heads, v_heads, dk, dv, conv",
                         [(8, 2, 2, 3, 6, 4), (12, 3, 6, 2, 5, 2), (6, 1, 1, 4, 4, 1)])
def test_gated_deltanet_parameter_count(d, heads, v_heads, dk, dv, conv):
    # W_q, W_k (D x heads·dk), W_v (D x v_heads·dv) with their convolutions (channels x kernel, no bias);
    # A_log, dt_bias, w_α, w_β (v_heads, v_heads, D x v_heads each); RMSNorm (dv); W_g and W_O (D x v_heads·dv)
    key, value = heads * dk, v_heads * dv
    expected = 2 * (d * key + key * conv) + (d * value + value * conv) + 2 * v_heads + 2 * d * v_heads + dv \
        + 2 * d * value
    call = f"GatedDeltaNet(x, heads={heads}, v_heads={v_heads}, head_dim={dk}, v_head_dim={dv}, conv={conv})"
    assert _count(call, d) == expected


@pytest.mark.parametrize("d, layers", [(4, 1), (6, 3), (16, 2)])
def test_hgrn_parameter_counts(d, layers):
    # One layer: W_f, W_i, W_g, W_O (D x D), RMSNorm weight (D). The stack: Γ (layers x D) and per layer a pre-norm (D).
    report = gatedsl.check(wrapper("HGRN(x, lb)", f"  input x: [B, T, {d}]\n  input lb: [{d}]"))
    assert report.params == 4 * d * d + d
    assert _count(f"HGRNStack(x, layers={layers})", d) == layers * d + layers * (d + 4 * d * d + d)


@pytest.mark.parametrize("d, n, expand, conv", [(16, 16, 2, 4), (40, 8, 1, 3), (5, 4, 3, 2)])
def test_mamba_parameter_count(d, n, expand, conv):
    e, r = expand * d, math.ceil(d / 16)
    # W_u, W_z (D x E); conv (E x kernel + E); W¹_Δ (E x R), W²_Δ (R x E) + b_Δ (E); W_B, W_C (E x N);
    # A_log (E x N); D (E); W_out (E x D)
    expected = 2 * d * e + (e * conv + e) + (e * r + r * e + e) + 2 * e * n + e * n + e + e * d
    assert _count(f"Mamba(x, state_size={n}, expand={expand}, conv={conv})", d) == expected


@pytest.mark.parametrize("d, slots, kernel", [(6, 512, 3), (16, 32, 4), (3, 1, 1)])
def test_gated_associative_memory_parameter_count(d, slots, kernel):
    # M (slots x D), the depthwise conv (D x kernel + D), two gates (D x D + D each)
    assert _count(f"GatedAssociativeMemory(x, slots={slots}, kernel={kernel})", d) == \
        slots * d + d * kernel + d + 2 * (d * d + d)


# ------------------------------------------------------------ gates and kinds
@pytest.mark.parametrize("call, gates", [
    ("RetNet(x, heads=2)", {"RetNet.g": "silu"}),
    ("SimpleGLA(x, heads=2)", {"SimpleGLA.gamma": "sigmoid", "SimpleGLA.g": "silu"}),
    ("GLA(x, heads=2)", {"GLA.alpha": "sigmoid", "GLA.g": "silu"}),
    ("GatedDeltaNet(x, heads=2)", {"GatedDeltaNet.alpha": "sigmoid", "GatedDeltaNet.beta": "sigmoid",
                                   "GatedDeltaNet.g": "silu"}),
    ("HGRN(x, lb)", {"HGRN.f": "sigmoid", "HGRN.g": "silu"}),
    ("HGRNStack(x, layers=2)", {f"HGRNStack.layers.{i}.HGRN.{g}": k for i in range(2)
                                for g, k in (("f", "sigmoid"), ("g", "silu"))}),
    ("Mamba(x)", {"Mamba.decay": "sigmoid", "Mamba.z": "silu"}),
    ("GatedAssociativeMemory(x)", {"GatedAssociativeMemory.g_l": "sigmoid", "GatedAssociativeMemory.g_g": "sigmoid"}),
])
def test_gates_and_kinds(call, gates):
    inputs = "  input x: [B, T, 8]" + ("\n  input lb: [8]" if "lb" in call else "")
    report = gatedsl.check(wrapper(call, inputs))
    assert {g.name: g.kind for g in report.gates} == gates


def test_compile_json_lists_the_gates(tmp_path):
    """The same gates through `gatedsl compile --json`, as a search tool would read them."""
    import json
    import subprocess
    import sys

    spec = tmp_path / "m.gate"
    spec.write_text(wrapper("GLA(x, heads=2) + Mamba(x)", "  input x: [B, T, 8]"))
    out = subprocess.run([sys.executable, "-m", "gatedsl", "compile", str(spec), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = {g["name"]: g["kind"] for g in json.loads(out.stdout)["gates"]}
    assert listed == {"GLA.alpha": "sigmoid", "GLA.g": "silu", "Mamba.decay": "sigmoid", "Mamba.z": "silu"}


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("call", ["GLA(x, heads=3)", "RetNet(x, heads=5)"])
def test_heads_must_divide(call):
    with pytest.raises(gatedsl.SpecError, match="heads must divide"):
        gatedsl.check(wrapper(call, "  input x: [B, T, 8]"))


@pytest.mark.parametrize("call, message", [("GatedDeltaNet(x, heads=2, v_heads=3)", "v_heads must be a multiple"),
                                           ("GatedDeltaNet(x, heads=4, v_heads=2)", "v_heads must be a multiple"),
                                           ("GatedDeltaNet(x, head_dim=0)", "head_dim and v_head_dim must be positive"),
                                           ("GatedDeltaNet(x, init=\"mamba\")", "init")])
def test_gated_deltanet_sizes_are_checked(call, message):
    """Value heads that key heads do not divide, empty heads, an init of neither reference."""
    with pytest.raises(gatedsl.SpecError, match=message):
        gatedsl.check(wrapper(call, "  input x: [B, T, 8]"))


# ------------------------------------------------- the scan's backward cost
def test_scan_slices_each_sequence_once():
    """runtime.scan unbinds each sequence once (one UnbindBackward node, whose backward is one stack) instead of
    selecting step t from it (a SelectBackward node per step, each building a full-size zero gradient: quadratic
    in T, and 2-3x slower training of examples/mamba_model.py)."""
    model = gatedsl.compile(wrapper("Mamba(x, state_size=2)", "  input x: [B, T, 4]"))
    y = model(torch.randn(2, 9, 4, requires_grad=True))
    seen, stack, kinds = set(), [y.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.append(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert kinds.count("UnbindBackward0") == 3  # decay, drive and C_t, each sliced once
    assert "SelectBackward0" not in kinds
