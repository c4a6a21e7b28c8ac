"""std.linear_rnn's GatedDeltaNet against the implementations the field trains with: fla 0.6's GatedDeltaNet layer
(its default) and transformers' Qwen3NextGatedDeltaNet (its parameters), on tiny random configs. The reference's
weights load through gatedsl/interop/gated_deltanet.py, outputs and gradients (input and every weight) are compared,
and the weights go back out into a fresh reference module (`load_state_dict(strict=True)`) that computes the same;
then the initialisations: the same distributions and constants as each reference's own constructor."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F

import gatedsl
from gatedsl.interop import export_state_dict, load_state_dict
from gatedsl.interop.gated_deltanet import gated_deltanet_from_fla, gated_deltanet_from_qwen3_next

pytest.importorskip("fla")
transformers = pytest.importorskip("transformers")
import fla.layers.gated_deltanet as fla_gdn  # noqa: E402
from fla.modules import FusedRMSNormGated, RMSNorm  # noqa: E402
from fla.modules.norm.layernorm import rms_norm_ref  # noqa: E402
from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule  # noqa: E402
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next  # noqa: E402

DT = torch.float64
D, B, T = 8, 2, 6
AT = "GatedDeltaNet"  # the block instance in the wrapper spec


def spec(args: str, d: int = D):
    return gatedsl.compile(f"import std.linear_rnn\nmodel M() {{\n  input x: [B, T, {d}]\n"
                           f"  output y = GatedDeltaNet(x, {args})\n}}\n")


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """`module` in float64 with every weight moved off its init, so that none sits at a constant (norm weights 1,
    Qwen3-Next's dt_bias 1) where a mix-up of two of them would not show."""
    module = module.double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=DT, generator=gen))
    return module


def compare(ours, ref, mapping, tol):
    """Outputs and gradients (the input's, and each weight's through the mapping) of `ours` and `ref` on one input."""
    x = torch.randn(B, T, D, dtype=DT, generator=torch.Generator().manual_seed(5))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = ours(x_ours)
    out = ref(x_ref)
    y_ref = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(y_ours, y_ref, **tol)
    probe = torch.randn(y_ref.shape, dtype=DT, generator=torch.Generator().manual_seed(6))
    (y_ours * probe).sum().backward()
    (y_ref * probe).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **tol)
    theirs = copy.deepcopy(ours)  # the reference's gradients, in our layout
    load_state_dict(theirs, {name: p.grad for name, p in ref.named_parameters()}, mapping)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs.get_parameter(name), **tol, msg=lambda m, name=name: f"{name}: {m}")
    return x


# ------------------------------------------------------------------------------------------------ fla
def _in_float64(fn):
    """`fn`'s own code with its `torch.float32` casts reading float64: fla's naive ops cast their inputs to float32."""
    torch64 = types.ModuleType("torch")
    torch64.__dict__.update(vars(torch))
    torch64.float32 = torch.float64
    return types.FunctionType(fn.__code__, {**fn.__globals__, "torch": torch64}, fn.__name__, fn.__defaults__,
                              fn.__closure__)


naive_recurrent_gated_delta_rule_64 = _in_float64(naive_recurrent_gated_delta_rule)


def plain_chunk_gated_delta_rule(q, k, v, g, beta, *, use_qk_l2norm_in_kernel, use_beta_sigmoid_in_kernel,
                                 use_gate_in_kernel, A_log, dt_bias, allow_neg_eigval, initial_state=None,
                                 output_final_state=False, cu_seqlens=None, **_):
    """fla's chunk_gated_delta_rule as the layer calls it, its Triton pieces in plain PyTorch: l2norm with eps 1e-6
    (fla's l2norm kernel), the gate −exp(A_log) softplus(g + dt_bias) (fla's naive_gdn_gate, without its float32
    cast), σ(β), each value head reading key head h // (HV / H) (fla's GVA indexing), then fla's own
    naive_recurrent_gated_delta_rule (which scales q by K^−½, as the chunk kernel's default) in float64."""
    assert use_qk_l2norm_in_kernel and use_beta_sigmoid_in_kernel and use_gate_in_kernel and not allow_neg_eigval
    assert initial_state is None and not output_final_state and cu_seqlens is None
    q, k = (t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
    g = -A_log.exp() * F.softplus(g + dt_bias)
    group = v.shape[2] // q.shape[2]
    q, k = (t.repeat_interleave(group, dim=2) for t in (q, k))
    o, _ = naive_recurrent_gated_delta_rule_64(q, k, v, beta.sigmoid(), g)
    return o, None


def plain_causal_conv1d(x, weight, bias=None, activation=None, **_):
    """fla's ShortConvolution is an nn.Conv1d (padding K − 1, a group per channel): its first T outputs, then SiLU."""
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[-1])
    y = y[..., :x.shape[1]].transpose(1, 2)
    return (F.silu(y) if activation in ("silu", "swish") else y), None


