"""The gated delta rule in chunks (the WY representation, Yang et al. 2024), in plain PyTorch: matrix products within each chunk, a recurrence over chunks.

Within a chunk of C steps that starts from the state S, write one step as
    S_t = α_t S_{t−1} + u_t k_tᵀ,   u_t = β_t (v_t − α_t S_{t−1} k_t),
and let g_t = Σ_{j≤t} log α_j (counted from the chunk's start), γ_t = e^{g_t}, Γ_{ti} = e^{g_t − g_i}.
Unrolled, S_t = γ_t S + Σ_{i≤t} Γ_{ti} u_i k_iᵀ, so the chunk's u_t solve one unit lower-triangular system,
    (I + A) U = diag(β) (V − diag(γ) K Sᵀ),   A = tril(diag(β) (Γ ⊙ K Kᵀ), −1),
that is U = Ũ − W Sᵀ with Ũ = T V, W = T diag(γ) K and the UT transform T = (I + A)⁻¹ diag(β): one
triangular solve for every chunk at once, before any state is known. Then
    O = diag(γ) Q Sᵀ + (Γ ⊙ Q Kᵀ)_{t≥i} U,   S_next = γ_C S + Uᵀ diag(e^{g_C − g}) K,
and only U and S_next run chunk after chunk. The decays stay in log space within a chunk: every
exponent is a sum of log α over a segment of the chunk (Γ_ti over (i, t], masked before the exp),
which is ≤ 0 for α ≤ 1, so no strength of decay overflows. Autograd runs through these plain torch ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatedsl.kernels.delta_rule.reference import step_loop, unpack

CHUNK = 64  # steps per chunk: the intra-chunk products are C×C, the recurrence runs T/C times


def log_decay(config, gate):
    """log α_t, or None where the cell has no decay gate; None as well where some α_t ≤ 0 (no logarithm)."""
    if gate is None or config.gate == "log":
        return gate
    if not bool((gate > 0).all()):
        return None
    return gate.log()


def chunked(config, *tensors):
    """(o: [*, T, V], the final state: [*, V, K]), chunk by chunk."""
    q, k, v, gate, beta, state = unpack(config, tensors)
    length = q.shape[-2]
    if length == 0:
        raise ValueError("scan over an empty axis")
    log_alpha = log_decay(config, gate)
    if gate is not None and log_alpha is None:
        return step_loop(config, *tensors)  # a decay ≤ 0 somewhere has no log: the step form computes the same
    lead, dk, dv = q.shape[:-2], q.shape[-1], v.shape[-1]
    size = min(CHUNK, length)
    chunks = -(-length // size)
    pad = chunks * size - length

    def blocks(x: torch.Tensor) -> torch.Tensor:
        """[*, T, d] -> [rows, chunks, C, d]; the steps appended are zeros (k = 0, β = 0, log α = 0: S stays)."""
        x = x.reshape(-1, length, x.shape[-1])
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(x.shape[0], chunks, size, x.shape[-1])

    qc, kc, vc = blocks(q), blocks(k), blocks(v)
    rows = qc.shape[0]
    logs = blocks(log_alpha.unsqueeze(-1)) if log_alpha is not None else qc.new_zeros(rows, chunks, size, 1)
    lower = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
    # Γ_ti = exp(Σ_{i<j≤t} log α_j), each a sum over its own segment rather than a difference of running sums:
    # its gradient then reaches log α_j only through the segments that contain j, so d log α_j keeps its
    # relative precision where α_j is tiny (a difference of sums would cancel to an absolute error).
    segments = logs.expand(rows, chunks, size, size).masked_fill(~lower.tril(-1), 0).cumsum(-2)
    decay = segments.masked_fill(~lower, float("-inf")).exp()  # Γ, zero above the diagonal
    gamma = logs.squeeze(-1).cumsum(-1).exp()  # γ_t = exp(Σ_{j≤t} log α_j)
    a = (kc @ kc.transpose(-1, -2)) * decay  # the solve reads its strictly lower part only
    rhs = torch.cat([vc, gamma.unsqueeze(-1) * kc], dim=-1)
    if beta is not None:
        betac = blocks(beta.unsqueeze(-1))  # [rows, chunks, C, 1]
        a, rhs = betac * a, betac * rhs
    known, w = torch.linalg.solve_triangular(a, rhs, upper=False, unitriangular=True).split([dv, dk], dim=-1)
    k_to_end = (decay[..., -1, :].unsqueeze(-1) * kc).transpose(-1, -2)  # (diag(Γ_Ci) K)ᵀ
    # The recurrence reads one chunk of every row per step: chunk-major copies make each step's operands
    # contiguous, and unbind slices them once (its backward is one stack, where indexing chunk c per step
    # would build a full-size zero gradient per step).
    known_c, w_c, k_to_end_c = (x.transpose(0, 1).contiguous().unbind(0) for x in (known, w, k_to_end))
    chunk_decay = gamma[..., -1].transpose(0, 1)[..., None, None].unbind(0)  # γ_C of each chunk: [rows, 1, 1]
    state_t = state.reshape(rows, dv, dk).transpose(-1, -2)  # Sᵀ: [rows, K, V]
    entering, us = [], []
    for c in range(chunks):
        entering.append(state_t)
        us.append(torch.baddbmm(known_c[c], w_c[c], state_t, alpha=-1))  # U = Ũ − W Sᵀ
        state_t = torch.baddbmm(chunk_decay[c] * state_t, k_to_end_c[c], us[-1])
    scores = (qc @ kc.transpose(-1, -2)) * decay  # (Γ ⊙ Q Kᵀ) for t ≥ i
    out = (gamma.unsqueeze(-1) * qc) @ torch.stack(entering, dim=1) + scores @ torch.stack(us, dim=1)
    out = out.reshape(rows, chunks * size, dv)[:, :length]
    return out.reshape(*lead, length, dv), state_t.transpose(-1, -2).reshape(*lead, dv, dk)
