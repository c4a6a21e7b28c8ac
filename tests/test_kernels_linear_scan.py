"""linear_scan's kernels (gatedsl/kernels/linear_scan) against a loop over time written here from the equations.

S_t = a_t ⊙ S_{t−1} + b_t, each step emitting S_t or its readout; the loop below is that, step by
step (it shares no code with the kernels). Every kernel is compared with it in float64: outputs,
final states and the gradients with respect to every input and the initial state, forwards and
reversed, every step or the last, with the time axis shorter than a chunk, not a multiple of one,
and of one step, and with decays as strong as 1e-30. The chunked form reassociates sums across a
chunk and takes exp of differences of cumulative log decays, which rounds differently from the
loop by ~1e-15 relative; 1e-10 leaves a wide margin that no real difference (a wrong weight, step
or decay) stays within.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from gatedsl.ir.graph import Graph
from gatedsl.ir.ops import LinearScanAttrs
from gatedsl.kernels import registry
import gatedsl.kernels.linear_scan.chunked as chunked_module
from gatedsl.kernels.linear_scan.blocked import blocked, two_level
from gatedsl.kernels.linear_scan.chunked import chunked
from gatedsl.kernels.linear_scan.reference import step
from gatedsl.kernels.registry import Context

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
B, H, K, V = 2, 3, 5, 4


def config(**changes) -> LinearScanAttrs:
    """The GLA form (o_t = q_t S_t of S_t = diag(a_t) S_{t−1} + k_tᵀ v_t, a_t given as its log) unless changed."""
    fields = dict(cell="Cell", path="cell", body=Graph("Cell"), log_decay=True, drive="outer", readout="einsum",
                  equation="...kv,...k->...v", key_readout=True)
    return LinearScanAttrs(**{**fields, **changes})


def randn(*shape, seed):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(seed))


def loop(cfg: LinearScanAttrs, decay, drive, operand, state):
    """The recurrence from its equations: one step at a time, in the scan's order."""
    a = decay.exp() if cfg.log_decay else decay
    T = max(x.shape[0] for x in (a, *drive, operand) if x is not None)

    def at(x, t):  # step t of a per-step input (one of size 1 is the same at every step)
        return x[t] if x.shape[0] == T else x[0]

    outs = {}
    order = range(T - 1, -1, -1) if cfg.reverse else range(T)
    for t in order:
        if cfg.drive == "outer":
            k, v = at(drive[0], t), at(drive[1], t)
            b = torch.stack([k[..., i, None] * v for i in range(k.shape[-1])], dim=-2)  # row i: k_i v
        else:
            b = at(drive[0], t)
        state = at(a, t) * state + b
        if cfg.readout == "none":
            outs[t] = state
        elif cfg.readout == "mul":
            outs[t] = state * at(operand, t)
        else:
            outs[t] = torch.einsum(cfg.equation, state, at(operand, t))
    if cfg.last:
        return outs[order[-1]], state
    return torch.stack([outs[t] for t in range(T)]), state


def compare(kernel, cfg, decay, drive, operand, state, seed=0):
    """kernel(cfg, ...) equals the loop: outputs, final state, and gradients wrt every input and the initial state."""
    inputs = [decay, *drive, *([operand] if operand is not None else []), state]
    ours = [x.clone().requires_grad_() for x in inputs]
    theirs = [x.clone().requires_grad_() for x in inputs]
    got = kernel(cfg, *ours)
    n_drive = len(drive)
    want = loop(cfg, theirs[0], theirs[1:1 + n_drive], theirs[1 + n_drive] if operand is not None else None,
                theirs[-1])
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, **TOL)
    probes = [randn(*w.shape, seed=seed + i) for i, w in enumerate(want)]
    sum((g * p).sum() for g, p in zip(got, probes)).backward()
    sum((w * p).sum() for w, p in zip(want, probes)).backward()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.isfinite(a.grad).all(), i
        torch.testing.assert_close(a.grad, b.grad, **TOL, msg=lambda m, i=i: f"input {i}: {m}")


def gla_inputs(T, width, seed, strong=False, initial=True):
    """log a_t per key dim (width K) or per head (width 1), k, v, q and S_0 for [B, H] heads."""
    g = torch.nn.functional.logsigmoid(randn(T, B, H, width, 1, seed=seed)) / 4
    if strong:  # a_t = 1e-30 at about a third of the steps: everything before them is forgotten
        g = torch.where(randn(T, B, H, width, 1, seed=seed + 9) > 0.4, math.log(1e-30), g)
    k, v, q = randn(T, B, H, K, seed=seed + 1), randn(T, B, H, V, seed=seed + 2), randn(T, B, H, K, seed=seed + 3)
    state = randn(B, H, K, V, seed=seed + 4) if initial else torch.zeros(B, H, K, V, dtype=DT)
    return g, (k, v), q, state


