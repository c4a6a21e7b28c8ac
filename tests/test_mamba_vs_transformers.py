"""std.linear_rnn's Mamba equals transformers' MambaMixer (models/mamba/modeling_mamba.py): the same parameters
(through gatedsl/interop/mamba.py, both ways), the same function and gradients, the same initialisation.

The reference is transformers' own module, built from a tiny MambaConfig, run on its torch path: the module-level
kernel entry points (mamba_inner_fn, mamba_selective_scan, causal_conv1d_fn, ...) are wrapped by transformers to
prefer mamba_ssm / causal_conv1d, so each is put back to the plain-PyTorch function it wraps (`__wrapped__`),
whatever is installed. Everything runs in float64, but MambaMixer casts some of its values to float32 on the way
(A_log, D and dt_proj.bias through `.float()`, which are exact here: the weights are drawn as float32 values; and B
and the convolved input through `.float()` in mamba_selective_scan, which round to float32): so the comparison holds
to float32's resolution, rtol 1e-5 (the observed differences are ~1e-7), while a wrong weight, gate or step is off
by 1e-2 or more.
"""

from __future__ import annotations

import math

import pytest
import torch

import gatedsl
from gatedsl.interop.mamba import mamba_from_transformers
from gatedsl.interop.mapping import export_state_dict, load_state_dict
from transformers_reference import grads_in_ref_layout, ks_distance, use_torch_paths

transformers = pytest.importorskip("transformers")
from transformers import MambaConfig  # noqa: E402
from transformers.models.mamba import modeling_mamba  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-6)
KERNELS = ("mamba_inner_fn", "mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn",
           "causal_conv1d_update")


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """MambaMixer's plain-PyTorch path, never mamba_ssm's or causal_conv1d's kernels."""
    use_torch_paths(monkeypatch, modeling_mamba, KERNELS)


def spec(d: int, **params) -> str:
    args = "".join(f", {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items())
    return f"import std.linear_rnn\nmodel Wrap() {{\n  input x: [B, T, {d}]\n  output y = Mamba(x{args})\n}}\n"


def reference(config: MambaConfig):
    """A MambaMixer initialised as MambaForCausalLM initialises it (MambaPreTrainedModel._init_weights)."""
    model = modeling_mamba.MambaForCausalLM(config)
    return model.backbone.layers[0].mixer


def config(d=8, state_size=4, expand=2, conv=3, bias=False, conv_bias=True, **extra) -> MambaConfig:
    return MambaConfig(vocab_size=11, hidden_size=d, state_size=state_size, expand=expand, conv_kernel=conv,
                       num_hidden_layers=1, use_bias=bias, use_conv_bias=conv_bias, **extra)


def mapping(cfg: MambaConfig):
    """The block's mapping, placed at the model's one Mamba instance."""
    return mamba_from_transformers(cfg.time_step_rank, cfg.state_size, bias=cfg.use_bias,
                                   conv_bias=cfg.use_conv_bias).under("Mamba", "")


CASES = [
    dict(d=8, state_size=4, expand=2, conv=3),
    dict(d=20, state_size=3, expand=1, conv=4, bias=True),        # rank ⌈20/16⌉ = 2; in_proj/out_proj biases
    dict(d=6, state_size=2, expand=3, conv=2, conv_bias=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("opt_level", [0, 2])
def test_mamba_equals_transformers_mixer(case, opt_level):
    cfg = config(**case)
    torch.manual_seed(0)
    ref = reference(cfg).double().eval()
    with torch.no_grad():  # off the init (A_log = log n, D = 1, zero biases), at float32-representable values
        for p in ref.parameters():
            p.add_(0.3 * torch.randn(p.shape).double()).copy_(p.float().double())
    params = dict(state_size=cfg.state_size, expand=cfg.expand, conv=cfg.conv_kernel, bias=cfg.use_bias,
                  conv_bias=cfg.use_conv_bias)
    ours = gatedsl.compile(spec(cfg.hidden_size, **params), opt_level=opt_level).double().eval()
    m = mapping(cfg)
    written = load_state_dict(ours, ref, m)
    assert sorted(written) == sorted(k for k, _ in ours.named_parameters())

    x = torch.randn(2, 7, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    torch.testing.assert_close(y_ours, y_ref, **TOL)
    probe = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (y_ours * probe).sum().backward()
    (y_ref * probe).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
    ours_grads = grads_in_ref_layout(ours, m)
    for name, p in ref.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(ours_grads[name], p.grad, **TOL, msg=lambda msg, name=name: f"{name}: {msg}")

    # ...and back: our weights in MambaMixer's layout load strictly, and give the same function.
    back = reference(cfg).double().eval()
    back.load_state_dict(export_state_dict(ours, m), strict=True)
    torch.testing.assert_close(back(x), y_ref.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dt_init", ["random", "constant"])
def test_mamba_initialisation_matches_transformers(dt_init):
    """Deterministic parameters (A_log = log n per channel, D = 1, the zero conv bias, a constant Δ weight) are
    equal; random ones come from the same distribution (two-sample KS test at α = 0.001: distance below
    1.95·√((n + m)/(n·m)))."""
    cfg = config(d=64, state_size=16, conv=4, time_step_init_scheme=dt_init, time_step_scale=0.7,
                 time_step_min=0.002, time_step_max=0.05)
    torch.manual_seed(0)
    ref = reference(cfg).state_dict()
    torch.manual_seed(1)
    ours = gatedsl.compile(spec(64, state_size=16, conv=4, dt_init=f'"{dt_init}"', dt_scale=0.7, dt_min=0.002,
                                dt_max=0.05))
    exported = export_state_dict(ours, mapping(cfg))
    assert exported.keys() == ref.keys()
    exact = {"A_log", "D", "conv1d.bias"} | ({"dt_proj.weight"} if dt_init == "constant" else set())
    for name, theirs in ref.items():
        mine = exported[name]
        assert mine.shape == theirs.shape, name
        if name in exact:
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=0, msg=name)
        else:
            n = mine.numel()
            assert ks_distance(mine, theirs) < 1.95 * math.sqrt(2 / n), name
    # Δ₀ = softplus(b) is log-uniform in [dt_min, dt_max], as drawn.
    dt = torch.nn.functional.softplus(exported["dt_proj.bias"])
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
