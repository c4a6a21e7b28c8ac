"""linear_scan's Triton kernels, forward and backward, against the step-by-step reference, run by Triton's interpreter.

Triton reads TRITON_INTERPRET when it is imported, so the comparisons run in a subprocess with it set
(test_under_the_interpreter starts it); there they run on CPU tensors. The kernels compute in float32,
the reference in float64 on the same inputs: over these short sequences the difference is ~1e-6 of
the values' scale (float32 rounding in dot products of up to 33 terms and cumulative log decays); the
tolerance of 1e-4 leaves a margin, while a wrong decay, term or gradient differs by 1e-1 or more.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (it is in the test extra on Linux x86-64)")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(INTERPRETED, reason="the launcher: the comparisons below run in its subprocess")
def test_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           __file__, "-k", "interpreted"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


def _config(**changes):
    from gatedsl.ir.graph import Graph
    from gatedsl.ir.ops import LinearScanAttrs

    fields = dict(cell="Cell", path="cell", body=Graph("Cell"), log_decay=True, drive="outer", readout="einsum",
                  equation="...kv,...k->...v", key_readout=True)
    return LinearScanAttrs(**{**fields, **changes})


CASES = [  # (T, decay width: 1 scalar or K per key, K, V, reverse, last, initial state, strong decays)
    (1, "key", 5, 4, False, False, True, False),
    (7, "key", 5, 4, True, False, False, False),
    (16, "scalar", 16, 16, False, False, True, False),
    (37, "key", 20, 33, False, False, True, True),
    (37, "scalar", 8, 12, True, True, True, True),
    (21, "key", 3, 16, False, True, False, False),
]


@pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_interpreter's subprocess (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-{c[1]}-K{c[2]}-V{c[3]}" + "-reverse" * c[4] + "-last" * c[5]
                                            for c in CASES])
def test_interpreted_triton_equals_the_reference(case):
    from gatedsl.kernels.linear_scan import triton as triton_kernels
    from gatedsl.kernels.linear_scan.reference import step

    T, width, K, V, reverse, last, initial, strong = case
    gen = torch.Generator().manual_seed(T * 7 + K)
    batch = (2, 3)
    g = torch.nn.functional.logsigmoid(torch.randn(T, *batch, K if width == "key" else 1, 1, generator=gen))
    if strong:  # a_t = 1e-30 at about a third of the steps
        g = torch.where(torch.rand(g.shape, generator=gen) < 0.3, math.log(1e-30), g)
    inputs = [g, torch.randn(T, *batch, K, generator=gen), torch.randn(T, *batch, V, generator=gen),
              torch.randn(T, *batch, K, generator=gen),
              torch.randn(*batch, K, V, generator=gen) if initial else torch.zeros(*batch, K, V)]
    cfg = _config(reverse=reverse, last=last)
    ours = [x.clone().requires_grad_() for x in inputs]
    theirs = [x.double().requires_grad_() for x in inputs]
    got, want = triton_kernels.chunked(cfg, *ours), step(cfg, *theirs)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a, b.float(), **TOL)
    probes = [torch.randn(w.shape, generator=gen, dtype=torch.float64) for w in want]
    sum((a * p.float()).sum() for a, p in zip(got, probes)).backward()
    sum((b * p).sum() for b, p in zip(want, probes)).backward()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a.grad, b.grad.float(), **TOL, msg=lambda m, i=i: f"input {i}: {m}")


@pytest.mark.skipif(not INTERPRETED, reason="runs in test_under_the_interpreter's subprocess (TRITON_INTERPRET=1)")
def test_interpreted_triton_takes_only_the_output_or_only_the_state():
    """Backward with a gradient for one result only (the other unused): the missing one counts as zero."""
    from gatedsl.kernels.linear_scan import triton as triton_kernels
    from gatedsl.kernels.linear_scan.reference import step

    gen = torch.Generator().manual_seed(5)
    inputs = [torch.nn.functional.logsigmoid(torch.randn(19, 2, 6, 1, generator=gen))]
    inputs += [torch.randn(*shape, generator=gen) for shape in ((19, 2, 6), (19, 2, 7), (19, 2, 6), (2, 6, 7))]
    for which in (0, 1):
        ours = [x.clone().requires_grad_() for x in inputs]
        theirs = [x.double().requires_grad_() for x in inputs]
        triton_kernels.chunked(_config(), *ours)[which].sum().backward()
        step(_config(), *theirs)[which].sum().backward()
        for a, b in zip(ours, theirs):  # q gets no gradient from the final state alone
            expected = torch.zeros_like(a) if b.grad is None else b.grad.float()
            torch.testing.assert_close(a.grad, expected, **TOL)
