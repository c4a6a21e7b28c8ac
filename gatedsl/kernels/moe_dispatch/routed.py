"""Routed moe_dispatch: each expert runs once, on the contiguous slice of tokens whose gate for it is nonzero.

The nonzero entries of the gate g [N, E] are listed expert by expert (a scan of gᵀ, which gives
the order a stable sort of the token-major list by expert gives: tokens ascending within each
expert); the tokens are gathered in that order, each expert runs on its slice, the results are
scaled by their gate values and added back to their tokens. Every expert runs, on no rows where
no token chose it, so its weights get a zero gradient as in the dense form rather than none.

It equals the dense form up to the order of float additions (each token's terms are added in
expert order either way, here onto the base in one scatter). Its gradient with respect to g is
the dense one on g's nonzero entries and zero on the others, where the dense form has
⟨∂L/∂y, E_i(x)⟩: passes/route_experts.py routes only gates whose zero entries have zero
derivatives, so every gradient before g is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gatedsl.kernels.moe_dispatch import reference
from gatedsl.kernels.registry import FUSED_OPS, choose, kernels_for, load, runtime_context


@dataclass
class Routing:
    """The (token, expert) pairs with a nonzero gate, in expert order, and how many each expert has."""

    tokens: torch.Tensor  # [M] int64
    experts: torch.Tensor  # [M] int64, ascending
    counts: list[int]  # per expert (gate column)
    rows: int  # N, the number of tokens
    _by_token: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @staticmethod
    def of(gate: torch.Tensor) -> "Routing":
        experts, tokens = gate.detach().t().nonzero(as_tuple=True)
        counts = torch.bincount(experts, minlength=gate.shape[1]).tolist()
        return Routing(tokens, experts, counts, gate.shape[0])

    def by_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, offsets): order[offsets[n]:offsets[n + 1]] are the positions of token n's pairs, in expert order."""
        if self._by_token is None:
            order = torch.argsort(self.tokens, stable=True)
            offsets = torch.zeros(self.rows + 1, dtype=torch.long, device=self.tokens.device)
            offsets[1:] = torch.cumsum(torch.bincount(self.tokens, minlength=self.rows), 0)
            self._by_token = (order, offsets)
        return self._by_token


def _gather(rows: torch.Tensor, route: Routing) -> torch.Tensor:
    return reference.gather_rows(rows, route.tokens)


def _combine(ys: torch.Tensor, weights: torch.Tensor, route: Routing, base: torch.Tensor | None) -> torch.Tensor:
    if base is None:
        base = ys.new_zeros(route.rows, ys.shape[-1])
    return reference.combine(ys, weights, route.tokens, base)


def run_routed(config, x, g, base, experts, gather=_gather, combine=_combine):
    """The routed mixture, with its data movement `gather(rows, route)` and `combine(ys, weights, route, base)`."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])
    gate = g.reshape(-1, g.shape[-1])
    route = Routing.of(gate)
    by_column = dict(zip(config.columns, experts))
    xs = gather(rows, route)
    outs, start = [], 0
    for column, count in enumerate(route.counts):
        (out,) = by_column[column](xs[start:start + count])
        outs.append(out)
        start += count
    ys = torch.cat(outs)
    weights = gate[route.tokens, route.experts]
    y = combine(ys, weights, route, base.reshape(-1, base.shape[-1]) if base is not None else None)
    return y.reshape(*lead, y.shape[-1])


def sorted_experts(config, x, g, base, *experts):
    """y = base + Σ_i g[..., i] ⊙ E_i(x), each expert on its own tokens (torch's index_select and index_add)."""
    return run_routed(config, x, g, base, experts)


_CHOSEN: dict = {}


def by_density(config, x, g, base, *experts):
    """Counts the tokens' active experts in g, then runs the kernel the cost rule prefers for that many."""
    tokens = max(1, g.numel() // g.shape[-1])
    active = max(1, -(-int(torch.count_nonzero(g.detach())) // tokens))  # the mean per token, rounded up
    tensors = (x, g, base)
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else () for t in tensors]
    ctx = runtime_context(tensors, FUSED_OPS["moe_dispatch"].sizes(config.model_copy(update={"active": active}), shapes))
    fn = _CHOSEN.get(ctx)
    if fn is None:
        name = choose("moe_dispatch", ctx).kernel
        fn = _CHOSEN[ctx] = load(next(k for k in kernels_for("moe_dispatch") if k.name == name))
    return fn(config, x, g, base, *experts)
