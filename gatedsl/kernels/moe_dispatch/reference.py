"""The plain-PyTorch forms every moe_dispatch kernel must equal: the dense mixture, and the data movement of routing."""

from __future__ import annotations

import torch


def dense(config, x, g, base, *experts):
    """y = base + Σ_i g[..., i] ⊙ E_i(x), every expert on every token, summed in the spec's order: its own computation."""
    y = base
    for column, expert in zip(config.columns, experts):
        (out,) = expert(x)
        term = g[..., column:column + 1] * out
        y = term if y is None else y + term
    return y


def gather_rows(x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """xs[j] = x[tokens[j]]: the tokens in expert order."""
    return x.index_select(0, tokens)


def combine(ys: torch.Tensor, weights: torch.Tensor, tokens: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """y[n] = base[n] + Σ_{j: tokens[j] = n} weights[j] · ys[j]: each result scaled by its gate and added to its token."""
    return base.index_add(0, tokens, ys * weights.unsqueeze(-1))
