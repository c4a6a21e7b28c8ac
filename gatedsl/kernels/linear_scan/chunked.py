"""linear_scan in the chunk-parallel form of gated linear attention, in plain PyTorch (autograd gives the backward).

The form: S_t = diag(a_t) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t, with a_t > 0 one scalar or one value per
key dim, given as g_t = log a_t. Cut T into chunks of C and let c_t = Σ g from the chunk's start to t
(the log of the decay over that span). Then, within a chunk,

    o_t = Σ_{s ≤ t in the chunk} (Σ_k q_tk k_sk exp(c_tk − c_sk)) v_s  +  (q_t ⊙ exp(c_t)) S_start,
    S_end = exp(c_end) ⊙ S_start + Σ_s (k_s ⊙ exp(c_end − c_s))ᵀ v_s,

and the chunks' start states follow one another (T / C steps). Where a chunk's log decays span less
than SPAN (each key dim's largest c minus its smallest), its scores are one masked matrix product of
q ⊙ exp(c − m) and k ⊙ exp(m − c), m the middle of that span, every factor within e^±SPAN/2. With a
stronger decay somewhere (a_t ~ 1e-30), the masked segment sums exp(c_t − c_s), s ≤ t, are still
never formed per key dim ([C, C, K] would make the chunk's work element-wise): the chunk is
halved, and halved again down to single steps, and for each half R after a half L, with r = c at L's
last step, exp(c_t − c_s) = exp(c_t − r) · exp(r − c_s), so R's sums over L are matrix products of
q_R ⊙ exp(c_R − r), k_L ⊙ exp(r − c_L) and v_L; the diagonal, s = t, weighs 1. Every exponent here and
across chunks is a decay over a span run forwards (c_t − r, r − c_s, c_t, c_end − c_s), so it is ≤ 0
where a_t ≤ 1: nothing overflows, and with a_t ~ 1e-30 a factor underflows only where the true
weight, their product, is smaller still.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gatedsl.kernels.linear_scan import chunk_size
from gatedsl.kernels.linear_scan.reference import length


SPAN = 40.0  # a chunk whose log decays span less (per key dim) takes one matrix product: e^±20 is safe in float32


def within_chunks(q, k, v, c) -> torch.Tensor:
    """Σ_{s ≤ t in t's chunk} (Σ_k q_tk k_sk exp(c_tk − c_sk)) v_s for rows [N, n, C, ·], C a power of 2."""
    N, n, C, K = q.shape
    V = v.shape[-1]
    out = (q * k).sum(-1, keepdim=True) * v  # s = t: a weight of 1
    size = C
    while size > 1:
        half = size // 2

        def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # unbind, not slicing: its backward is one stack, where a slice's fills a full-size zero tensor
            return x.reshape(N, n, C // size, 2, half, x.shape[-1]).unbind(3)

        (c_early, c_late), (_, q_late), (k_early, _), (v_early, _) = halves(c), halves(q), halves(k), halves(v)
        boundary = c_early[..., -1:, :]  # c at the first half's last step
        late = q_late * (c_late - boundary).exp()
        early = k_early * (boundary - c_early).exp()
        if half > 4:
            added = (late @ early.transpose(-1, -2)) @ v_early  # each second half's sums over its first half
        else:  # products of a few rows: element-wise (batched matrix products of tiny matrices loop per batch)
            scores = (late.unsqueeze(-2) * early.unsqueeze(-3)).sum(-1)
            added = (scores.unsqueeze(-1) * v_early.unsqueeze(-3)).sum(-2)
        out.view(N, n, C // size, 2, half, V)[:, :, :, 1] += added
        size = half
    return out


def across_chunks(decay, updates, initial) -> tuple[torch.Tensor, torch.Tensor]:
    """Every chunk's start state [N, n, K, V] and the last state, of start_{j+1} = exp(e_j) ⊙ start_j + U_j.

    decay: e_j, each chunk's log decay [N, n, K or 1]; updates: U_j [N, n, K, V]; initial [N, K, V]. A step per
    chunk: two small element-wise ops, cheaper here than weighing all chunk pairs at once in batched products."""
    state, starts = initial, []
    for chunk_decay, update in zip(decay.exp().unsqueeze(-1).unbind(1), updates.unbind(1)):
        starts.append(state)
        state = chunk_decay * state + update
    return torch.stack(starts, 1), state


def gla_chunks(q, k, v, g, initial, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """o [N, T, V] and the final state [N, K, V] of S_t = diag(exp g_t) S_{t−1} + k_tᵀ v_t, o_t = q_t S_t.

    q, k [N, T, K]; v [N, T, V]; g [N, T, K] or [N, T, 1] (a scalar decay); initial [N, K, V]."""
    N, T, K = q.shape
    V = v.shape[-1]
    n = math.ceil(T / C)
    pad = n * C - T
    if pad:  # steps past the end that change nothing: g = 0 (a decay of 1), k = v = 0
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    q, k, v, g = (x.reshape(N, n, C, x.shape[-1]) for x in (q, k, v, g))
    c = g.cumsum(2)  # log decay from the chunk's start through t
    end = c[:, :, -1:]  # the whole chunk's
    with torch.no_grad():  # a reference point only: the results do not depend on it, nor do their gradients
        high, low = c.amax(2, keepdim=True), c.amin(2, keepdim=True)
        middle = (high + low) / 2
    if float((high - low).max()) < SPAN:
        # One product per chunk: exp(c_t − c_s) = exp(c_t − m) · exp(m − c_s), m the middle of the chunk's
        # log decays, so each factor lies within e^±SPAN/2 and none under- or overflows.
        q_mid, k_mid = q * (c - middle).exp(), k * (middle - c).exp()
        future = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
        out = (q_mid @ k_mid.transpose(-1, -2)).masked_fill(future, 0.0) @ v
        k_out = k_mid * (end - middle).exp()  # k ⊙ exp(c_end − c), its factors within e^±SPAN/2
    else:
        out = within_chunks(q, k, v, c)
        k_out = k * (end - c).exp()
    # Across chunks: each chunk's start state, then what it adds to every o_t of its chunk.
    starts, state = across_chunks(end.squeeze(2), k_out.transpose(-1, -2) @ v, initial)
    out = out + (q * c.exp()) @ starts
    return out.reshape(N, n * C, V)[:, :T], state


def gla_layout(config, decay, k, v, q, state, core) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_scan's GLA form run by `core` (gla_chunks' signature, without C) on rows [N, T, ·] in time order.

    decay = log a_t [T, *, K or 1, 1], k and q [T, *, K], v [T, *, V], state [*, K, V] (each per-step input
    with a time axis of T or 1); half precision is computed in float32 (it cannot hold a cumulative log decay)."""
    T = length(decay, k, v, q)
    *batch, K, V = state.shape
    N = math.prod(batch)
    work = torch.promote_types(state.dtype, torch.float32)

    def rows(x: torch.Tensor) -> torch.Tensor:  # [T or 1, *batch', W] -> [N, T, W], contiguous
        x = x.expand(T, *batch, x.shape[-1]).to(work)
        x = x.reshape(T, N, x.shape[-1]).transpose(0, 1)
        # One copy here, where heads split off a [B, T, D] projection would otherwise be copied by every product.
        return (x.flip(1) if config.reverse else x).contiguous()

    o, final = core(rows(q), rows(k), rows(v), rows(decay.squeeze(-1)), state.reshape(N, K, V).to(work))
    if config.reverse:
        o = o.flip(1)
    final = final.reshape(state.shape).to(state.dtype)
    if config.last:
        return o[:, 0 if config.reverse else T - 1].reshape(*batch, V).to(state.dtype), final
    return o.transpose(0, 1).reshape(T, *batch, V).to(state.dtype), final


def chunked(config, decay, k, v, q, state) -> tuple[torch.Tensor, torch.Tensor]:
    T = length(decay, k, v, q)
    C = chunk_size(T)
    return gla_layout(config, decay, k, v, q, state, lambda *rows: gla_chunks(*rows, C))
