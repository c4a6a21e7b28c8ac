"""The feature gates, gated convolutions and attention gates of the standard library equal their equations.

std.mlp (GeGLU, ReGLU), std.gating (squeeze-and-excitation, gated residuals, fusion and
binary gates), std.conv (HorNet's gnConv, the gated long convolution) and std.attention's
block-sparse attention gate. Each reference below is plain PyTorch written from the
equations in GATES.md (and the papers they cite), fed the compiled module's own weights,
in float64: outputs, gradients with respect to every input and every weight, parameter
counts, and the gates with their kinds as `gatedsl compile --json` lists them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gatedsl

TOL = dict(rtol=1e-10, atol=1e-10)
F64 = torch.float64


# ------------------------------------------------------------------ helpers
def wrapper(module: str, inputs: str, call: str, imports: tuple[str, ...] = ()) -> str:
    """A model spec that imports std.MODULE, declares `inputs` and outputs `call`."""
    lines = [f"import std.{m}" for m in (module, *imports)]
    lines += ["model Wrapper() {", *(f"  input {decl}" for decl in inputs.split(";")), f"  output y = {call}", "}"]
    return "\n".join(lines) + "\n"


def compile_double(source: str):
    model = gatedsl.compile(source).double()
    return model, dict(model.named_parameters())


def randn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def assert_matches(model, reference, inputs, seed: int = 0) -> torch.Tensor:
    """Model and reference agree on the output and on the gradients of a random projection of it with respect to
    every input and every weight; the reference gets its own copies of the weights. Returns the model's output."""
    params = dict(model.named_parameters())
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    ours = [x.clone().requires_grad_() for x in inputs]
    theirs = [x.clone().requires_grad_() for x in inputs]
    y, expected = model(*ours), reference(*theirs, p=ref_params)
    torch.testing.assert_close(y, expected, **TOL)
    w = randn(*y.shape, seed=seed + 100)
    (y * w).sum().backward()
    (expected * w).sum().backward()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m, i=i: f"input {i}: {m}")
    for name, p in params.items():
        assert p.grad is not None, f"{name} gets no gradient"
        assert ref_params[name].grad is not None, f"the reference does not use {name}"
        torch.testing.assert_close(p.grad, ref_params[name].grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    return y.detach()


def n_params(params: dict) -> int:
    return sum(p.numel() for p in params.values())


def gates_of(source: str) -> dict[str, str]:
    return {g.name: g.kind for g in gatedsl.check(source).gates}


def linear(x, p, name, bias=True):
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"] if bias else None)


def gelu_erf(x):  # GELU(x) = x Φ(x), the exact form (Hendrycks & Gimpel 2016)
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def swiglu_ref(x, p, prefix):  # y = W_down (SiLU(x W) ⊙ x V), SiLU(z) = z σ(z)
    a = x @ p[f"{prefix}.g.x_proj.weight"].T
    return (a * torch.sigmoid(a)) * (x @ p[f"{prefix}.v.x_proj.weight"].T) @ p[f"{prefix}.y.proj.weight"].T


# --------------------------------------------------------------- std.mlp
ACTIVATIONS = {"GeGLU": (gelu_erf, "gelu"), "ReGLU": (lambda z: z.clamp(min=0), "relu")}


@pytest.mark.parametrize("block", ["GeGLU", "ReGLU"])
@pytest.mark.parametrize("shape, hidden", [((4, 6), None), ((2, 5, 12), None), ((3, 2, 4, 8), 10)])
def test_geglu_reglu_equal_their_equations(block, shape, hidden):
    d = shape[-1]
    dims = ", ".join(["B"] + [str(s) for s in shape[1:]])
    call = f"{block}(x)" if hidden is None else f"{block}(x, hidden={hidden})"
    model, params = compile_double(wrapper("mlp", f"x: [{dims}]", call))
    hidden = hidden or -(-(8 * d // 3) // 8) * 8  # round_up(8·D/3, 8)
    act, kind = ACTIVATIONS[block]

    def reference(x, p):  # y = W_down (act(x W) ⊙ x V), no biases (Shazeer 2020)
        g = act(x @ p[f"{block}.g.x_proj.weight"].T)
        return (g * (x @ p[f"{block}.v.x_proj.weight"].T)) @ p[f"{block}.y.proj.weight"].T

    assert_matches(model, reference, [randn(*shape, seed=1)])
    assert n_params(params) == 3 * d * hidden  # W, V: D → hidden; W_down: hidden → D
    assert params[f"{block}.g.x_proj.weight"].shape == (hidden, d)
    assert gates_of(wrapper("mlp", f"x: [{dims}]", call)) == {f"{block}.g": kind}


def test_glu_family_gate_kinds():
    source = wrapper("mlp", "x: [B, 8]", "GLU(x) + SwiGLU(x) + GeGLU(x) + ReGLU(x)")
    assert gates_of(source) == {"GLU.g": "sigmoid", "SwiGLU.g": "silu", "GeGLU.g": "gelu", "ReGLU.g": "relu"}


def test_geglu_uses_the_exact_gelu_not_the_tanh_approximation():
    model, params = compile_double(wrapper("mlp", "x: [B, 4]", "GeGLU(x, hidden=4)"))
    with torch.no_grad():
        for name in ("GeGLU.g.x_proj.weight", "GeGLU.v.x_proj.weight", "GeGLU.y.proj.weight"):
            params[name].copy_(torch.eye(4, dtype=F64))
    x = torch.tensor([[-2.0, -0.5, 0.7, 1.5]], dtype=F64)
    tanh_form = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    torch.testing.assert_close(model(x), gelu_erf(x) * x, **TOL)
    assert (model(x) - tanh_form * x).abs().max() > 1e-5


# ------------------------------------------------------------ std.gating
@pytest.mark.parametrize("shape, reduction", [((2, 5, 7, 12), 4), ((1, 3, 3, 8), 16), ((2, 3, 4, 4, 6), 2)])
def test_squeeze_excite_equals_its_equation(shape, reduction):
    *_, c = shape
    hidden = max(c // reduction, 1)
    dims = ", ".join(["B"] + [str(s) for s in shape[1:]])
    source = wrapper("gating", f"x: [{dims}]", f"SqueezeExcite(x, reduction={reduction})")
    model, params = compile_double(source)

    def reference(x, p):  # y = x ⊙ σ(W₂ ReLU(W₁ s + b₁) + b₂), s = mean of x over H, W (Hu et al. 2018)
        s = x.mean(dim=(-3, -2))
        e = torch.sigmoid(linear(torch.relu(linear(s, p, "SqueezeExcite.z.s_proj")), p, "SqueezeExcite.e.z_proj"))
        return x * e[..., None, None, :]

    assert_matches(model, reference, [randn(*shape, seed=2)])
    assert n_params(params) == (c * hidden + hidden) + (hidden * c + c)  # W₁, b₁: C → C/r; W₂, b₂: C/r → C
    assert gates_of(source) == {"SqueezeExcite.e": "sigmoid"}


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("shape", [(3, 6), (2, 4, 8)])
def test_zero_gated_residual_is_the_identity_at_init_then_its_equation(scalar, shape):
    d = shape[-1]
    hidden = -(-(8 * d // 3) // 8) * 8
    dims = ", ".join(["B"] + [str(s) for s in shape[1:]])
    call = f"ZeroGatedResidual(x, f=SwiGLU{', scalar=true' if scalar else ''})"
    source = wrapper("gating", f"x: [{dims}]", call, imports=("mlp",))
    model, params = compile_double(source)
    gate = params["ZeroGatedResidual.g"]
    assert gate.shape == ((1,) if scalar else (d,)) and torch.equal(gate, torch.zeros_like(gate))
    x = randn(*shape, seed=3)
    assert torch.equal(model(x), x)  # exactly the identity when created

    # The gate still learns from zero: dL/dg = Σ w ⊙ f(x) over everything but the gated features.
    x_ref = x.clone()
    w = randn(*shape, seed=4)
    (model(x) * w).sum().backward()
    f_x = swiglu_ref(x_ref, {k: v.detach() for k, v in params.items()}, "ZeroGatedResidual.f")
    expected = (w * f_x).sum() if scalar else (w * f_x).reshape(-1, d).sum(0)
    torch.testing.assert_close(gate.grad.reshape(expected.shape), expected, **TOL)
    model.zero_grad()

    with torch.no_grad():
        gate.copy_(randn(*gate.shape, seed=5))

    def reference(x, p):  # y = x + g ⊙ f(x), f = SwiGLU
        return x + p["ZeroGatedResidual.g"] * swiglu_ref(x, p, "ZeroGatedResidual.f")

    assert_matches(model, reference, [x])
    assert n_params(params) == (1 if scalar else d) + 3 * d * hidden
    assert gates_of(source) == {"ZeroGatedResidual.g": "learned", "ZeroGatedResidual.f.g": "silu"}


@pytest.mark.parametrize("shape", [(3, 6), (2, 5, 4)])
def test_sigmoid_gated_residual_equals_its_equation(shape):
    d = shape[-1]
    hidden = -(-(8 * d // 3) // 8) * 8
    dims = ", ".join(["B"] + [str(s) for s in shape[1:]])
    source = wrapper("gating", f"x: [{dims}]", "SigmoidGatedResidual(x, f=ReGLU)", imports=("mlp",))
    model, params = compile_double(source)

    def reference(x, p):  # y = x + σ(W x + b) ⊙ f(x), f = ReGLU
        f = "SigmoidGatedResidual.f"
        f_x = ((x @ p[f"{f}.g.x_proj.weight"].T).clamp(min=0) * (x @ p[f"{f}.v.x_proj.weight"].T)) \
            @ p[f"{f}.y.proj.weight"].T
        return x + torch.sigmoid(linear(x, p, "SigmoidGatedResidual.g.x_proj")) * f_x

    assert_matches(model, reference, [randn(*shape, seed=6)])
    assert n_params(params) == (d * d + d) + 3 * d * hidden
    assert gates_of(source) == {"SigmoidGatedResidual.g": "sigmoid", "SigmoidGatedResidual.f.g": "relu"}


@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 7)])
def test_fusion_gate_equals_its_equation(shape):
    d = shape[-1]
    dims = ", ".join(["B"] + [str(s) for s in shape[1:]])
    source = wrapper("gating", f"a: [{dims}];b: [{dims}]", "FusionGate(a, b)")
    model, params = compile_double(source)

    def reference(a, b, p):  # g = σ(W [a, b] + c), y = g ⊙ a + (1 − g) ⊙ b
        g = torch.sigmoid(linear(torch.cat([a, b], dim=-1), p, "FusionGate.g.proj"))
        return g * a + (1 - g) * b

    assert_matches(model, reference, [randn(*shape, seed=7), randn(*shape, seed=8)])
    assert n_params(params) == 2 * d * d + d
    assert gates_of(source) == {"FusionGate.g": "sigmoid"}


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 9)])
def test_binary_gate_equals_its_equation_with_a_straight_through_gradient(shape):
    d = shape[-1]
    dims = ", ".join(["B"] + [str(s) for s in shape[1:]])
    source = wrapper("gating", f"x: [{dims}]", "BinaryGate(x)")
    model, params = compile_double(source)
    theta = params["BinaryGate.theta"]
    x = randn(*shape, seed=9)
    assert torch.equal(theta, torch.ones(d, dtype=F64)) and torch.equal(model(x), x)  # σ(1) > ½: all on
    with torch.no_grad():
        theta.copy_(randn(d, seed=10))
    assert 0 < (theta > 0).sum() < d  # some features on, some off

    def reference(x, p):
        # m = 1[σ(θ) > ½] forward; backward as if m were σ(θ) (the straight-through estimator, Bengio et al. 2013)
        soft = torch.sigmoid(p["BinaryGate.theta"])
        m = (soft > 0.5).to(F64) + soft - soft.detach()
        return x * m

    y = assert_matches(model, reference, [x])
    # At inference the gate is a constant 0/1 mask: folding it in (keeping only the features with m = 1) is exact.
    keep = torch.sigmoid(theta.detach()) > 0.5
    assert torch.equal(y[..., keep], x[..., keep]) and torch.equal(y[..., ~keep], torch.zeros_like(x[..., ~keep]))
    assert n_params(params) == d
    assert gates_of(source) == {"BinaryGate.m": "binary"}


# -------------------------------------------------------------- std.conv
def depthwise_conv2d_same(x, weight, bias):
    """Depthwise cross-correlation of channels-last x [N, H, W, C] with weight [C, 1, k, k] and zero padding k // 2:
    out[h, w, c] = b[c] + Σ_{i, j} weight[c, 0, i, j] · x[h + i − k//2, w + j − k//2, c]."""
    k = weight.shape[-1]
    r = k // 2
    height, width = x.shape[-3], x.shape[-2]
    padded = F.pad(x, (0, 0, r, r, r, r))  # pads W then H (the last dim, C, not at all)
    out = bias.expand_as(x).clone()
    for i in range(k):
        for j in range(k):
            out = out + weight[:, 0, i, j] * padded[..., i:i + height, j:j + width, :]
    return out


GNCONV_CASES = [  # leading shape, H, W, C, order, kernel
    ((2,), 4, 4, 8, 1, 3),
    ((2,), 5, 6, 8, 2, 7),
    ((1,), 6, 5, 16, 3, 7),
    ((2, 2), 3, 4, 16, 4, 3),
    ((1,), 3, 3, 12, 3, 5),
]


@pytest.mark.parametrize("lead, height, width, c, order, kernel", GNCONV_CASES)
def test_gnconv_equals_hornet(lead, height, width, c, order, kernel):
    alpha = 3.0
    widths = [c // 2 ** (order - k - 1) for k in range(order)]  # C_k = C / 2^{n−k−1}
    dims = ", ".join(["B"] + [str(s) for s in lead[1:]] + [str(height), str(width), str(c)])
    source = wrapper("conv", f"x: [{dims}]", f"gnConv(x, order={order}, kernel={kernel})")
    model, params = compile_double(source)

    def reference(x, p):
        # [p₀, q₀ … q_{n−1}] = φ_in(x); p_{k+1} = g_k(p_k) ⊙ DWConv(q_k) / α; y = φ_out(p_n) (Rao et al. 2022)
        u = linear(x, p, "gnConv.u.x_proj")
        p_k, qs = u[..., :widths[0]], u[..., widths[0]:]
        flat = qs.reshape(-1, height, width, qs.shape[-1])
        dw = depthwise_conv2d_same(flat, p["gnConv.q.conv.weight"], p["gnConv.q.conv.bias"]).reshape(qs.shape) / alpha
        start = 0
        for k in range(order):
            if k > 0:
                p_k = linear(p_k, p, f"gnConv.g.{k}.p.p_proj")  # g_k: C_{k−1} → C_k
            p_k = p_k * dw[..., start:start + widths[k]]
            start += widths[k]
        assert start == dw.shape[-1]
        return linear(p_k, p, "gnConv.y.p_proj")

    assert_matches(model, reference, [randn(*lead, height, width, c, seed=11)])
    q_width = sum(widths)
    assert 2 * c == widths[0] + q_width
    expected = (c * 2 * c + 2 * c) + (q_width * kernel * kernel + q_width) \
        + sum(widths[k - 1] * widths[k] + widths[k] for k in range(1, order)) + (c * c + c)  # φ_in, DWConv, g_k, φ_out
    assert n_params(params) == expected
    assert gates_of(source) == {f"gnConv.g.{k}.d": "linear" for k in range(order)}


def test_gnconv_needs_channels_divisible_by_2_to_the_order_minus_1():
    with pytest.raises(gatedsl.SpecError, match="divisible by 2"):
        gatedsl.check(wrapper("conv", "x: [B, 4, 4, 12]", "gnConv(x, order=4)"))


LONG_CONV_CASES = [  # leading shape, T, D, kernel
    ((2,), 7, 4, 7),
    ((1,), 5, 3, 9),  # a filter longer than the sequence
    ((3,), 6, 2, 1),
    ((2, 3), 8, 5, 4),
]


@pytest.mark.parametrize("lead, time, d, kernel", LONG_CONV_CASES)
def test_gated_long_conv_equals_its_equation(lead, time, d, kernel):
    dims = ", ".join(["B"] + [str(s) for s in lead[1:]] + [str(time), str(d)])
    source = wrapper("conv", f"x: [{dims}]", f"GatedLongConv(x, kernel={kernel})")
    model, params = compile_double(source)

    def reference(x, p):
        # y = (x W + b) ⊙ (h ∗ x + b'), (h ∗ x)_t = Σ_{i<L} h_i ⊙ x_{t−i} (causal; x before 0 is 0). The filter is
        # stored as torch's Conv1d weight [D, 1, L], which correlates: h_i = weight[:, 0, L − 1 − i].
        weight, bias = p["GatedLongConv.c.conv.weight"], p["GatedLongConv.c.conv.bias"]
        steps = []
        for t in range(time):
            acc = bias.expand(x[..., 0, :].shape)
            for i in range(min(kernel, t + 1)):
                acc = acc + weight[:, 0, kernel - 1 - i] * x[..., t - i, :]
            steps.append(acc)
        conv = torch.stack(steps, dim=-2)
        return linear(x, p, "GatedLongConv.g.x_proj") * conv

    x = randn(*lead, time, d, seed=12)
    y = assert_matches(model, reference, [x])
    later = x.clone()
    later[..., time // 2:, :] += 1.0  # change the future: the past does not move
    torch.testing.assert_close(model(later)[..., :time // 2, :], y[..., :time // 2, :], rtol=0, atol=0)
    assert n_params(params) == (d * d + d) + (d * kernel + d)  # W, b; the filter h and b'
    assert gates_of(source) == {"GatedLongConv.g": "linear"}


def test_linear_gate_kind_is_accepted_and_listed():
    """`gate linear` marks a gate with no nonlinearity (a linear projection or convolution, as in gnConv and H3)."""
    source = "model M() {\n  input x: [B, 4]\n  gate linear g = linear(x, 4)\n  output y = g * x\n}\n"
    assert gates_of(source) == {"g": "linear"}
    model = gatedsl.compile(source)
    assert model(torch.randn(2, 4)).shape == (2, 4)


# --------------------------------------------------------- std.attention
def block_sparse_reference(x, p, heads, block, top_k):
    """SeerAttention's block-sparse gate (Gao et al. 2024) over causal multi-head attention, from its equations."""
    batch, time, d = x.shape
    dh, n = d // heads, time // block

    def proj(name, inp):
        return linear(inp, p, f"block_sparse_attention.{name}")

    def heads_of(t):  # [B, T, D] -> [B, heads, T, d]
        return t.reshape(batch, time, heads, dh).transpose(1, 2)

    q, k, v = (heads_of(proj(f"{n_}.x_proj", x)) for n_ in "qkv")
    q_blocks = q.reshape(batch, heads, n, block, dh).mean(3)  # Q̃: mean over each block of tokens
    k_blocks = k.reshape(batch, heads, n, block, dh).mean(3)  # K̃
    later_block = torch.ones(n, n, dtype=torch.bool).triu(1)
    s = torch.softmax((q_blocks @ k_blocks.transpose(-1, -2) / math.sqrt(dh)).masked_fill(later_block, -math.inf), -1)
    keep_blocks = torch.zeros(s.shape, dtype=torch.bool).scatter(-1, s.topk(top_k, dim=-1).indices, True)
    keep = keep_blocks.repeat_interleave(block, -2).repeat_interleave(block, -1)  # block mask → token mask
    keep = keep & torch.ones(time, time, dtype=torch.bool).tril()                 # ∧ causal
    scores = (q @ k.transpose(-1, -2) / math.sqrt(dh)).masked_fill(~keep, -math.inf)
    out = torch.softmax(scores, -1) @ v
    return proj("y.a_proj", out.transpose(1, 2).reshape(batch, time, d)), keep


BLOCK_SPARSE_CASES = [  # batch, T, D, heads, block size, top-k
    (2, 16, 8, 2, 4, 2),
    (1, 12, 6, 3, 3, 1),
    (3, 9, 6, 2, 3, 2),
    (2, 8, 4, 1, 2, 4),  # top-k = every block: dense causal attention
]


def block_sparse_source(time, d, heads, block, top_k):
    return wrapper("attention", f"x: [B, {time}, {d}]",
                   f"block_sparse_attention(x, heads={heads}, block_size={block}, top_k={top_k})")


@pytest.mark.parametrize("batch, time, d, heads, block, top_k", BLOCK_SPARSE_CASES)
def test_block_sparse_attention_equals_seerattention(batch, time, d, heads, block, top_k):
    source = block_sparse_source(time, d, heads, block, top_k)
    model, params = compile_double(source)
    x = randn(batch, time, d, seed=13)
    assert_matches(model, lambda x, p: block_sparse_reference(x, p, heads, block, top_k)[0], [x])
    _, keep = block_sparse_reference(x, params, heads, block, top_k)
    kept_blocks = keep[..., ::block, ::block].sum(-1)  # key blocks kept by each query block's first token
    assert (kept_blocks == torch.arange(time // block).add(1).clamp(max=top_k)).all()
    assert n_params(params) == 4 * (d * d + d)  # q, k, v, output: D x D + bias
    assert gates_of(source) == {"block_sparse_attention.m": "topk"}


def test_block_sparse_attention_with_every_block_kept_is_dense_causal_attention():
    batch, time, d, heads, block = 2, 12, 8, 2, 3
    model, params = compile_double(block_sparse_source(time, d, heads, block, time // block))
    x = randn(batch, time, d, seed=14)

    def dense(x, p):  # softmax(q kᵀ / √d + causal mask) v per head, then the output projection
        def heads_of(t):
            return t.reshape(batch, time, heads, d // heads).transpose(1, 2)

        q, k, v = (heads_of(linear(x, p, f"block_sparse_attention.{n}.x_proj")) for n in "qkv")
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).masked_fill(
            torch.ones(time, time, dtype=torch.bool).triu(1), -math.inf)
        out = (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, time, d)
        return linear(out, p, "block_sparse_attention.y.a_proj")

    assert_matches(model, dense, [x])
    sparse, _ = compile_double(block_sparse_source(time, d, heads, block, 1))
    sparse.load_state_dict(model.state_dict())
    assert (sparse(x) - model(x)).abs().max() > 1e-3  # keeping one block of four is not the same attention


@pytest.mark.parametrize("inputs, call, message", [
    ("x: [B, 8, 4]", "block_sparse_attention(x, heads=2, block_size=4, top_k=3)", "top_k must be at most"),
    ("x: [B, T, 4]", "block_sparse_attention(x, heads=2, block_size=4, top_k=1)", "pooling a symbolic length"),
    ("x: [B, 8, 6]", "block_sparse_attention(x, heads=4, block_size=4, top_k=1)", "heads must divide D"),
])
def test_block_sparse_attention_errors(inputs, call, message):
    with pytest.raises(gatedsl.SpecError, match=message):
        gatedsl.check(wrapper("attention", inputs, call))
