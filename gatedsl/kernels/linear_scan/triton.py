"""linear_scan's GLA form (chunked.py's equations) as Triton kernels, forward and backward; CUDA only (tested on CPU
under TRITON_INTERPRET=1).

One program per row n (a batch element and head) walks its chunks of 16 steps in order, keeping the
[K, V] state in registers: within a chunk the masked segment sums exp(c_t − c_s), s ≤ t, formed in
registers ([16, 16, K]: on a GPU these cost no memory traffic, unlike chunked.py's on a CPU), across
chunks the state; every exponent is ≤ 0 where a_t ≤ 1. The forward stores each chunk's start state;
the backward walks the chunks in reverse with the gradient of the state and computes dq, dk, dv and
dS_0 from them. The log decays' gradient follows in torch from an identity (with B_t the cumulative
log decay, q and k enter only as q_t e^{B_t} and k_t e^{−B_t}, and the final state as e^{B_T} ⊙ (...)):
∂L/∂B_t = q_t ⊙ dq_t − k_t ⊙ dk_t (+ Σ_v dS_T ⊙ S_T at the last step), summed from the end (g_t enters
every B_u with u ≥ t). Computed in float32 (half precision is widened).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatedsl.kernels.linear_scan.chunked import gla_layout

CHUNK = 16  # tl.dot's least block size; the [C, C, K] segment sums live in registers


@triton.jit
def _forward(q, k, v, g, s0, o, starts, final, T, K, V, CHUNKS,
             BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    n = tl.program_id(0)
    rt, rk, rv = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    kv = rk[:, None] * V + rv[None, :]
    mkv = mk[:, None] & mv[None, :]
    state = tl.load(s0 + n * K * V + kv, mask=mkv, other=0.0)
    causal = rt[:, None] >= rt[None, :]
    for c in range(0, CHUNKS):
        t = c * BT + rt
        mt = t < T
        at_k = n * T * K + t[:, None] * K + rk[None, :]
        at_v = n * T * V + t[:, None] * V + rv[None, :]
        qc = tl.load(q + at_k, mask=mt[:, None] & mk[None, :], other=0.0)
        kc = tl.load(k + at_k, mask=mt[:, None] & mk[None, :], other=0.0)
        gc = tl.load(g + at_k, mask=mt[:, None] & mk[None, :], other=0.0)  # past the end: a decay of 1
        vc = tl.load(v + at_v, mask=mt[:, None] & mv[None, :], other=0.0)
        tl.store(starts + (n * CHUNKS + c) * K * V + kv, state, mask=mkv)
        cum = tl.cumsum(gc, axis=0)
        end = tl.sum(tl.where(rt[:, None] == BT - 1, cum, 0.0), axis=0)
        spans = tl.where(causal[:, :, None], cum[:, None, :] - cum[None, :, :], float("-inf"))
        scores = tl.sum(qc[:, None, :] * kc[None, :, :] * tl.exp(spans), axis=2)
        out = tl.dot(scores, vc, input_precision="ieee") + tl.dot(qc * tl.exp(cum), state, input_precision="ieee")
        tl.store(o + at_v, out, mask=mt[:, None] & mv[None, :])
        k_out = kc * tl.exp(end[None, :] - cum)
        state = tl.exp(end)[:, None] * state + tl.dot(tl.trans(k_out), vc, input_precision="ieee")
    tl.store(final + n * K * V + kv, state, mask=mkv)


@triton.jit
def _backward(q, k, v, g, starts, do, dfinal, dq, dk, dv, ds0, T, K, V, CHUNKS,
              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    n = tl.program_id(0)
    rt, rk, rv = tl.arange(0, BT), tl.arange(0, BK), tl.arange(0, BV)
    mk, mv = rk < K, rv < V
    kv = rk[:, None] * V + rv[None, :]
    mkv = mk[:, None] & mv[None, :]
    dstate = tl.load(dfinal + n * K * V + kv, mask=mkv, other=0.0)  # ∂L/∂(the state at the chunk's end)
    causal = rt[:, None] >= rt[None, :]
    for i in range(0, CHUNKS):
        c = CHUNKS - 1 - i
        t = c * BT + rt
        mt = t < T
        at_k = n * T * K + t[:, None] * K + rk[None, :]
        at_v = n * T * V + t[:, None] * V + rv[None, :]
        qc = tl.load(q + at_k, mask=mt[:, None] & mk[None, :], other=0.0)
        kc = tl.load(k + at_k, mask=mt[:, None] & mk[None, :], other=0.0)
        gc = tl.load(g + at_k, mask=mt[:, None] & mk[None, :], other=0.0)
        vc = tl.load(v + at_v, mask=mt[:, None] & mv[None, :], other=0.0)
        doc = tl.load(do + at_v, mask=mt[:, None] & mv[None, :], other=0.0)
        start = tl.load(starts + (n * CHUNKS + c) * K * V + kv, mask=mkv, other=0.0)
        cum = tl.cumsum(gc, axis=0)
        end = tl.sum(tl.where(rt[:, None] == BT - 1, cum, 0.0), axis=0)
        weights = tl.exp(tl.where(causal[:, :, None], cum[:, None, :] - cum[None, :, :], float("-inf")))  # [t, s, k]
        scores = tl.sum(qc[:, None, :] * kc[None, :, :] * weights, axis=2)  # the forward's, [t, s]
        dov = tl.dot(doc, tl.trans(vc), input_precision="ieee")  # do_t · v_s, [t, s]
        dq_c = tl.sum(dov[:, :, None] * weights * kc[None, :, :], axis=1) \
            + tl.exp(cum) * tl.dot(doc, tl.trans(start), input_precision="ieee")
        to_end = tl.exp(end[None, :] - cum)
        dk_c = tl.sum(dov[:, :, None] * weights * qc[:, None, :], axis=0) \
            + to_end * tl.dot(vc, tl.trans(dstate), input_precision="ieee")
        dv_c = tl.dot(tl.trans(scores), doc, input_precision="ieee") \
            + tl.dot(kc * to_end, dstate, input_precision="ieee")
        tl.store(dq + at_k, dq_c, mask=mt[:, None] & mk[None, :])
        tl.store(dk + at_k, dk_c, mask=mt[:, None] & mk[None, :])
        tl.store(dv + at_v, dv_c, mask=mt[:, None] & mv[None, :])
        dstate = tl.exp(end)[:, None] * dstate + tl.dot(tl.trans(qc * tl.exp(cum)), doc, input_precision="ieee")
    tl.store(ds0 + n * K * V + kv, dstate, mask=mkv)


def _blocks(K: int, V: int) -> dict:
    return dict(BT=CHUNK, BK=max(16, triton.next_power_of_2(K)), BV=max(16, triton.next_power_of_2(V)))


class _ChunkedGLA(torch.autograd.Function):
    """(q, k, v, g, S_0) -> (o, S_T) on rows [N, T, ·], float32 and contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial):
        N, T, K = q.shape
        V = v.shape[-1]
        chunks = triton.cdiv(T, CHUNK)
        o = torch.empty(N, T, V, device=q.device, dtype=q.dtype)
        starts = torch.empty(N, chunks, K, V, device=q.device, dtype=q.dtype)
        final = torch.empty(N, K, V, device=q.device, dtype=q.dtype)
        _forward[(N,)](q, k, v, g, initial, o, starts, final, T, K, V, chunks, **_blocks(K, V))
        ctx.save_for_backward(q, k, v, g, starts, final)
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, g, starts, final = ctx.saved_tensors
        N, T, K = q.shape
        V = v.shape[-1]
        do = q.new_zeros(N, T, V) if do is None else do.contiguous()
        dfinal = torch.zeros_like(final) if dfinal is None else dfinal.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        ds0 = torch.empty_like(final)
        _backward[(N,)](q, k, v, g, starts, do, dfinal, dq, dk, dv, ds0, T, K, V, starts.shape[1], **_blocks(K, V))
        dcum = q * dq - k * dk  # ∂L/∂B_t, B_t = Σ_{u ≤ t} g_u
        dcum[:, -1] += (dfinal * final).sum(-1)
        dg = dcum.flip(1).cumsum(1).flip(1)
        return dq, dk, dv, dg, ds0


def _rows(q, k, v, g, initial):
    K = q.shape[-1]
    rows = [x.float().contiguous() for x in (q, k, v, g.expand(*g.shape[:-1], K), initial)]
    return _ChunkedGLA.apply(*rows)


def chunked(config, decay, k, v, q, state) -> tuple[torch.Tensor, torch.Tensor]:
    return gla_layout(config, decay, k, v, q, state, _rows)
