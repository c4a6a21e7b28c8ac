"""moe_dispatch's Triton kernels (gatedsl/kernels/moe_dispatch/triton.py), forward and backward, equal the plain
data movement of reference.py (index_select, index_add) and the dense mixture, run in Triton's interpreter on the
CPU (TRITON_INTERPRET=1, in a child process: triton reads it as the kernels are defined)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed here")

from triton_interpreter import interpreted, run_in_the_interpreter  # noqa: E402

# float64: the kernels add the same terms in the same order as index_add (a token's pairs in expert order),
# so only a fused multiply-add can differ, by an ulp: 1e-12. float32: the same, ~1e-7 relative per
# operation over at most a few terms: 1e-5, while a wrong row or gate shows at 1e-1.
TOLS = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-5, "atol": 1e-5}}
# (tokens, experts, feature width, pairs per token): widths below, at and over one block of 128 columns;
# tokens with no pair at all; one expert; every expert on every token.
CASES = [(9, 4, 5, "top2"), (6, 3, 130, "top1 with drops"), (5, 1, 128, "all"), (7, 4, 3, "all"),
         (4, 3, 6, "none")]
DTYPES = [torch.float64, torch.float32]


def test_triton_kernels_in_the_interpreter():
    run_in_the_interpreter(__file__, 2 * len(CASES) * len(DTYPES) + len(DTYPES))


def gate(tokens: int, experts: int, kind: str, dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(tokens * 31 + experts)
    logits = torch.randn(tokens, experts, generator=gen, dtype=torch.float64)
    if kind == "all":
        return torch.softmax(logits, -1).to(dtype)
    if kind == "none":
        return torch.zeros(tokens, experts, dtype=dtype)
    k = 2 if kind == "top2" else 1
    values, index = logits.topk(k, -1)
    g = torch.zeros_like(logits).scatter(-1, index, torch.softmax(values, -1))
    if kind == "top1 with drops":
        g[::2] = 0  # dropped tokens, as Switch routing's capacity drops them
    return g.to(dtype)


def _kernels():
    from gatedsl.kernels.moe_dispatch import triton as kernels

    assert type(kernels._gather_rows_kernel).__name__ == "InterpretedFunction"  # really in the interpreter
    return kernels


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_gather_and_combine_equal_index_select_and_index_add(case, dtype):
    from gatedsl.kernels.moe_dispatch import reference
    from gatedsl.kernels.moe_dispatch.routed import Routing

    kernels = _kernels()
    tokens, experts, width, kind = case
    route = Routing.of(gate(tokens, experts, kind, dtype))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, width, generator=gen, dtype=dtype)
    pairs = route.tokens.shape[0]
    ys = torch.randn(pairs, width, generator=gen, dtype=dtype)
    weights = torch.rand(pairs, generator=gen, dtype=dtype)
    base = torch.randn(tokens, width, generator=gen, dtype=dtype)
    d_y = torch.randn(tokens, width, generator=gen, dtype=dtype)
    d_xs = torch.randn(pairs, width, generator=gen, dtype=dtype)
    results = []
    for gather, combine in ((kernels._gather, kernels._combine),
                            (lambda rows, r: reference.gather_rows(rows, r.tokens),
                             lambda y, w, r, b: reference.combine(y, w, r.tokens, b))):
        leaves = [t.clone().requires_grad_() for t in (x, ys, weights, base)]
        xs = gather(leaves[0], route)
        y = combine(leaves[1], leaves[2], route, leaves[3])
        grads = torch.autograd.grad((xs * d_xs).sum() + (y * d_y).sum(), leaves)
        results.append([xs, y, *grads])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOLS[dtype])


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_triton_routed_mixture_equals_the_dense_one(case, dtype):
    from torch import nn

    from gatedsl.kernels.moe_dispatch import reference

    kernels = _kernels()
    tokens, experts, width, kind = case
    torch.manual_seed(0)
    modules = [nn.Sequential(nn.Linear(width, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype) for _ in range(experts)]
    calls = [lambda rows, m=m: (m(rows),) for m in modules]
    config = SimpleNamespace(columns=tuple(range(experts)))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(tokens, width, generator=gen, dtype=dtype)
    g = gate(tokens, experts, kind, dtype)
    d_y = torch.randn(tokens, 3, generator=gen, dtype=dtype)
    results = []
    for run in (kernels.sorted_experts, reference.dense):
        xk, gk = x.clone().requires_grad_(), g.clone().requires_grad_()
        out = run(config, xk, gk, None, *calls)
        weights = [p for m in modules for p in m.parameters()]
        grads = torch.autograd.grad((out * d_y).sum(), [xk, gk] + weights)
        results.append((out, grads[0], grads[1] * (g != 0), grads[2:]))  # g's gradient agrees on its support
    (out, dx, dg, dw), (out0, dx0, dg0, dw0) = results
    for got, want in zip([out, dx, dg, *dw], [out0, dx0, dg0, *dw0]):
        torch.testing.assert_close(got, want, **TOLS[dtype])


@interpreted
@pytest.mark.parametrize("dtype", DTYPES)
def test_row_dot_and_weighted_gather(dtype):
    kernels = _kernels()
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(6, 300, generator=gen, dtype=dtype)  # three blocks of columns, the last partial
    b = torch.randn(4, 300, generator=gen, dtype=dtype)
    index = torch.tensor([5, 0, 5, 2])
    scale = torch.rand(4, generator=gen, dtype=dtype)
    torch.testing.assert_close(kernels.row_dot(a, index, b), (a[index] * b).sum(-1), **TOLS[dtype])
    torch.testing.assert_close(kernels.gather_rows(a, index, scale), a[index] * scale[:, None], **TOLS[dtype])
