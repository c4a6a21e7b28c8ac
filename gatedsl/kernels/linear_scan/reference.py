"""The plain-PyTorch reference of linear_scan: a loop over time, each step as the cell computes it.

S_t = a_t ⊙ S_{t−1} + b_t and each step's readout, exactly the scan it replaces; also what every other
kernel is tested against, and the cheapest one for a few steps (for one alone, one_step.py).
"""

from __future__ import annotations

import string

import torch

from gatedsl.ir.ops import linear_scan_parts


def length(*per_step: torch.Tensor | None) -> int:
    """T: the time axis of the per-step inputs (size 1 where an input is the same at every step)."""
    sizes = [x.shape[0] for x in per_step if x is not None]
    if 0 in sizes:
        raise ValueError("scan over an empty axis")  # as the loop it replaces says
    return max(sizes)


def steps(x: torch.Tensor, T: int) -> list[torch.Tensor]:
    # unbind, not x[t]: indexing each step would make backward build a full-size zero gradient per step.
    return list(x.unbind(0)) if x.shape[0] == T else [x[0]] * T


def outer(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k ⊗ v over the last dims: [..., K] and [..., V] -> [..., K, V] (one product per entry, no sum)."""
    return k.unsqueeze(-1) * v.unsqueeze(-2)


def read(config, state: torch.Tensor, operand: torch.Tensor | None) -> torch.Tensor:
    """One step's emitted value: the state, or the readout of it."""
    if config.readout == "none":
        return state
    if config.readout == "mul":
        return state * operand
    return torch.einsum(config.equation, state, operand)


def read_all(config, states: torch.Tensor, operand: torch.Tensor | None) -> torch.Tensor:
    """The readout of every step at once: `states` and `operand` with a leading time axis."""
    if config.readout == "none":
        return states
    if config.readout == "mul":
        return states * operand
    time = next(c for c in string.ascii_letters if c not in config.equation)
    (left, right), out = config.equation.split("->")[0].split(","), config.equation.split("->")[1]
    return torch.einsum(f"{time}{left},{time}{right}->{time}{out}", states, operand)


def step(config, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    decay, drive, operand, state = linear_scan_parts(config, list(tensors))
    T = length(decay, *drive, operand)
    a = steps(decay.exp() if config.log_decay else decay, T)
    drives = [steps(d, T) for d in drive]
    reads = steps(operand, T) if operand is not None else [None] * T
    outs = []
    for t in (range(T - 1, -1, -1) if config.reverse else range(T)):
        b = outer(drives[0][t], drives[1][t]) if config.drive == "outer" else drives[0][t]
        state = a[t] * state + b
        if not config.last:
            outs.append(read(config, state, reads[t]))
    if config.last:
        return read(config, state, reads[0 if config.reverse else T - 1]), state
    if config.reverse:
        outs.reverse()
    return torch.stack(outs), state
