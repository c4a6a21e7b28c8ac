"""The chunked gated delta rule (chunked.py's algorithm) as Triton kernels, forward and backward, on CUDA.

Forward: `_fwd_intra` per chunk (the decays, each exp of a sum of log α over a segment of the chunk;
A; the UT transform's inverse (I + A)⁻¹ by forward substitution; Ũ and W); `_fwd_recurrence` per row
and block of V, chunk after chunk (the state entering each chunk, U = Ũ − W Sᵀ, the next state);
`_fwd_output` per chunk (O). Backward: `_bwd_recurrence` runs the state's gradient back through the
chunks (dU, and the gradient of the state after each chunk); `_bwd_intra` per chunk gives dq, dk, dv,
dβ and d log α from them, by the derivatives of chunked.py's equations written out (in the comments
below). Everything is computed in float32; products of float32 inputs use IEEE float32 (no TF32), of
float16/bfloat16 inputs TF32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gatedsl.kernels.delta_rule.chunked import log_decay
from gatedsl.kernels.delta_rule.reference import step_loop, unpack

CHUNK = 64
STATE_BLOCK = 32  # the V rows of the state one program of the recurrences carries


@triton.jit
def _decays(log_alpha_ptr, i_r, t, T, rows):
    """Γ (Γ_ti = exp(Σ_{i<j≤t} log α_j) for t ≥ i, else 0) and the running sums g_t = Σ_{j≤t} log α_j of a chunk.

    Each Γ_ti sums its own segment (no difference of running sums), so that the gradient of log α_j,
    gathered from the segments containing j, keeps its relative precision where α_j is tiny."""
    logs = tl.load(log_alpha_ptr + i_r * T + t, mask=t < T, other=0.)
    segments = tl.cumsum(tl.where(rows[:, None] > rows[None, :], logs[:, None], 0.), 0)
    return tl.where(rows[:, None] >= rows[None, :], tl.exp(segments), 0.), tl.cumsum(logs, 0)


@triton.jit
def _fwd_intra(k_ptr, v_ptr, log_alpha_ptr, beta_ptr, g_ptr, to_end_ptr, inv_ptr, known_ptr, w_ptr, T, NT,
               K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               PRECISION: tl.constexpr):
    i_t, i_r = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BT)
    t = i_t * BT + rows
    ck, cv = tl.arange(0, BK), tl.arange(0, BV)
    live = t < T  # past the end: k = v = 0, β = 0, log α = 0, which leave the state as it is
    k = tl.load(k_ptr + (i_r * T + t[:, None]) * K + ck[None, :], mask=live[:, None] & (ck[None, :] < K), other=0.)
    v = tl.load(v_ptr + (i_r * T + t[:, None]) * V + cv[None, :], mask=live[:, None] & (cv[None, :] < V), other=0.)
    beta = tl.load(beta_ptr + i_r * T + t, mask=live, other=0.)
    decay, g = _decays(log_alpha_ptr, i_r, t, T, rows)
    strict = rows[:, None] > rows[None, :]
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)
    a = tl.where(strict, beta[:, None] * decay * kk, 0.)
    # (I + A)⁻¹ row by row: row i = e_i − Σ_{j<i} A_ij row j (forward substitution; A is strictly lower).
    inv = (rows[:, None] == rows[None, :]).to(tl.float32)
    for i in range(1, BT):
        a_i = tl.sum(tl.where(rows[:, None] == i, a, 0.), 0)
        inv = tl.where(rows[:, None] == i, inv - tl.sum(a_i[:, None] * inv, 0)[None, :], inv)
    known = tl.dot(inv, beta[:, None] * v, input_precision=PRECISION)  # Ũ = (I + A)⁻¹ diag(β) V
    w = tl.dot(inv, (beta * tl.exp(g))[:, None] * k, input_precision=PRECISION)  # W = (I + A)⁻¹ diag(β γ) K
    padded = i_r * NT * BT + i_t * BT + rows  # the chunk's rows in the buffers padded to NT chunks
    tl.store(g_ptr + padded, g)
    tl.store(to_end_ptr + padded, tl.sum(tl.where(rows[:, None] == BT - 1, decay, 0.), 0))  # Γ_Ci
    tl.store(inv_ptr + padded[:, None] * BT + rows[None, :], inv)
    tl.store(known_ptr + padded[:, None] * V + cv[None, :], known, mask=cv[None, :] < V)
    tl.store(w_ptr + padded[:, None] * K + ck[None, :], w, mask=ck[None, :] < K)


@triton.jit
def _fwd_recurrence(k_ptr, g_ptr, to_end_ptr, known_ptr, w_ptr, s0_ptr, u_ptr, h_ptr, st_ptr, T, NT,
                    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BVS: tl.constexpr,
                    PRECISION: tl.constexpr):
    i_v, i_r = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BT)
    ck, cv = tl.arange(0, BK), i_v * BVS + tl.arange(0, BVS)
    in_state = (cv[:, None] < V) & (ck[None, :] < K)
    s = tl.load(s0_ptr + (i_r * V + cv[:, None]) * K + ck[None, :], mask=in_state, other=0.)  # [BVS, BK]
    for i_t in range(NT):
        t = i_t * BT + rows
        padded = i_r * NT * BT + t
        tl.store(h_ptr + ((i_r * NT + i_t) * V + cv[:, None]) * K + ck[None, :], s, mask=in_state)
        w = tl.load(w_ptr + padded[:, None] * K + ck[None, :], mask=ck[None, :] < K, other=0.)
        known = tl.load(known_ptr + padded[:, None] * V + cv[None, :], mask=cv[None, :] < V, other=0.)
        u = known - tl.dot(w, tl.trans(s), input_precision=PRECISION)  # U = Ũ − W Sᵀ
        tl.store(u_ptr + padded[:, None] * V + cv[None, :], u, mask=cv[None, :] < V)
        to_end = tl.load(to_end_ptr + padded)
        g_last = tl.load(g_ptr + i_r * NT * BT + i_t * BT + BT - 1)
        k = tl.load(k_ptr + (i_r * T + t[:, None]) * K + ck[None, :], mask=(t[:, None] < T) & (ck[None, :] < K),
                    other=0.)
        # S_next = γ_C S + Uᵀ diag(Γ_C·) K
        s = s * tl.exp(g_last) + tl.dot(tl.trans(u * to_end[:, None]), k, input_precision=PRECISION)
    tl.store(st_ptr + (i_r * V + cv[:, None]) * K + ck[None, :], s, mask=in_state)


@triton.jit
def _fwd_output(q_ptr, k_ptr, log_alpha_ptr, g_ptr, u_ptr, h_ptr, o_ptr, T, NT,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                PRECISION: tl.constexpr):
    i_t, i_r = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BT)
    t = i_t * BT + rows
    padded = i_r * NT * BT + t
    ck, cv = tl.arange(0, BK), tl.arange(0, BV)
    live = t < T
    q = tl.load(q_ptr + (i_r * T + t[:, None]) * K + ck[None, :], mask=live[:, None] & (ck[None, :] < K), other=0.)
    k = tl.load(k_ptr + (i_r * T + t[:, None]) * K + ck[None, :], mask=live[:, None] & (ck[None, :] < K), other=0.)
    g = tl.load(g_ptr + padded)
    u = tl.load(u_ptr + padded[:, None] * V + cv[None, :], mask=cv[None, :] < V, other=0.)
    h = tl.load(h_ptr + ((i_r * NT + i_t) * V + cv[:, None]) * K + ck[None, :],
                mask=(cv[:, None] < V) & (ck[None, :] < K), other=0.)
    decay, _ = _decays(log_alpha_ptr, i_r, t, T, rows)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay
    # O = diag(γ) Q Sᵀ + (Γ ⊙ Q Kᵀ)_{t≥i} U
    o = tl.dot(q * tl.exp(g)[:, None], tl.trans(h), input_precision=PRECISION) \
        + tl.dot(scores, u, input_precision=PRECISION)
    tl.store(o_ptr + (i_r * T + t[:, None]) * V + cv[None, :], o, mask=live[:, None] & (cv[None, :] < V))


@triton.jit
def _bwd_recurrence(q_ptr, k_ptr, log_alpha_ptr, g_ptr, to_end_ptr, w_ptr, do_ptr, dst_ptr, du_ptr, dh_ptr, ds0_ptr,
                    T, NT,
                    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BVS: tl.constexpr,
                    PRECISION: tl.constexpr):
    i_v, i_r = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BT)
    ck, cv = tl.arange(0, BK), i_v * BVS + tl.arange(0, BVS)
    in_state = (cv[:, None] < V) & (ck[None, :] < K)
    ds = tl.load(dst_ptr + (i_r * V + cv[:, None]) * K + ck[None, :], mask=in_state, other=0.)  # dL/dS after the chunk
    for j in range(NT):
        i_t = NT - 1 - j
        t = i_t * BT + rows
        padded = i_r * NT * BT + t
        live = t < T
        tl.store(dh_ptr + ((i_r * NT + i_t) * V + cv[:, None]) * K + ck[None, :], ds, mask=in_state)
        q = tl.load(q_ptr + (i_r * T + t[:, None]) * K + ck[None, :], mask=live[:, None] & (ck[None, :] < K),
                    other=0.)
        k = tl.load(k_ptr + (i_r * T + t[:, None]) * K + ck[None, :], mask=live[:, None] & (ck[None, :] < K),
                    other=0.)
        do = tl.load(do_ptr + (i_r * T + t[:, None]) * V + cv[None, :], mask=live[:, None] & (cv[None, :] < V),
                     other=0.)
        w = tl.load(w_ptr + padded[:, None] * K + ck[None, :], mask=ck[None, :] < K, other=0.)
        decay, g = _decays(log_alpha_ptr, i_r, t, T, rows)
        g_last = tl.load(g_ptr + i_r * NT * BT + i_t * BT + BT - 1)
        to_end = tl.load(to_end_ptr + padded)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay
        # dU = Pᵀ dO + diag(Γ_C·) K dS_nextᵀ  (U enters O = … + P U and S_next = … + Uᵀ diag(Γ_C·) K)
        du = tl.dot(tl.trans(scores), do, input_precision=PRECISION) \
            + tl.dot(k * to_end[:, None], tl.trans(ds), input_precision=PRECISION)
        tl.store(du_ptr + padded[:, None] * V + cv[None, :], du, mask=cv[None, :] < V)
        # dS = γ_C dS_next + (diag(γ) dO)ᵀ Q − dUᵀ W  (S enters S_next, O and U = Ũ − W Sᵀ)
        ds = ds * tl.exp(g_last) + tl.dot(tl.trans(do * tl.exp(g)[:, None]), q, input_precision=PRECISION) \
            - tl.dot(tl.trans(du), w, input_precision=PRECISION)
    tl.store(ds0_ptr + (i_r * V + cv[:, None]) * K + ck[None, :], ds, mask=in_state)


@triton.jit
def _bwd_intra(q_ptr, k_ptr, v_ptr, log_alpha_ptr, beta_ptr, g_ptr, to_end_ptr, inv_ptr, known_ptr, w_ptr, u_ptr, h_ptr,
               dh_ptr, du_ptr,
               do_ptr, dq_ptr, dk_ptr, dv_ptr, dbeta_ptr, dlog_alpha_ptr, T, NT,
               K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
               PRECISION: tl.constexpr):
    i_t, i_r = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, BT)
    t = i_t * BT + rows
    padded = i_r * NT * BT + t
    ck, cv = tl.arange(0, BK), tl.arange(0, BV)
    live = t < T
    seq_k = live[:, None] & (ck[None, :] < K)
    seq_v = live[:, None] & (cv[None, :] < V)
    in_state = (cv[:, None] < V) & (ck[None, :] < K)
    q = tl.load(q_ptr + (i_r * T + t[:, None]) * K + ck[None, :], mask=seq_k, other=0.)
    k = tl.load(k_ptr + (i_r * T + t[:, None]) * K + ck[None, :], mask=seq_k, other=0.)
    v = tl.load(v_ptr + (i_r * T + t[:, None]) * V + cv[None, :], mask=seq_v, other=0.)
    do = tl.load(do_ptr + (i_r * T + t[:, None]) * V + cv[None, :], mask=seq_v, other=0.)
    beta = tl.load(beta_ptr + i_r * T + t, mask=live, other=0.)
    decay, g = _decays(log_alpha_ptr, i_r, t, T, rows)  # Γ
    g_last = tl.load(g_ptr + i_r * NT * BT + i_t * BT + BT - 1)
    to_end = tl.load(to_end_ptr + padded)  # D = Γ_C·
    inv = tl.load(inv_ptr + padded[:, None] * BT + rows[None, :])
    known = tl.load(known_ptr + padded[:, None] * V + cv[None, :], mask=cv[None, :] < V, other=0.)
    w = tl.load(w_ptr + padded[:, None] * K + ck[None, :], mask=ck[None, :] < K, other=0.)
    u = tl.load(u_ptr + padded[:, None] * V + cv[None, :], mask=cv[None, :] < V, other=0.)
    du = tl.load(du_ptr + padded[:, None] * V + cv[None, :], mask=cv[None, :] < V, other=0.)
    state = ((i_r * NT + i_t) * V + cv[:, None]) * K + ck[None, :]
    h = tl.load(h_ptr + state, mask=in_state, other=0.)  # S entering the chunk
    dh = tl.load(dh_ptr + state, mask=in_state, other=0.)  # dL/dS_next

    upto = rows[:, None] >= rows[None, :]
    strict = rows[:, None] > rows[None, :]
    gamma = tl.exp(g)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    kk = tl.dot(k, tl.trans(k), input_precision=PRECISION)

    # O = diag(γ) Q Sᵀ + P U with P = Γ ⊙ Q Kᵀ (t ≥ i)
    dp = tl.where(upto, tl.dot(do, tl.trans(u), input_precision=PRECISION), 0.)
    dqk = dp * decay
    dq = tl.dot(do * gamma[:, None], h, input_precision=PRECISION) + tl.dot(dqk, k, input_precision=PRECISION)
    dk = tl.dot(tl.trans(dqk), q, input_precision=PRECISION)
    d_gamma = tl.sum(do * tl.dot(q, tl.trans(h), input_precision=PRECISION), 1)
    # S_next = γ_C S + Uᵀ diag(D) K
    u_dh = tl.dot(u, dh, input_precision=PRECISION)
    dk += u_dh * to_end[:, None]
    d_to_end = tl.sum(u_dh * k, 1)
    d_chunk_decay = tl.sum(tl.sum(dh * h, 1), 0)
    # U = Ũ − W Sᵀ; [Ũ, W] = (I + A)⁻¹ [diag(β) V, diag(β γ) K]: dR = (I + A)⁻ᵀ [dŨ, dW], dA = −dR [Ũ, W]ᵀ (t > i)
    dw = -tl.dot(du, h, input_precision=PRECISION)
    inv_t = tl.trans(inv)
    drv = tl.dot(inv_t, du, input_precision=PRECISION)
    drk = tl.dot(inv_t, dw, input_precision=PRECISION)
    da = -tl.where(strict, tl.dot(drv, tl.trans(known), input_precision=PRECISION)
                   + tl.dot(drk, tl.trans(w), input_precision=PRECISION), 0.)
    dv = beta[:, None] * drv
    drk_k = tl.sum(drk * k, 1)
    dbeta = tl.sum(drv * v, 1) + drk_k * gamma + tl.sum(da * decay * kk, 1)
    dk += drk * (beta * gamma)[:, None]
    d_gamma += beta * drk_k
    # A = diag(β) (Γ ⊙ K Kᵀ) (t > i)
    dkk = da * beta[:, None] * decay
    dk += tl.dot(dkk + tl.trans(dkk), k, input_precision=PRECISION)
    # Every decay is exp of a sum of log α over a segment: log α_j's gradient gathers the segments containing j,
    # d log α_j = Σ_{s≥j>i} dΓ_si Γ_si + Σ_{s≥j} dγ_s γ_s + Σ_{s<j} dD_s D_s + dγ_C γ_C,
    # each sum over terms that all carry α_j (no cancellation: relative precision where α_j is tiny).
    by_decay = (dp * qk + da * beta[:, None] * kk) * decay
    spanning = tl.sum(tl.where(strict, tl.cumsum(by_decay, 0, reverse=True), 0.), 1)
    from_start = d_gamma * gamma
    to_chunk_end = d_to_end * to_end
    dlog_alpha = spanning + tl.sum(tl.where(upto, 0., from_start[None, :]), 1) + from_start \
        + tl.sum(tl.where(strict, to_chunk_end[None, :], 0.), 1) + d_chunk_decay * tl.exp(g_last)

    tl.store(dq_ptr + (i_r * T + t[:, None]) * K + ck[None, :], dq, mask=seq_k)
    tl.store(dk_ptr + (i_r * T + t[:, None]) * K + ck[None, :], dk, mask=seq_k)
    tl.store(dv_ptr + (i_r * T + t[:, None]) * V + cv[None, :], dv, mask=seq_v)
    tl.store(dbeta_ptr + i_r * T + t, dbeta, mask=live)
    tl.store(dlog_alpha_ptr + i_r * T + t, dlog_alpha, mask=live)


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dim ≥ 16


class _DeltaRule(torch.autograd.Function):
    """(o, final state) from q, k [R, T, K], v [R, T, V], log α, β [R, T], the state [R, V, K]: float32, contiguous."""

    @staticmethod
    def forward(ctx, q, k, v, log_alpha, beta, state, precision):
        rows, length, dk = q.shape
        dv = v.shape[-1]
        bt = min(CHUNK, _block(length))
        chunks = triton.cdiv(length, bt)
        bk, bv = _block(dk), _block(dv)
        bvs = min(STATE_BLOCK, bv)
        new = q.new_empty
        g, to_end = new(rows, chunks * bt), new(rows, chunks * bt)
        inv = new(rows, chunks * bt, bt)
        known, u = new(rows, chunks * bt, dv), new(rows, chunks * bt, dv)
        w = new(rows, chunks * bt, dk)
        h = new(rows, chunks, dv, dk)
        out, final = new(rows, length, dv), new(rows, dv, dk)
        sizes = dict(K=dk, V=dv, BT=bt, BK=bk, PRECISION=precision)
        _fwd_intra[(chunks, rows)](k, v, log_alpha, beta, g, to_end, inv, known, w, length, chunks, BV=bv, **sizes)
        _fwd_recurrence[(triton.cdiv(dv, bvs), rows)](k, g, to_end, known, w, state, u, h, final, length, chunks,
                                                      BVS=bvs, **sizes)
        _fwd_output[(chunks, rows)](q, k, log_alpha, g, u, h, out, length, chunks, BV=bv, **sizes)
        ctx.save_for_backward(q, k, v, log_alpha, beta, g, to_end, inv, known, w, u, h)
        ctx.sizes, ctx.blocks = sizes, (chunks, bv, bvs)
        return out, final

    @staticmethod
    def backward(ctx, d_out, d_final):
        q, k, v, log_alpha, beta, g, to_end, inv, known, w, u, h = ctx.saved_tensors
        sizes, (chunks, bv, bvs) = ctx.sizes, ctx.blocks
        rows, length, dk = q.shape
        dv = v.shape[-1]
        d_out = torch.zeros_like(v) if d_out is None else d_out.float().contiguous()
        d_final = q.new_zeros(rows, dv, dk) if d_final is None else d_final.float().contiguous()
        du, dh, d_state = torch.empty_like(u), torch.empty_like(h), torch.empty_like(d_final)
        _bwd_recurrence[(triton.cdiv(dv, bvs), rows)](q, k, log_alpha, g, to_end, w, d_out, d_final, du, dh, d_state,
                                                      length, chunks, BVS=bvs, **sizes)
        dq, dkey, dval = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        d_beta, d_log_alpha = torch.empty_like(beta), torch.empty_like(beta)
        _bwd_intra[(chunks, rows)](q, k, v, log_alpha, beta, g, to_end, inv, known, w, u, h, dh, du, d_out, dq, dkey,
                                   dval, d_beta, d_log_alpha, length, chunks, BV=bv, **sizes)
        return dq, dkey, dval, d_log_alpha, d_beta, d_state, None


def chunked(config, *tensors):
    """(o: [*, T, V], the final state: [*, V, K]) by the Triton kernels; chunked.chunked's contract."""
    q, k, v, gate, beta, state = unpack(config, tensors)
    length = q.shape[-2]
    if length == 0:
        raise ValueError("scan over an empty axis")
    log_alpha = log_decay(config, gate)
    if gate is not None and log_alpha is None:
        return step_loop(config, *tensors)  # a decay ≤ 0 somewhere has no log: the step form computes the same
    lead, dk, dv = q.shape[:-2], q.shape[-1], v.shape[-1]

    def flat(x: torch.Tensor, *shape: int) -> torch.Tensor:
        return x.reshape(-1, *shape).float().contiguous()

    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    q32, k32, v32 = flat(q, length, dk), flat(k, length, dk), flat(v, length, dv)
    log32 = flat(log_alpha, length) if log_alpha is not None else q32.new_zeros(q32.shape[0], length)
    beta32 = flat(beta, length) if beta is not None else q32.new_ones(q32.shape[0], length)
    out, final = _DeltaRule.apply(q32, k32, v32, log32, beta32, flat(state, dv, dk), precision)
    return out.to(v.dtype).reshape(*lead, length, dv), final.to(state.dtype).reshape(*lead, dv, dk)
