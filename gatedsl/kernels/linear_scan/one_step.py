"""linear_scan for one step (T = 1, a decoder's call for one token): S = a ⊙ S₀ + b and its readout, on the tensors given.

The step loop's arithmetic (reference.py) without the loop's bookkeeping: each input's time axis of one
is indexed away (a view), the drive k ⊗ v is added by one addcmul, a readout that contracts one of the
state's last two dims with a vector (o = q S over the key dim, y = S C over the state dim) is one matrix
product instead of an einsum, and the emitted value gets its time axis back as a view, not a stack.
"""

from __future__ import annotations

import functools

import torch

from gatedsl.ir.ops import linear_scan_parts
from gatedsl.kernels.linear_scan.reference import length, read


@functools.lru_cache(maxsize=64)
def vector_side(equation: str) -> str | None:
    """Which side a vector multiplies the state on in einsum(equation, S, x), as a matrix product, or None.

    "left" where the equation is ...ab,...a->...b (o = x S), "right" where it is ...ab,...b->...a (o = S x);
    the ellipses broadcast right-aligned, as a matrix product's batch dims do."""
    inputs, _, out = equation.replace(" ", "").partition("->")
    state, _, vector = inputs.partition(",")
    if not (state.startswith("...") and vector.startswith("...") and out.startswith("...")):
        return None
    state, vector, out = state[3:], vector[3:], out[3:]
    if len(state) != 2 or len(vector) != 1 or len(out) != 1 or state[0] == state[1]:
        return None
    if vector == state[0] and out == state[1]:
        return "left"
    if vector == state[1] and out == state[0]:
        return "right"
    return None


def emit(config, state: torch.Tensor, operand: torch.Tensor | None) -> torch.Tensor:
    """The step's emitted value: `read`, with a matrix-vector readout as one matrix product."""
    side = vector_side(config.equation) if config.readout == "einsum" else None
    if side == "left":
        return (operand.unsqueeze(-2) @ state).squeeze(-2)
    if side == "right":
        return (state @ operand.unsqueeze(-1)).squeeze(-1)
    return read(config, state, operand)


def one_step(config, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    decay, drive, operand, state = linear_scan_parts(config, list(tensors))
    T = length(decay, *drive, operand)
    if T != 1:
        raise ValueError(f"the one-step kernel of linear_scan runs one step, got a time axis of {T}")
    a = decay[0].exp() if config.log_decay else decay[0]
    if config.drive == "outer":
        state = torch.addcmul(a * state, drive[0][0].unsqueeze(-1), drive[1][0].unsqueeze(-2))
    else:
        state = torch.addcmul(drive[0][0], a, state)
    out = emit(config, state, operand[0] if operand is not None else None)
    return (out if config.last else out.unsqueeze(0)), state
