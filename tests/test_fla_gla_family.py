"""std.linear_rnn's GLA, SimpleGLA, RetNet and HGRN equal flash-linear-attention's layers (fla 0.6) by default:
GatedLinearAttention, SimpleGatedLinearAttention, MultiScaleRetention and HGRNAttention, built by fla's own classes
on tiny configurations, their weights loaded into the spec through gatedsl/interop/fla_gla.py's mappings.

The references are fla's layer classes: their projections, head layout, gate logits, convolutions' and norms'
weights and initialisation are fla's code. Where fla calls a Triton kernel, which cannot run on this CPU, the
kernel is swapped by name for the plain-PyTorch form fla ships beside it (tests/fla_cpu.py lists each: the
recurrences by fla's naive.py loops, the fused norm-and-gate by fla's rms_norm_ref, RoPE by rotary_embedding_ref,
the short convolution by the nn.Conv1d it subclasses), and fla's casts to float32 are raised to float64 (but for
RoPE's angles, which fla and the `rope` primitive both take in float32), so the two sides agree to rounding:
outputs and gradients (input and every parameter) to 1e-10 in float64, at -O0 (the spec as written, step by step)
and -O2 (chunk-parallel linear scans). The weights are moved off fla's init first, so a norm weight of 1 or a bias
of 0 cannot hide a misplaced tensor. GLA is also compared with fla's real Triton kernels, in float32, by
tests/test_fla_gla_triton.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import gatedsl
from gatedsl.interop import export_state_dict, load_state_dict
from gatedsl.interop.fla_gla import gla_from_fla, hgrn_from_fla, retnet_from_fla, simple_gla_from_fla

pytest.importorskip("fla", reason="flash-linear-attention is a test dependency (the reference layers)")

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
D = 16  # hidden size


def fla_layer(name: str):
    """fla's layer class `name` (SimpleGatedLinearAttention is not exported by fla.layers)."""
    import fla.layers
    import fla.layers.simple_gla

    return getattr(fla.layers.simple_gla if name == "SimpleGatedLinearAttention" else fla.layers, name)


def layer(name: str, **options):
    """fla's layer `name` on hidden size D."""
    return fla_layer(name)(hidden_size=D, **options)


# (id, fla layer and its options, our call, the mapping, the block's instance name, whether it takes a lower bound)
CASES = [
    ("GLA", ("GatedLinearAttention", dict(mode="fused_recurrent")), "GLA(x)", gla_from_fla()),
    ("GLA-sizes-conv", ("GatedLinearAttention", dict(num_heads=2, expand_k=1.0, expand_v=2.0, gate_low_rank_dim=4,
                                                     gate_logit_normalizer=8, norm_eps=1e-6, use_short_conv=True,
                                                     conv_size=3, conv_bias=True)),
     "GLA(x, heads=2, key_dim=16, value_dim=32, rank=4, tau=8.0, eps=1e-6, short_conv=true, conv=3, conv_bias=true)",
     gla_from_fla(short_conv=True, conv_bias=True)),
    ("GLA-no-output-gate", ("GatedLinearAttention", dict(use_output_gate=False)), "GLA(x, output_gate=false)",
     gla_from_fla(output_gate=False)),
    ("GLA-unfused-norm", ("GatedLinearAttention", dict(fuse_norm=False)), "GLA(x)", gla_from_fla(fused_norm=False)),
    ("SimpleGLA", ("SimpleGatedLinearAttention", {}), "SimpleGLA(x)", simple_gla_from_fla()),
    ("SimpleGLA-sizes", ("SimpleGatedLinearAttention", dict(num_heads=2, expand_k=0.5, expand_v=2.0,
                                                            use_short_conv=False, gate_logit_normalizer=4)),
     "SimpleGLA(x, heads=2, key_dim=8, value_dim=32, tau=4.0, short_conv=false)", simple_gla_from_fla(short_conv=False)),
    ("RetNet", ("MultiScaleRetention", {}), "RetNet(x)", retnet_from_fla()),
    ("RetNet-sizes", ("MultiScaleRetention", dict(num_heads=2, expand_k=0.5, expand_v=1.0, use_output_gate=False,
                                                  use_short_conv=True, conv_size=2)),
     "RetNet(x, heads=2, key_dim=8, value_dim=16, output_gate=false, short_conv=true, conv=2)",
     retnet_from_fla(short_conv=True, output_gate=False)),
    ("HGRN", ("HGRNAttention", dict(layer_idx=0)), "HGRN(x, lower)", hgrn_from_fla()),
    ("HGRN-expand-conv", ("HGRNAttention", dict(layer_idx=0, expand_ratio=2, use_short_conv=True)),
     "HGRN(x, lower, short_conv=true)", hgrn_from_fla(short_conv=True)),
    ("HGRN-lower-bound", ("HGRNAttention", dict(layer_idx=1, norm_eps=1e-6)), "HGRN(x, lower, eps=1e-6)",
     hgrn_from_fla()),
]


def spec(call: str, width: int) -> str:
    """A model around one block; `lower` (HGRN's lower bound) is an input of the layer's width."""
    lower = f"  input lower: [{width}]\n" if "lower" in call else ""
    return f"import std.linear_rnn\nmodel M() {{\n  input x: [B, T, {D}]\n{lower}  output y = {call}\n}}\n"