LENGTHS = [1, 5, 16, 37, 130]  # one step, shorter than a chunk, a chunk (16 with a per-key decay), neither, several


@pytest.mark.parametrize("kernel", [step, chunked, blocked], ids=["step", "chunked", "blocked"])
@pytest.mark.parametrize("width", [1, K], ids=["scalar", "per-key"])
@pytest.mark.parametrize("T", LENGTHS)
def test_gla_form_equals_the_loop(kernel, width, T):
    for i, (reverse, last, initial) in enumerate(itertools.product([False, True], [False, True], [True, False])):
        g, drive, q, state = gla_inputs(T, width, seed=10 * T + i, initial=initial)
        compare(kernel, config(reverse=reverse, last=last), g, drive, q, state, seed=i)


@pytest.fixture
def halvings(monkeypatch):
    """How often the chunked form took its halving path (a chunk whose log decays span SPAN or more)."""
    calls = []
    original = chunked_module.within_chunks

    def counted(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(chunked_module, "within_chunks", counted)
    return calls


@pytest.mark.parametrize("kernel", [chunked, blocked], ids=["chunked", "blocked"])
@pytest.mark.parametrize("width", [1, K], ids=["scalar", "per-key"])
def test_strong_decays_stay_finite_and_exact(kernel, width, halvings):
    for reverse in (False, True):
        g, drive, q, state = gla_inputs(70, width, seed=3, strong=True)
        assert (g.exp() < 1e-29).any()
        compare(kernel, config(reverse=reverse), g, drive, q, state)
    assert len(halvings) == (2 if kernel is chunked else 0)  # chunks spanning e^-69 and more: the halving path


def test_mild_decays_take_one_product_per_chunk(halvings):
    g, drive, q, state = gla_inputs(130, K, seed=4)
    g = g / 4  # GLA's decays: σ(·)^{1/16}
    assert float(g.min()) > -chunked_module.SPAN / 64  # so no chunk of 64 steps spans SPAN
    compare(chunked, config(), g, drive, q, state)
    assert not halvings


def test_halving_sums_equal_the_masked_segment_sums():
    """within_chunks against Σ_{s ≤ t} (Σ_k q_tk k_sk exp(c_tk − c_sk)) v_s formed directly, [C, C, K]."""
    q, k, v = randn(2, 3, 16, K, seed=1), randn(2, 3, 16, K, seed=2), randn(2, 3, 16, V, seed=3)
    c = torch.cumsum(torch.nn.functional.logsigmoid(randn(2, 3, 16, K, seed=4)) * 20, dim=2)
    spans = c.unsqueeze(3) - c.unsqueeze(2)  # [.., t, s, K]
    weights = torch.where(torch.ones(16, 16, dtype=torch.bool).tril()[..., None], spans.exp(), 0.0)
    direct = torch.einsum("nctsk,nctk,ncsk,ncsv->nctv", weights, q, k, v)
    torch.testing.assert_close(chunked_module.within_chunks(q, k, v, c), direct, **TOL)


def test_a_decay_of_one_adds_up_the_drive():
    g, drive, q, state = gla_inputs(40, K, seed=5)
    compare(chunked, config(), torch.zeros_like(g), drive, q, state)  # plain linear attention


ELEMENTWISE = {  # (config, decay, drive, operand, state shape) for the blocked and step forms
    "HGRN (a state per channel, emitted)": (dict(readout="none", equation=""), (B, 6), None),
    "Mamba (decay per channel and state, y = C h)": (dict(readout="einsum", equation="...en,...n->...e"),
                                                       (B, 6, 3), (B, 3)),
    "a gated readout (o = S ⊙ x)": (dict(readout="mul", equation=""), (B, 6), (B, 6)),
}


@pytest.mark.parametrize("kernel", [step, blocked], ids=["step", "blocked"])
@pytest.mark.parametrize("case", sorted(ELEMENTWISE))
@pytest.mark.parametrize("T", LENGTHS)
def test_elementwise_forms_equal_the_loop(kernel, case, T):
    changes, shape, operand_shape = ELEMENTWISE[case]
    for i, (reverse, last, log_decay) in enumerate(itertools.product([False, True], [False, True], [False, True])):
        seed = 100 * T + i
        cfg = config(drive="given", key_readout=False, log_decay=log_decay, reverse=reverse, last=last, **changes)
        raw = randn(T, *shape, seed=seed)
        # Any decay is exact here: values of both signs, zeros, above one; or logs where log_decay.
        decay = raw / 2 if log_decay else torch.where(raw.abs() < 0.3, 0.0, raw)
        operand = randn(T, *operand_shape, seed=seed + 2) if operand_shape else None
        compare(kernel, cfg, decay, [randn(T, *shape, seed=seed + 1)], operand, randn(*shape, seed=seed + 3))


def test_inputs_the_same_at_every_step_broadcast_over_time():
    """A per-step input with a time axis of 1 (a constant of the cell) is the same at every step."""
    g, (k, v), q, state = gla_inputs(23, 1, seed=7)
    for kernel in (step, chunked, blocked):
        compare(kernel, config(), g[:1], (k, v), q, state)
        compare(kernel, config(), g, (k, v[:1]), q[:1], state)


def test_many_small_chunks():
    """Chunks of 2 and 4 steps (75 and 38 of them): the recurrence across chunks carries everything."""
    g, (k, v), q, state = gla_inputs(150, K, seed=8)
    rows = [x.reshape(150, B * H, -1).transpose(0, 1) for x in (q, k, v, g.squeeze(-1))]
    for C in (2, 4):  # 75 and 38 chunks
        o, final = chunked_module.gla_chunks(*rows, state.reshape(B * H, K, V), C)
        want_o, want_final = loop(config(), g, (k, v), q, state)
        torch.testing.assert_close(o.transpose(0, 1).reshape(150, B, H, V), want_o, **TOL)
        torch.testing.assert_close(final.reshape(B, H, K, V), want_final, **TOL)


def test_an_empty_time_axis_is_refused_as_by_the_loop():
    g, drive, q, state = gla_inputs(3, K, seed=1)
    for kernel in (step, chunked, blocked):
        with pytest.raises(ValueError, match="empty axis"):
            kernel(config(), g[:0], *(x[:0] for x in drive), q[:0], state)


def test_two_level_scan_in_blocks_of_about_root_t():
    a, b = randn(50, 3, seed=1), randn(50, 3, seed=2)
    states, final = two_level(a, b, torch.zeros(3, dtype=DT))
    expected, s = [], torch.zeros(3, dtype=DT)
    for t in range(50):
        s = a[t] * s + b[t]
        expected.append(s)
    torch.testing.assert_close(states, torch.stack(expected), **TOL)
    torch.testing.assert_close(final, s, **TOL)


# ------------------------------------------------------------- the cost rule
def ctx(T, gla=True, training=True, device="cpu", dtype="float32", state=4 * 64 * 64, width=64):
    sizes = (("T", T), ("state", state), ("K", 64 if gla else None), ("V", 64 if gla else None),
             ("decay_width", width if gla else None), ("gla", int(gla)))
    return Context(device, dtype, training, sizes)


def test_short_sequences_run_step_by_step_and_decoding_one_step():
    for training in (True, False):
        for gla in (True, False):
            assert registry.choose("linear_scan", ctx(1, gla=gla, training=training)).kernel == "one_step"
            assert registry.choose("linear_scan", ctx(2, gla=gla, training=training)).kernel == "step"


def test_long_sequences_run_chunk_parallel_where_that_is_faster():
    for training in (True, False):
        assert registry.choose("linear_scan", ctx(2048, training=training)).kernel == "chunked"
        assert registry.choose("linear_scan", ctx(2048, training=training, width=1)).kernel == "chunked"
        # The blocked form makes 4 passes per element where a step makes 2: it wins on a small state only.
        assert registry.choose("linear_scan", ctx(2048, gla=False, training=training, state=256)).kernel == "blocked"
        assert registry.choose("linear_scan", ctx(2048, gla=False, training=training, state=8192)).kernel == "step"


def test_the_chunked_form_needs_the_gla_form_and_triton_needs_cuda():
    pick = registry.choose("linear_scan", ctx(4096, gla=False))
    why = {c.kernel: c.why for c in pick.candidates if not c.applies}
    assert "not gated linear attention's form" in why["chunked"] and "CUDA" in why["triton"]
    on_gpu = registry.choose("linear_scan", ctx(4096, device="cuda"))
    assert on_gpu.kernel == "triton"
    assert registry.choose("linear_scan", ctx(4096, device="cuda", dtype="float64")).kernel == "chunked"


def test_a_length_unknown_at_compile_time_is_decided_per_call():
    pick = registry.choose("linear_scan", ctx(None, state=None))
    assert pick.kernel == "step"
    assert "each call decides" in next(c.why for c in pick.candidates if c.kernel == "step")
