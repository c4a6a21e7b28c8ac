"""std.linear_rnn's GLA equals fla's GatedLinearAttention as fla runs it: its Triton recurrence
(fused_recurrent_gla) and its Triton fused RMSNorm-and-gate, forward and backward, run by Triton's interpreter on
the CPU in a child process (TRITON_INTERPRET=1), in float32, the kernels' compute type.

Both sides round every product and sum to float32, over 9 steps, a norm and weight gradients summed over 18
positions. The differences seen are at most 6e-7 of each tensor's largest value (fla's kernel differs from our
float64 result by as much as ours in float32 does); 1e-5 of it leaves a margin of ~20x, while a wrong scale, gate
or norm differs by 1e-2 of it or more. tests/test_fla_gla_family.py compares the family in float64.
"""

from __future__ import annotations

import pytest
import torch

import gatedsl
from gatedsl.interop import load_state_dict
from gatedsl.interop.fla_gla import gla_from_fla
from triton_interpreter import interpreted, run_in_the_interpreter

pytest.importorskip("fla", reason="flash-linear-attention is a test dependency (the reference layers)")

SCALED_TOL = 1e-5
D = 16


def assert_close_to_scale(got, want, what: str):
    """|got − want| within SCALED_TOL of want's largest magnitude."""
    assert got.shape == want.shape, what
    error, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert error <= SCALED_TOL * scale, f"{what}: differs by {error:.3g} at a scale of {scale:.3g}"


def test_against_fla_triton_kernels_in_the_interpreter():
    run_in_the_interpreter(__file__, expected_passed=1)


@interpreted
def test_interpreted_gla_equals_fla_fused_recurrent():
    import triton.runtime.autotuner as autotuner
    from fla.layers import GatedLinearAttention

    autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0]  # no GPU to time configs on
    torch.manual_seed(0)
    ref = GatedLinearAttention(hidden_size=D, mode="fused_recurrent", num_heads=2)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ours = gatedsl.compile(f"import std.linear_rnn\nmodel M() {{\n  input x: [B, T, {D}]\n  output y = GLA(x, heads=2)\n}}\n")
    load_state_dict(ours, ref, gla_from_fla().under("GLA", ""))
    x = torch.randn(2, 9, D)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = ours(x_ours), ref(x_ref)[0]
    assert_close_to_scale(y, y_ref, "y")
    probe = torch.randn(y.shape)
    (y * probe).sum().backward()
    (y_ref * probe).sum().backward()
    assert_close_to_scale(x_ours.grad, x_ref.grad, "the input's gradient")
    for name, p in ref.named_parameters():
        (rule,) = [r for r in gla_from_fla().rules if r.ref == (name,)]
        assert_close_to_scale(ours.get_parameter("GLA." + rule.ours[0]).grad, p.grad, name)