def build_reference(name: str, options: dict, seed: int = 0):
    """fla's layer in float64, its weights moved off their init."""
    torch.manual_seed(seed)
    ref = layer(name, **options).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ref


def run_reference(ref, x, lower):
    from fla_cpu import Float64

    if hasattr(ref, "rotary"):  # its angles in float32, as fla computes them whatever the model's dtype (and `rope`)
        ref.rotary._update_cos_sin_cache(x.shape[1], device=x.device, dtype=x.dtype)
    with Float64():
        if lower is None:
            return ref(x)[0]
        return ref(x, lower_bound=lower)[0]


def inputs(ref, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 9, D, dtype=DT, generator=gen)
    width = getattr(ref, "input_dim", D)
    lower = torch.rand(width, dtype=DT, generator=gen) if getattr(ref, "layer_idx", None) else None
    return x, lower, width


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_equals_fla(case, opt_level, monkeypatch):
    from fla_cpu import patch_fla

    patch_fla(monkeypatch)
    _, (name, options), call, mapping = case
    block = call.split("(")[0]
    ref = build_reference(name, options)
    x, lower, width = inputs(ref)
    ours = gatedsl.compile(spec(call, width), opt_level=opt_level).double()
    at = mapping.under(block, "")
    written = load_state_dict(ours, ref, at)
    assert sorted(written) == sorted(ours.state_dict())

    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    our_args = [x_ours] if "lower" not in call else [x_ours, lower if lower is not None else torch.zeros(width, dtype=DT)]
    y, y_ref = ours(*our_args), run_reference(ref, x_ref, lower)
    torch.testing.assert_close(y, y_ref, **TOL)
    probe = torch.randn(y.shape, dtype=DT, generator=torch.Generator().manual_seed(7))
    (y * probe).sum().backward()
    (y_ref * probe).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
    theirs = dict(ref.named_parameters())
    for rule in at.rules:
        assert rule.what == "rename"
        (ref_key,), (our_key,) = rule.ref, rule.ours
        torch.testing.assert_close(ours.get_parameter(our_key).grad, theirs[ref_key].grad, **TOL,
                                   msg=lambda m, k=ref_key: f"{k}: {m}")

    # Out again: fla's layer loads the export strictly and computes the same.
    exported = export_state_dict(ours, at)
    back = build_reference(name, options, seed=5)
    back.load_state_dict(exported, strict=True)
    assert all(torch.equal(exported[k], v) for k, v in ref.state_dict().items())
    torch.testing.assert_close(run_reference(back, x, lower), y.detach(), **TOL)


def test_the_float64_mode_is_what_makes_the_reference_exact(monkeypatch):
    """Without raising fla's float32 casts the reference is ~1e-7 off, which the 1e-10 tolerance would catch."""
    from fla_cpu import patch_fla

    patch_fla(monkeypatch)
    ref = build_reference("GatedLinearAttention", dict(mode="fused_recurrent"))
    x, _, _ = inputs(ref)
    ours = gatedsl.compile(spec("GLA(x)", D)).double()
    load_state_dict(ours, ref, gla_from_fla().under("GLA", ""))
    with torch.no_grad():
        off = (ref(x)[0] - ours(x)).abs().max().item()
        exact = (run_reference(ref, x, None) - ours(x)).abs().max().item()
    assert off > 1e-9 and exact < 1e-12


# ------------------------------------------------------------- initialisation
INIT_CASES = [
    ("GatedLinearAttention", dict(hidden_size=64), "GLA(x)", gla_from_fla()),
    ("SimpleGatedLinearAttention", dict(hidden_size=64), "SimpleGLA(x)", simple_gla_from_fla()),
    ("MultiScaleRetention", dict(hidden_size=64), "RetNet(x)", retnet_from_fla()),
    ("HGRNAttention", dict(hidden_size=64), "HGRN(x, lower)", hgrn_from_fla()),
]


@pytest.mark.parametrize("case", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_initialisation_is_fla_layers_own(case):
    """Each tensor starts as in fla's layer alone: the norm weights at 1, and every projection and convolution
    weight and bias from PyTorch's U(−1/√fan_in, 1/√fan_in), fan_in the input width of its layer (the conv's width)."""
    name, options, call, mapping = case
    block = call.split("(")[0]
    torch.manual_seed(0)
    ref = fla_layer(name)(**options)
    ours = gatedsl.compile(spec(call, 64).replace(f"[B, T, {D}]", "[B, T, 64]"))
    theirs = ref.state_dict()
    for rule in mapping.under(block, "").rules:
        (ref_key,), (our_key,) = rule.ref, rule.ours
        a, b = ours.get_parameter(our_key).detach(), theirs[ref_key]
        assert a.shape == b.shape, ref_key
        if torch.equal(b, torch.ones_like(b)):
            assert torch.equal(a, torch.ones_like(a)), our_key
            continue
        weight = theirs[ref_key.replace(".bias", ".weight")]
        bound = 1 / math.sqrt(math.prod(weight.shape[1:]))
        for t in (a, b):  # both from U(−bound, bound): inside it, and reaching near it
            assert t.abs().max() <= bound, our_key
            assert t.numel() < 16 or t.abs().max() > 0.8 * bound, our_key
