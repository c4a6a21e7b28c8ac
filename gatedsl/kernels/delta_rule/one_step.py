"""The gated delta rule for one step (T = 1, a decoder's call for one token), in the op's own layout.

    S = α S₀ (I − β k kᵀ) + β v kᵀ = A + β (v − A k) kᵀ with A = α S₀,   o = S q

(reference.py's step). With a time axis of one, q, k and v [*, 1, d] transposed are the columns
[*, d, 1] the matrix products take, and the state's product with q, [*, V, 1], transposed is the
output [*, 1, V]: every layout change is a view; the update is one addcmul.
"""

from __future__ import annotations

import torch

from gatedsl.kernels.delta_rule.reference import decay_of, unpack


def one_step(config, *tensors):
    """(o: [*, 1, V], the state after the step: [*, V, K])."""
    q, k, v, gate, beta, state = unpack(config, tensors)
    if q.shape[-2] != 1:
        raise ValueError(f"the one-step kernel of delta_rule_scan runs one step, got a time axis of {q.shape[-2]}")
    alpha = decay_of(config, gate)
    decayed = state if alpha is None else alpha.unsqueeze(-1) * state  # α [*, 1] -> [*, 1, 1]
    error = v.mT - decayed @ k.mT  # v − A k: [*, V, 1]
    if beta is not None:
        error = beta.unsqueeze(-1) * error
    state = torch.addcmul(decayed, error, k)  # A + (β (v − A k)) kᵀ: [*, V, 1] ⊙ [*, 1, K]
    return (state @ q.mT).mT, state
