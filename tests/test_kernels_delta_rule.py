"""The delta rule's kernels (gatedsl/kernels/delta_rule/): the step loop and the chunked (WY) form equal the gated delta rule
as its equation reads, S_t = α_t S_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t, in outputs, final state and every
gradient; and the cost rule picks the step form for decoding and the chunked one for long sequences."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gatedsl.kernels import registry
from gatedsl.kernels.delta_rule.chunked import CHUNK, chunked
from gatedsl.kernels.delta_rule.reference import step_loop
from gatedsl.kernels.registry import Context

KERNELS = {"loop": step_loop, "chunked": chunked}

# float64. The chunked form computes the same function as the steps with its sums regrouped (a chunk's
# products, one triangular solve): ~1e-14 apart here, so 1e-10 leaves a margin of ~1e4 while a wrong
# sign, decay or index shows at 1e-2 or more.
TOL = {"rtol": 1e-10, "atol": 1e-10}


def equations(q, k, v, alpha, beta, state):
    """The gated delta rule as GATES.md writes it, one row and one step at a time (no kernel's algebra)."""
    rows_q = q.reshape(-1, *q.shape[-2:])
    rows_k, rows_v = k.reshape(rows_q.shape), v.reshape(-1, *v.shape[-2:])
    rows_a, rows_b = alpha.reshape(rows_q.shape[:2]), beta.reshape(rows_q.shape[:2])
    rows_s = state.reshape(-1, *state.shape[-2:])
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    outs, finals = [], []
    for r in range(rows_q.shape[0]):
        s = rows_s[r]
        steps = []
        for t in range(rows_q.shape[1]):
            kt = rows_k[r, t].unsqueeze(-1)  # a column
            s = rows_a[r, t] * s @ (eye - rows_b[r, t] * kt @ kt.T) + rows_b[r, t] * rows_v[r, t].unsqueeze(-1) @ kt.T
            steps.append(s @ rows_q[r, t])
        outs.append(torch.stack(steps))
        finals.append(s)
    return torch.stack(outs).reshape(*q.shape[:-1], v.shape[-1]), torch.stack(finals).reshape(state.shape)


def make(length, gate="alpha", beta=True, lead=(2, 3), dk=5, dv=4, initial=True, seed=0, dtype=torch.float64,
         log_range=(-3.0, 0.0)):
    """Random inputs in the kernels' order (q, k, v, [gate], [β], state), each requiring grad, and the config."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    q, v = rand(*lead, length, dk), rand(*lead, length, dv)
    k = torch.nn.functional.normalize(rand(*lead, length, dk), dim=-1)  # as Gated DeltaNet normalises keys
    tensors = [q, k, v]
    low, high = log_range
    log_alpha = low + (high - low) * torch.rand(*lead, length, generator=gen, dtype=dtype)
    if gate == "alpha":
        tensors.append(log_alpha.exp())
    elif gate == "log":
        tensors.append(log_alpha)
    if beta:
        tensors.append(torch.rand(*lead, length, generator=gen, dtype=dtype))
    tensors.append(rand(*lead, dv, dk) if initial else torch.zeros(*lead, dv, dk, dtype=dtype))
    return SimpleNamespace(gate=gate, beta=beta), [t.requires_grad_() for t in tensors]


def expected(config, *tensors):
    q, k, v, *rest = tensors
    gate = rest.pop(0) if config.gate != "none" else None
    beta = rest.pop(0) if config.beta else None
    (state,) = rest
    ones = torch.ones(q.shape[:-1], dtype=q.dtype)
    alpha = ones if gate is None else gate.exp() if config.gate == "log" else gate
    return equations(q, k, v, alpha, ones if beta is None else beta, state)


def results(fn, config, tensors):
    """Outputs, final state, and the gradients of a fixed random combination of both wrt every input."""
    out, final = fn(config, *tensors)
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in (out, final)]
    loss = (out * weights[0]).sum() + (final * weights[1]).sum()
    return [out, final, *torch.autograd.grad(loss, tensors)]


def assert_same(got, want, **tol):
    names = ["o", "final state"] + [f"d input {i}" for i in range(len(got) - 2)]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, msg=name, **(tol or TOL))


# (T, gate, β, an initial state): T = 1 (decoding), T below a chunk, one chunk exactly, T not a multiple
# of the chunk; α given as itself, as its log, or absent (DeltaNet); β present or absent.
CASES = [(1, "alpha", True, True), (1, "none", False, False), (13, "log", True, False), (13, "alpha", False, True),
         (CHUNK, "alpha", True, True), (CHUNK, "none", True, True), (2 * CHUNK + 22, "alpha", True, True),
         (2 * CHUNK + 22, "log", False, False), (CHUNK + 1, "none", False, True)]


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("length,gate,beta,initial", CASES)
def test_kernels_equal_the_equations(kernel, length, gate, beta, initial):
    config, tensors = make(length, gate, beta, initial=initial, lead=(2,))
    assert_same(results(KERNELS[kernel], config, tensors), results(expected, config, tensors))


def test_chunked_with_several_leading_dims_and_wide_states():
    config, tensors = make(70, lead=(2, 3), dk=9, dv=12)
    assert_same(results(chunked, config, tensors), results(step_loop, config, tensors))


@pytest.mark.parametrize("gate", ["alpha", "log"])
def test_strong_decays(gate):
    """Decays down to e^-40 per step (a chunk's cumulative log decay reaches -2000): no overflow, no NaN."""
    config, tensors = make(2 * CHUNK + 5, gate, lead=(2,), log_range=(-40.0, 0.0))
    got = results(chunked, config, tensors)
    assert all(torch.isfinite(t).all() for t in got)
    assert_same(got, results(expected, config, tensors))


def test_decays_without_a_log_run_the_step_form():
    """α_t ≤ 0 somewhere (a zero, a negative): the chunked kernel has no log α, and computes the same by steps."""
    config, tensors = make(40, "alpha", lead=(2,))
    alpha = tensors[3].detach().clone()
    alpha[0, 3], alpha[1, 30] = 0.0, -0.5
    tensors[3] = alpha.requires_grad_()
    assert_same(results(chunked, config, tensors), results(expected, config, tensors))


def test_float32_stays_close():
    """In float32 the two forms round differently: chunks of 64 steps and a triangular solve against 200 single
    steps. Both stay within ~1e-5 of the float64 result here; 1e-4 bounds that with a margin."""
    config, tensors = make(200, lead=(2,), dtype=torch.float32, dk=8, dv=8)
    want = results(expected, config, [t.detach().double().requires_grad_() for t in tensors])
    for fn in (step_loop, chunked):
        got = results(fn, config, tensors)
        assert_same([t.double() for t in got], want, rtol=1e-4, atol=1e-4)


def test_an_empty_sequence_is_an_error_as_in_the_loop():
    config, tensors = make(0, lead=(2,))
    for fn in (step_loop, chunked):
        with pytest.raises(ValueError, match="empty"):
            fn(config, *tensors)


# ------------------------------------------------------------------ the cost rule
def _context(length, device="cpu", dtype="float32", training=True, rows=8):
    return Context(device, dtype, training, (("T", length), ("K", 64), ("V", 64), ("rows", rows)))


def test_the_step_forms_for_decoding_the_chunked_form_for_long_sequences():
    assert registry.choose("delta_rule_scan", _context(1, training=False)).kernel == "one_step"
    assert registry.choose("delta_rule_scan", _context(1)).kernel == "one_step"
    assert registry.choose("delta_rule_scan", _context(2)).kernel == "loop"
    for length in (64, 2048):
        assert registry.choose("delta_rule_scan", _context(length)).kernel == "chunked"
    # Symbolic at compile time: ranked for a long sequence, and said so; each call decides again.
    pick = registry.choose("delta_rule_scan", _context(None, rows=None))
    assert pick.kernel == "chunked"
    assert all("each call decides" in c.why for c in pick.candidates if c.kernel in ("loop", "chunked"))


def test_triton_only_on_cuda_and_in_its_dtypes():
    cpu = registry.choose("delta_rule_scan", _context(2048))
    assert {c.kernel: c.applies for c in cpu.candidates}["triton"] is False
    assert registry.choose("delta_rule_scan", _context(2048, device="cuda")).kernel == "triton"
    assert registry.choose("delta_rule_scan", _context(2048, device="cuda", dtype="float64")).kernel == "chunked"
    wide = Context("cuda", "float32", True, (("T", 2048), ("K", 256), ("V", 64), ("rows", 8)))
    assert registry.choose("delta_rule_scan", wide).kernel == "chunked"


def test_dispatch_chooses_by_each_calls_length():
    for length, kernel in ((100, "chunked"), (2, "loop"), (1, "one_step")):
        config, tensors = make(length, lead=(2,))
        sizes = registry.fused_ops()["delta_rule_scan"].sizes(config, [tuple(t.shape) for t in tensors])
        assert registry.choose("delta_rule_scan", registry.runtime_context(tensors, sizes)).kernel == kernel
        got = registry.dispatch("delta_rule_scan", config, repr(config), *tensors)
        for a, b in zip(got, expected(config, *tensors)):
            torch.testing.assert_close(a, b, **TOL)
