"""The delta rule's Triton kernels (gatedsl/kernels/delta_rule/triton.py), forward and backward, equal the gated delta rule's
equations, run in Triton's interpreter on the CPU (TRITON_INTERPRET=1, in a child process: triton reads it as it loads)."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed here")

from triton_interpreter import interpreted, run_in_the_interpreter  # noqa: E402

# (T, gate, β, leading dims, K, V, initial state, log α range): below one chunk with K and V below the 16 a
# product tile needs; two chunks, the last partial, V over one state block (32) and sizes not powers of two;
# exactly one chunk from a zero state; decays down to e^-40 per step.
CASES = [(5, "alpha", True, (2,), 5, 4, True, (-3.0, 0.0)),
         (70, "log", False, (1, 2), 20, 40, True, (-3.0, 0.0)),
         (64, "none", True, (2,), 16, 16, False, (-3.0, 0.0)),
         (70, "alpha", True, (2,), 8, 8, True, (-40.0, 0.0))]


def test_triton_kernels_in_the_interpreter():
    run_in_the_interpreter(__file__, len(CASES) + 2)


# float32 against the equations in float64: the kernels round each product and the substitution in float32,
# ~1e-7 relative per operation, summed over a chunk of 64 steps and K, V ≤ 40, on gradients up to ~70: the
# differences seen are ≤ 3e-5; 2e-4 bounds them, while a wrong term shows at 1e-2 or more.
TOL = {"rtol": 2e-4, "atol": 2e-4}


@interpreted
@pytest.mark.parametrize("case", CASES, ids=[f"T={c[0]}-{c[1]}-beta={c[2]}-K={c[4]}-V={c[5]}" for c in CASES])
def test_triton_equals_the_equations(case):
    from gatedsl.kernels.delta_rule import triton as kernels
    from test_kernels_delta_rule import expected, make, results

    length, gate, beta, lead, dk, dv, initial, log_range = case
    config, tensors = make(length, gate, beta, lead=lead, dk=dk, dv=dv, initial=initial, dtype=torch.float32,
                           log_range=log_range)
    got = results(kernels.chunked, config, tensors)
    want = results(expected, config, [t.detach().double().requires_grad_() for t in tensors])
    for name, a, b in zip(["o", "final state"] + [f"d input {i}" for i in range(len(tensors))], got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, msg=name, **TOL)


@interpreted
def test_triton_takes_half_precision_in_float32():
    """bfloat16 inputs run in float32 and come back as bfloat16 (its ~3 significant digits set the tolerance)."""
    from gatedsl.kernels.delta_rule import triton as kernels
    from test_kernels_delta_rule import expected, make

    config, tensors = make(20, lead=(2,), dk=8, dv=8, dtype=torch.bfloat16)
    out, final = kernels.chunked(config, *tensors)
    want_out, want_final = expected(config, *[t.detach().double() for t in tensors])
    assert out.dtype == final.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(final.double(), want_final, rtol=2e-2, atol=2e-2)


@interpreted
def test_triton_runs_the_step_form_where_a_decay_has_no_log():
    from gatedsl.kernels.delta_rule import triton as kernels
    from test_kernels_delta_rule import expected, make

    config, tensors = make(10, "alpha", lead=(2,), dtype=torch.float32)
    alpha = tensors[3].detach().clone()
    alpha[1, 4] = -0.25
    tensors[3] = alpha
    for a, b in zip(kernels.chunked(config, *tensors), expected(config, *[t.detach().double() for t in tensors])):
        torch.testing.assert_close(a.double(), b, **TOL)