@pytest.fixture
def fla_on_cpu(monkeypatch):
    """fla's GatedDeltaNet layer with its Triton-only calls swapped for plain PyTorch (Triton needs a GPU here; its
    interpreter fails on the gated delta rule kernels): the recurrence (plain_chunk_gated_delta_rule), the fused q/k/v
    short convolution (plain_causal_conv1d), and the norms: FusedRMSNormGated as fla's rms_norm_ref
    (fla/modules/norm/layernorm.py) times SiLU(g), norm before gate as its kernel computes, RMSNorm as rms_norm_ref.
    The rest is fla's code: the layer's projections, head layout, gate and norm wiring, and its initialisation."""
    monkeypatch.setattr(fla_gdn, "chunk_gated_delta_rule", plain_chunk_gated_delta_rule)
    monkeypatch.setattr(fla_gdn, "causal_conv1d", plain_causal_conv1d)
    def gated_norm(self, x, g):
        assert self.activation in ("swish", "silu")
        return rms_norm_ref(x, self.weight, self.bias, eps=self.eps) * F.silu(g)

    monkeypatch.setattr(FusedRMSNormGated, "forward", gated_norm)
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: rms_norm_ref(x, self.weight, self.bias, eps=self.eps))


FLA_CASES = {
    # fla's config -> GatedDeltaNet's arguments
    "gva": (dict(num_heads=2, head_dim=3, expand_v=2, num_v_heads=4),
            "heads=2, head_dim=3, v_heads=4, v_head_dim=6"),
    "dv_apart": (dict(num_heads=2, head_dim=4, expand_v=1.5, conv_size=3, norm_eps=1e-6),
                 "heads=2, head_dim=4, v_head_dim=6, conv=3, norm_eps=1e-6"),
    "no_gate_conv_bias": (dict(num_heads=1, head_dim=4, expand_v=1, use_gate=False, conv_bias=True),
                          "heads=1, head_dim=4, v_head_dim=4, gate=false, conv_bias=true"),
}


@pytest.mark.parametrize("case", sorted(FLA_CASES))
def test_fla_gated_deltanet_in_and_out(fla_on_cpu, case):
    config, args = FLA_CASES[case]
    torch.manual_seed(0)
    ref = perturbed(fla_gdn.GatedDeltaNet(hidden_size=D, **config), seed=1).train()
    ours = spec(args).double()
    mapping = gated_deltanet_from_fla(gate=config.get("use_gate", True), conv_bias=config.get("conv_bias", False))
    mapping = mapping.under(AT, "")
    assert sorted(load_state_dict(ours, ref, mapping)) == sorted(ours.state_dict())
    x = compare(ours, ref, mapping, dict(rtol=1e-10, atol=1e-10))  # float64 on both sides: rounding only
    back = fla_gdn.GatedDeltaNet(hidden_size=D, **config).double()
    back.load_state_dict(export_state_dict(ours, mapping), strict=True)
    torch.testing.assert_close(back(x)[0], ref(x)[0], rtol=0, atol=0)


def test_the_default_is_fla_at_its_sizes(fla_on_cpu):
    """GatedDeltaNet(x) with no arguments is fla's GatedDeltaNet(hidden_size=D) with its sizes scaled to D: at fla's
    D = 2048, 6 heads of 256 keys and 512 values; here D = 16: 6 heads of 2 keys and 4 values."""
    torch.manual_seed(0)
    ref = perturbed(fla_gdn.GatedDeltaNet(hidden_size=16, num_heads=6, head_dim=2), seed=2).train()
    ours = gatedsl.compile("import std.linear_rnn\nmodel M() {\n  input x: [B, T, 16]\n"
                           "  output y = GatedDeltaNet(x)\n}\n").double()
    mapping = gated_deltanet_from_fla().under(AT, "")
    load_state_dict(ours, ref, mapping)
    x = torch.randn(B, T, 16, dtype=DT)
    torch.testing.assert_close(ours(x), ref(x)[0], rtol=1e-10, atol=1e-10)
    report = gatedsl.check("import std.linear_rnn\nmodel M() {\n  input x: [B, T, 2048]\n"
                           "  output y = GatedDeltaNet(x)\n}\n")
    with torch.device("meta"):
        fla_default = fla_gdn.GatedDeltaNet(hidden_size=2048)  # head_dim=256, num_heads=6, expand_v=2
    assert report.params == sum(p.numel() for p in fla_default.parameters())


# ------------------------------------------------------------------------------------------ Qwen3-Next
def qwen3_next_config(**sizes):
    return transformers.Qwen3NextConfig(hidden_size=D, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                                        num_hidden_layers=1, layer_types=["linear_attention"], **sizes)


