"""The data movement of routed moe_dispatch in Triton, forward and backward: gather tokens into expert order, scale and add back.

Three kernels, each one program per row (and block of features):
  gather_rows    out[j] = s[j] · src[index[j]]                 tokens into expert order; dy back to the pairs
  segment_sum    out[n] = base[n] + Σ_e s[p_e] · src[p_e]      over token n's pairs p_e in expert order:
                                                                the weighted combine, and dx from the pairs
  row_dot        out[j] = ⟨a[index[j]], b[j]⟩                  the gate values' gradient
Each token's sum is read, not scattered, so no atomics: the result is deterministic and adds a
token's terms in expert order, as reference.combine (torch's index_add) does. Sums run in
float32 for half types and in float64 for float64. Tested against reference.py under
TRITON_INTERPRET=1 (tests/test_kernels_moe_dispatch_triton.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatedsl.kernels.moe_dispatch.routed import Routing, run_routed

_BLOCK = 128


@triton.jit
def _gather_rows_kernel(src, index, scale, out, width, HAS_SCALE: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    source = tl.load(index + row)
    values = tl.load(src + source * width + cols, mask=inside, other=0).to(ACC)
    if HAS_SCALE:
        values = values * tl.load(scale + row).to(ACC)
    tl.store(out + row * width + cols, values, mask=inside)


@triton.jit
def _segment_sum_kernel(src, order, offsets, scale, base, out, width, HAS_SCALE: tl.constexpr,
                        HAS_BASE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    if HAS_BASE:
        acc = tl.load(base + token * width + cols, mask=inside, other=0).to(ACC)
    else:
        acc = tl.zeros([BLOCK], dtype=ACC)
    for e in range(tl.load(offsets + token), tl.load(offsets + token + 1)):
        pair = tl.load(order + e)
        values = tl.load(src + pair * width + cols, mask=inside, other=0).to(ACC)
        if HAS_SCALE:
            values = values * tl.load(scale + pair).to(ACC)
        acc += values
    tl.store(out + token * width + cols, acc, mask=inside)


@triton.jit
def _row_dot_kernel(a, index, b, out, width, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    source = tl.load(index + row)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < width
        left = tl.load(a + source * width + cols, mask=inside, other=0).to(ACC)
        right = tl.load(b + row * width + cols, mask=inside, other=0).to(ACC)
        acc += left * right
    tl.store(out + row, tl.sum(acc, axis=0))


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def gather_rows(src: torch.Tensor, index: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """out[j] = scale[j] · src[index[j]] (scale 1 where None)."""
    src = src.contiguous()
    out = src.new_empty(index.shape[0], src.shape[1])
    if out.numel():
        grid = (index.shape[0], triton.cdiv(src.shape[1], _BLOCK))
        _gather_rows_kernel[grid](src, index, scale if scale is not None else src, out, src.shape[1],
                                  HAS_SCALE=scale is not None, ACC=_acc(src.dtype), BLOCK=_BLOCK)
    return out


def segment_sum(src: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor | None,
                base: torch.Tensor | None) -> torch.Tensor:
    """out[n] = base[n] + Σ_{e in offsets[n]..offsets[n+1]} scale[order[e]] · src[order[e]] (base 0, scale 1 where None)."""
    src = src.contiguous()
    rows = offsets.shape[0] - 1
    out = src.new_empty(rows, src.shape[1])
    if out.numel():
        grid = (rows, triton.cdiv(src.shape[1], _BLOCK))
        _segment_sum_kernel[grid](src, order, offsets, scale if scale is not None else src,
                                  base.contiguous() if base is not None else src, out, src.shape[1],
                                  HAS_SCALE=scale is not None, HAS_BASE=base is not None, ACC=_acc(src.dtype),
                                  BLOCK=_BLOCK)
    return out


def row_dot(a: torch.Tensor, index: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out[j] = ⟨a[index[j]], b[j]⟩."""
    a, b = a.contiguous(), b.contiguous()
    out = b.new_empty(index.shape[0])
    if out.numel():
        _row_dot_kernel[(index.shape[0],)](a, index, b, out, b.shape[1], ACC=_acc(b.dtype), BLOCK=_BLOCK)
    return out


class _Gather(torch.autograd.Function):
    """xs[j] = x[tokens[j]]; dx[n] = Σ over token n's pairs of dxs."""

    @staticmethod
    def forward(ctx, rows, route: Routing):
        ctx.route = route
        return gather_rows(rows, route.tokens)

    @staticmethod
    def backward(ctx, grad):
        order, offsets = ctx.route.by_token()
        return segment_sum(grad, order, offsets, None, None), None


class _Combine(torch.autograd.Function):
    """y[n] = base[n] + Σ over token n's pairs j of w[j] · ys[j]; dys[j] = w[j] · dy[tokens[j]], dw[j] = ⟨dy[tokens[j]], ys[j]⟩."""

    @staticmethod
    def forward(ctx, ys, weights, base, route: Routing):
        ctx.route = route
        ctx.has_base = base is not None
        ctx.save_for_backward(ys, weights)
        order, offsets = route.by_token()
        return segment_sum(ys, order, offsets, weights, base)

    @staticmethod
    def backward(ctx, grad):
        ys, weights = ctx.saved_tensors
        grad = grad.contiguous()
        tokens = ctx.route.tokens
        d_ys = gather_rows(grad, tokens, weights) if ctx.needs_input_grad[0] else None
        d_weights = row_dot(grad, tokens, ys) if ctx.needs_input_grad[1] else None
        return d_ys, d_weights, (grad if ctx.has_base and ctx.needs_input_grad[2] else None), None


def _gather(rows: torch.Tensor, route: Routing) -> torch.Tensor:
    return _Gather.apply(rows, route)


def _combine(ys: torch.Tensor, weights: torch.Tensor, route: Routing, base: torch.Tensor | None) -> torch.Tensor:
    return _Combine.apply(ys, weights, base, route)


def sorted_experts(config, x, g, base, *experts):
    """routed.sorted_experts with the gather and the weighted combine (and their gradients) in Triton."""
    return run_routed(config, x, g, base, experts, gather=_gather, combine=_combine)
