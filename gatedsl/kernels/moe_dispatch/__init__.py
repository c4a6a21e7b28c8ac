"""moe_dispatch (passes/route_experts.py): y = base + Σ_i g[..., i] ⊙ E_i(x), dense or routed, chosen by cost.

Kernels, each called as fn(config, x, g, base, *experts) (base None where the mixture starts
the sum; experts the sub-modules at the experts' paths, in the body's order):
  dense       every expert on every token, weighted: the spec's own computation (reference.py)
  sorted      the nonzero gates' (token, expert) pairs in expert order, each expert once on its
              contiguous slice of tokens, scaled and added back (routed.py)
  by_density  where the gate's form does not say how many experts a token uses: counts g's
              nonzeros each call, then runs whichever of the others the cost rule prefers (routed.py)
  triton      `sorted` with its data movement in Triton kernels (CUDA only; triton.py)

The cost rule prices FLOPs, bytes moved and ops launched at rough rates per device, each expert
at the slower of its FLOPs and reading its weights: the dense form runs E experts on N tokens, the
routed one k·N (token, expert) pairs over the experts some token picks, plus gathering the
tokens, scattering the results back and a dozen more ops to sort them. So dense wins where k is
close to E, for cheap experts, and for tiny batches, where each expert's weights are read for a
few tokens either way. Where the number of tokens is symbolic at compile time, the report prices
it at 1024; each call decides again with its own.
"""

from __future__ import annotations

import importlib.util
import math

from gatedsl.ir.ops import moe_experts
from gatedsl.kernels.registry import Context, FusedOp, Kernel, register, register_op

OP = "moe_dispatch"

# (FLOP/s, bytes/s, seconds per op launched): a laptop-class CPU on its cores and a data-centre GPU.
_RATES = {"cpu": (5e10, 1e10, 1.5e-5), "cuda": (5e13, 1.5e12, 8e-6)}
_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
_NOMINAL_TOKENS = 1024  # the N a cost is quoted at where the compile-time shape leaves it open
_OPS_PER_EXPERT = 4  # a typical expert body: two products, an activation, a bias
_ROUTING_OPS = 12  # nonzero, count, gather rows and gates, slice, concatenate, scale, scatter-add, ...


def _sizes(config, shapes) -> tuple[tuple[str, int | None], ...]:
    x, g = shapes[0], shapes[1]
    tokens = math.prod(x[:-1]) if all(d is not None for d in x[:-1]) else None
    (out,) = {e.body.type_of(port) for e in moe_experts(config) for _, port in e.body.outputs}
    width = out.shape[-1] if isinstance(out.shape[-1], int) else None
    return (("E", g[-1]), ("N", tokens), ("k", config.active), ("F", config.flops_per_token), ("D", x[-1]),
            ("D_out", width))


def _key(config) -> str:
    bodies = [",".join(e.body.node(n)["op"] for n in e.body.order()) for e in moe_experts(config)]
    return f"moe:{config.active}:{config.flops_per_token}:{'|'.join(bodies)}"


register_op(FusedOp(OP, sizes=_sizes, key=_key))


def _size(ctx: Context, name: str, default: int) -> int:
    value = ctx.size(name)
    return default if value is None else value


def _read(ctx: Context) -> tuple[int, int, float, int, int, tuple[float, float, float], int]:
    """(E, N, F, D, D_out, rates, bytes per element), with a typical value for a size the context does not give."""
    width = _size(ctx, "D", 256)
    return (_size(ctx, "E", 8), _size(ctx, "N", _NOMINAL_TOKENS), _size(ctx, "F", 4 * width * width), width,
            _size(ctx, "D_out", width), _RATES.get(ctx.device, _RATES["cpu"]), _BYTES.get(ctx.dtype, 4))


def _expert_time(tokens: float, flops: float, rates: tuple[float, float, float], size: int) -> float:
    """One expert on `tokens` rows: its FLOPs, or reading its weights (about F/2 elements for products) if slower."""
    flop_rate, byte_rate, launch = rates
    return max(tokens * flops / flop_rate, flops / 2 * size / byte_rate) + _OPS_PER_EXPERT * launch


def dense_cost(ctx: Context) -> float:
    experts, tokens, flops, _, width_out, rates, size = _read(ctx)
    flop_rate, byte_rate, launch = rates
    weighting = experts * tokens * width_out  # g_i ⊙ E_i(x) and the running sum, per expert
    return experts * _expert_time(tokens, flops, rates, size) + 2 * weighting / flop_rate \
        + 3 * weighting * size / byte_rate + experts * 3 * launch


def routed_cost(ctx: Context, active: float) -> float:
    experts, tokens, flops, width_in, width_out, rates, size = _read(ctx)
    flop_rate, byte_rate, launch = rates
    pairs = active * tokens  # (token, expert) pairs with a nonzero gate
    # The experts some token picks, if tokens pick independently; each runs on its share of the pairs.
    used = max(1.0, experts * (1 - (1 - min(active, experts) / experts) ** tokens))
    moved = tokens * experts * size + pairs * (width_in + 3 * width_out) * size  # scan g; gather; scale; scatter
    return used * _expert_time(pairs / used, flops, rates, size) + (experts - used) * _OPS_PER_EXPERT * launch \
        + moved / byte_rate + (experts + _ROUTING_OPS) * launch


def _active(ctx: Context) -> int | None:
    return ctx.size("k")


def _sorted_cost(ctx: Context) -> float:
    return routed_cost(ctx, _active(ctx))


def _density_cost(ctx: Context) -> float:
    # Until the call, any number of active experts is as likely: the mean of the cheaper form over
    # k = 1..E, plus counting g's nonzeros.
    experts, tokens, _, _, _, (_, byte_rate, launch), size = _read(ctx)
    mean = sum(min(dense_cost(ctx), routed_cost(ctx, k)) for k in range(1, experts + 1)) / experts
    return mean + tokens * experts * size / byte_rate + 2 * launch


def _static_k(ctx: Context) -> str | None:
    return None if _active(ctx) is not None else "the gate's form does not say how many experts a token uses"


def _unknown_k(ctx: Context) -> str | None:
    k = _active(ctx)
    return None if k is None else f"the gate's form fixes k = {k} experts per token: the cost rule decides once"


def _triton(ctx: Context) -> str | None:
    if ctx.device != "cuda":
        return f"Triton kernels run on CUDA, not {ctx.device}"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return _static_k(ctx)


def _triton_cost(ctx: Context) -> float:
    # The same work as `sorted`; the gather, the scale and the scatter-add are two launches instead of four.
    launch = _RATES.get(ctx.device, _RATES["cpu"])[2]
    return _sorted_cost(ctx) - 2 * launch


register(Kernel(OP, "dense", f"{__name__}.reference:dense", applies=lambda ctx: None, cost=dense_cost,
                why="E·N·F FLOPs: every expert on every token, weighted; few ops launched", plain=True))
register(Kernel(OP, "sorted", f"{__name__}.routed:sorted_experts", applies=_static_k, cost=_sorted_cost,
                why="k·N·F FLOPs, each expert on its tokens, plus sorting them, gathering rows and scattering back"))
register(Kernel(OP, "by_density", f"{__name__}.routed:by_density", applies=_unknown_k, cost=_density_cost,
                why="counts g's nonzeros each call, then the cheaper of dense and sorted for that many; "
                    "priced at the mean over k = 1..E"))
register(Kernel(OP, "triton", f"{__name__}.triton:sorted_experts", applies=_triton, cost=_triton_cost,
                why="sorted, with the gather and the weighted scatter-add in Triton (deterministic, no atomics)"))