QWEN_CASES = {
    # Qwen3NextConfig's sizes -> GatedDeltaNet's arguments
    "gva": (dict(linear_num_key_heads=2, linear_key_head_dim=3, linear_num_value_heads=4, linear_value_head_dim=5),
            (2, 3, 4, 5)),
    "one_group": (dict(linear_num_key_heads=2, linear_key_head_dim=4, linear_num_value_heads=2,
                       linear_value_head_dim=3, linear_conv_kernel_dim=2), (2, 4, 2, 3)),
}


@pytest.mark.parametrize("case", sorted(QWEN_CASES))
def test_qwen3_next_gated_deltanet_in_and_out(case):
    """transformers' module on its torch path: on the CPU its kernel wrappers run the modeling file's own
    torch_chunk_gated_delta_rule and causal_conv1d_fn (fla and causal_conv1d serve cuda, xpu, mlu and npu inputs).
    That path casts the recurrence, the gate and the gated norm to float32 (`.to(torch.float32)`, `.float()`), so
    the comparison is float32's: measured, every difference is below 0.6·(1e-5 + 1e-5·|value|) (the chunked
    triangular solve and its backward amplify float32's rounding); compared at rtol = atol = 1e-4, where a wrong
    weight or layout shows at 1e-1. (With those casts read as float64, by hand, the two agree to 1e-13.)"""
    sizes, (heads, dk, v_heads, dv) = QWEN_CASES[case]
    config = qwen3_next_config(**sizes)
    torch.manual_seed(0)
    ref = perturbed(qwen3_next.Qwen3NextGatedDeltaNet(config, layer_idx=0), seed=3).train()
    conv = config.linear_conv_kernel_dim
    ours = spec(f'heads={heads}, head_dim={dk}, v_heads={v_heads}, v_head_dim={dv}, conv={conv}, norm_eps=1e-6, '
                f'init="qwen3_next"').double()
    mapping = gated_deltanet_from_qwen3_next(heads, dk, v_heads, dv).under(AT, "")
    assert sorted(load_state_dict(ours, ref, mapping)) == sorted(ours.state_dict())
    x = compare(ours, ref, mapping, dict(rtol=1e-4, atol=1e-4))
    back = qwen3_next.Qwen3NextGatedDeltaNet(config, layer_idx=0).double()
    exported = export_state_dict(ours, mapping)
    back.load_state_dict(exported, strict=True)
    torch.testing.assert_close(back(x), ref(x), rtol=0, atol=0)
    for key, tensor in ref.state_dict().items():  # the fused layouts come back exactly as they were
        assert torch.equal(exported[key], tensor), key


def test_qwen3_next_grouping_is_per_key_head():
    """in_proj_qkvz's rows come per key head (q, k, v, z of that head's value heads), not as four blocks: a mapping
    that read it as [q | k | v | z] would move head 1's q into head 0's k. Checked on labelled rows."""
    heads, dk, v_heads, dv = 2, 1, 4, 1
    rows = torch.arange(heads * (2 * dk + 2 * 2 * dv), dtype=DT).unsqueeze(-1)  # row i holds i
    ba = torch.arange(2 * v_heads, dtype=DT).unsqueeze(-1)
    ours = spec(f'heads={heads}, head_dim={dk}, v_heads={v_heads}, v_head_dim={dv}, init="qwen3_next"', d=1).double()
    mapping = gated_deltanet_from_qwen3_next(heads, dk, v_heads, dv).under(AT, "")
    state = {k: torch.zeros(v.shape, dtype=DT) for k, v in export_state_dict(ours, mapping).items()}
    state.update({"in_proj_qkvz.weight": rows, "in_proj_ba.weight": ba})
    load_state_dict(ours, state, mapping)
    got = {name: ours.get_parameter(f"{AT}.{name}.x_proj.weight").flatten().tolist()
           for name in ("q", "k", "v", "g", "beta", "alpha")}
    # per key head: [q, k, v, v, z, z] (value heads 2h, 2h + 1), then in_proj_ba per key head: [b, b, a, a]
    assert got == {"q": [0, 6], "k": [1, 7], "v": [2, 3, 8, 9], "g": [4, 5, 10, 11],
                   "beta": [0, 1, 4, 5], "alpha": [2, 3, 6, 7]}


