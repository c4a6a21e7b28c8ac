"""linear_scan as a two-level scan: about 2√T sequential steps instead of T, with products of decays only.

The T steps are cut into n blocks of C ≈ √T. First every block runs its own recurrence from a zero
state, all blocks at once (C steps over tensors n times larger), keeping each step's local state
L_t and the product P_t of the block's decays so far; then the blocks' start states follow one
another (n steps): H_{j+1} = P_end,j ⊙ H_j + L_end,j; finally S_t = L_t + P_t ⊙ H_block(t). No log,
exp or division is taken, so any decay (zero, negative, above one) is exact, and a_t ~ 1e-30 only
underflows where the step loop's own products do. Gradients are autograd's through these ops.
"""

from __future__ import annotations

import math

import torch

from gatedsl.ir.ops import linear_scan_parts
from gatedsl.kernels.linear_scan.reference import length, outer, read, read_all


def block_size(T: int) -> int:
    return max(1, math.ceil(math.sqrt(T)))  # C + T/C sequential steps is least at C = √T


def two_level(a: torch.Tensor, b: torch.Tensor, initial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every S_t = a_t ⊙ S_{t−1} + b_t (t along dim 0 of a and b; a broadcasts against the state), and the last."""
    T = b.shape[0]
    a = a.expand(T, *a.shape[1:])
    C = block_size(T)
    n = math.ceil(T / C)
    pad = n * C - T
    if pad:  # steps past the end that leave the state as it is: a = 1, b = 0
        a = torch.cat([a, a.new_ones((pad, *a.shape[1:]))])
        b = torch.cat([b, b.new_zeros((pad, *b.shape[1:]))])
    a = a.reshape(n, C, *a.shape[1:])
    b = b.reshape(n, C, *b.shape[1:])
    local, decayed = torch.zeros_like(b[:, 0]), torch.ones_like(a[:, 0])
    locals_, products = [], []
    for a_j, b_j in zip(a.unbind(1), b.unbind(1)):  # within every block at once
        local = a_j * local + b_j
        decayed = a_j * decayed
        locals_.append(local)
        products.append(decayed)
    local, decayed = torch.stack(locals_, 1), torch.stack(products, 1)
    state, starts = initial, []
    for block_decay, block_local in zip(decayed[:, -1].unbind(0), local[:, -1].unbind(0)):  # across blocks
        starts.append(state)
        state = block_decay * state + block_local
    states = local + decayed * torch.stack(starts).unsqueeze(1)
    return states.reshape(n * C, *states.shape[2:])[:T], state


def blocked(config, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    decay, drive, operand, state = linear_scan_parts(config, list(tensors))
    T = length(decay, *drive, operand)
    a = decay.exp() if config.log_decay else decay
    b = outer(*drive) if config.drive == "outer" else drive[0]
    b = b.expand(T, *state.shape)
    if config.reverse:
        a, b = a.flip(0), b.flip(0)
        operand = operand.flip(0) if operand is not None else None
    states, final = two_level(a, b, state)
    if config.last:
        return read(config, final, operand[-1] if operand is not None else None), final
    out = read_all(config, states, operand)
    return (out.flip(0) if config.reverse else out), final
