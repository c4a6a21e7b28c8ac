"""The gated delta rule step by step, in plain PyTorch: the reference every other kernel must equal, and the plain kernel.

Per row of the leading dims, with the state S: [V, K] mapping keys to values,
    S_t = α_t S_{t−1} (I − β_t k_t k_tᵀ) + β_t v_t k_tᵀ,   o_t = S_t q_t
(Yang, Kautz & Hatamizadeh 2025; α_t = 1 is DeltaNet, Yang et al. 2024). It is the fastest form
for a few steps, where the chunked form's set-up costs more than it saves (for one alone, one_step.py).
"""

from __future__ import annotations

import torch


def unpack(config, tensors):
    """(q, k, v, gate, beta, state) from a delta_rule_scan's inputs; gate and beta are None where the cell has none.

    q, k: [*, T, K]; v: [*, T, V]; gate, beta: [*, T] (gate is α, or log α where config.gate == "log");
    state: [*, V, K], the state before the first step."""
    q, k, v, *rest = tensors
    gate = rest.pop(0) if config.gate != "none" else None
    beta = rest.pop(0) if config.beta else None
    (state,) = rest
    return q, k, v, gate, beta, state


def decay_of(config, gate):
    """α_t, or None where the cell has no decay gate."""
    if gate is None:
        return None
    return gate.exp() if config.gate == "log" else gate


def step_loop(config, *tensors):
    """(o: [*, T, V], the final state: [*, V, K]), one step at a time."""
    q, k, v, gate, beta, state = unpack(config, tensors)
    if q.shape[-2] == 0:
        raise ValueError("scan over an empty axis")
    alpha = decay_of(config, gate)
    # Slice each sequence once: unbind's backward is one stack, where a select per step would
    # build a full-size zero gradient per step (quadratic in the length).
    qs, ks, vs = q.unbind(-2), k.unbind(-2), v.unbind(-2)
    alphas = alpha.unbind(-1) if alpha is not None else None
    betas = beta.unbind(-1) if beta is not None else None
    outs = []
    for t in range(q.shape[-2]):
        k_t = ks[t]
        recalled = torch.einsum("...vk,...k->...v", state, k_t)  # S_{t−1} k_t
        error = vs[t] - recalled if alphas is None else vs[t] - alphas[t].unsqueeze(-1) * recalled
        if betas is not None:
            error = betas[t].unsqueeze(-1) * error
        # S_t = α_t S_{t−1} + β_t (v_t − α_t S_{t−1} k_t) k_tᵀ, the same update written once
        decayed = state if alphas is None else alphas[t][..., None, None] * state
        state = decayed + error.unsqueeze(-1) * k_t.unsqueeze(-2)
        outs.append(torch.einsum("...vk,...k->...v", state, qs[t]))
    return torch.stack(outs, dim=-2), state