# ------------------------------------------------------------------------------------------ initialisation
def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The two-sample Kolmogorov–Smirnov statistic: the largest gap between the empirical CDFs of a and b."""
    a, b = a.flatten().double(), b.flatten().double()
    both = torch.cat([a, b]).sort().values
    cdf = [torch.searchsorted(s.sort().values, both, right=True).double() / len(s) for s in (a, b)]
    return (cdf[0] - cdf[1]).abs().max().item()


N = 4096  # value heads: A_log and dt_bias draw N values each, the value projections 2N·D
KS = 0.05  # two samples of >= N from one distribution differ by more with probability < 1e-4 (seeds fixed)


def same_initialisation(ours, ref, mapping):
    """Each reference tensor and ours in its layout: equal where the init is a constant, from one distribution
    (two-sample KS) where it is drawn and large enough to tell, within PyTorch's default bounds where it is small."""
    exported = export_state_dict(ours, mapping)
    for key, theirs in ref.state_dict().items():
        mine = exported[key]
        assert mine.shape == theirs.shape, key
        if theirs.unique().numel() == 1:
            assert torch.equal(mine, theirs), key
        elif theirs.numel() >= N:
            assert ks_distance(mine, theirs) < KS, key
        else:  # a few weights of a projection or a conv ([out, in] or [C, 1, K]): both within U(±1/√fan_in)
            bound = 1 / math.sqrt(theirs[0].numel())
            assert mine.abs().max() <= bound and theirs.abs().max() <= bound, key
    return {k.removeprefix(AT + "."): v for k, v in ours.state_dict().items()}


def test_fla_initialisation():
    """fla: A_log = log U(0, 16), dt_bias = softplus⁻¹(Δ₀), Δ₀ log-uniform in [0.001, 0.1] (floored at 1e-4);
    projections and convs U(±1/√fan_in) (nn.Linear's and nn.Conv1d's), the gated norm's weight 1: as fla's
    constructor leaves them. Drawn values are compared by distribution (the two draw in another order)."""
    torch.manual_seed(0)
    ref = fla_gdn.GatedDeltaNet(hidden_size=D, num_heads=1, head_dim=2, expand_v=1, num_v_heads=N)
    torch.manual_seed(1)
    got = same_initialisation(spec(f"heads=1, head_dim=2, v_heads={N}, v_head_dim=2"), ref,
                              gated_deltanet_from_fla().under(AT, ""))
    assert got["A_log"].exp().max() <= 16
    dt = F.softplus(got["dt_bias"])
    assert 0.001 - 1e-6 <= dt.min() < 0.0011 and 0.095 < dt.max() <= 0.1 + 1e-6
    bound = 1 / math.sqrt(D)
    assert got["v.x_proj.weight"].abs().max() <= bound and got["v.x_proj.weight"].abs().max() > 0.99 * bound


def test_qwen3_next_initialisation():
    """Qwen3-Next: A_log = log U(0.01, 16), dt_bias = 1, the gated norm's weight 1, projections and its conv as
    nn.Linear and nn.Conv1d draw them: as Qwen3NextGatedDeltaNet's constructor sets them (A_log and dt_bias are
    drawn the same way again by Qwen3NextPreTrainedModel._init_weights, which also redraws every Linear and Conv1d
    of the model from N(0, initializer_range): a whole-model choice, left to the model's spec)."""
    config = qwen3_next_config(linear_num_key_heads=1, linear_key_head_dim=2, linear_num_value_heads=N,
                               linear_value_head_dim=1)
    torch.manual_seed(0)
    ref = qwen3_next.Qwen3NextGatedDeltaNet(config, layer_idx=0)
    torch.manual_seed(1)
    got = same_initialisation(spec(f'heads=1, head_dim=2, v_heads={N}, v_head_dim=1, init="qwen3_next"'), ref,
                              gated_deltanet_from_qwen3_next(1, 2, N, 1).under(AT, ""))
    assert got["A_log"].exp().min() >= 0.01 and got["A_log"].exp().max() <= 16
    assert torch.equal(got["dt_bias"], torch.ones(N))


def test_init_schemes_draw_as_the_references_do():
    """One seed, the same values: A_log from log_of_uniform(0, 16), then dt_bias from the dt_bias(0.001, 0.1) init,
    as fla's constructor draws them one after the other (its lines of fla/layers/gated_deltanet.py, here)."""
    n, seed = 64, 3
    torch.manual_seed(seed)
    A_log = torch.log(torch.empty(n, dtype=torch.float32).uniform_(0, 16))
    dt = torch.exp(torch.rand(n) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    dt = torch.clamp(dt, min=1e-4)
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    torch.manual_seed(seed)
    ours = gatedsl.compile(f"model M() {{\n  input x: [B, 1]\n  A_log = learned([{n}], init=log_of_uniform(0, 16))\n"
                           f"  dt_bias = learned([{n}], init=dt_bias(0.001, 0.1))\n"
                           f"  output y = x + sum(A_log) + sum(dt_bias)\n}}\n")
    assert torch.equal(ours.get_parameter("A_log"), A_log) and torch.equal(ours.get_parameter("dt_bias"), dt_bias)
