"""projection_group (passes/fuse_projections.py): projections of one tensor, y_j = x W_jᵀ + b_j (+ addend_j), and its two kernels.

Kernels, each called as fn(config, x, *weights, *biases[, addend]) (ProjectionGroupAttrs says
which inputs there are):
  separate    one F.linear per projection, as the unfused graph runs them (reference.py)
  concat      one product on the weights concatenated (and, with an addend, that added by the
              same op, addmm), then a split into each projection's columns (concat.py)
  transposed  concat on the packed weights' transposed copy, where no gradient flows (concat.py)

The cost rule prices ops launched, bytes moved and FLOPs at rough rates per device. The
concatenated form pays for copying the weights once per call (nothing where they come packed,
built once before a loop) and saves reading x once per further projection, a launch per
projection and, in training, summing the per-projection gradients of x. So it wins for few
tokens (a scan's step, a short sequence) and loses where the weights outweigh the activations
(a wide MLP on few thousand tokens); the FLOPs are the same either way. On the CPU a product of
few rows runs about 1.35 times faster with a row-major right operand (the weights transposed,
[in, out]) than with F.linear's [out, in] (measured: 32 x 256 by 256 x 768, one thread, 65 µs
against 87); backward then needs the other layout, so the transposed kernel serves inference
and the packed weights come in both layouts.
"""

from __future__ import annotations

import math

from gatedsl.kernels.registry import Context, FusedOp, Kernel, register, register_op

OP = "projection_group"

# (FLOP/s, bytes/s, seconds per op launched, seconds per autograd node): a server CPU core (measured on the bench
# machine: 1.3-1.6e11 FLOP/s in float32 products, ~3 µs a small op), and a data-centre GPU.
_RATES = {"cpu": (1.5e11, 1e10, 3e-6, 3e-6), "cuda": (5e13, 1.5e12, 8e-6, 4e-6)}
_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
# The rows a cost is quoted at where the compile-time shape leaves them open: a sequence's tokens, or the
# batch of one step of a scan (where the weights come packed); each call decides with its own.
_NOMINAL_TOKENS = 1024
_NOMINAL_STEP_ROWS = 64
_FEW_ROWS = 512  # up to here a CPU product with the right operand transposed is slower ...
_TRANSPOSED_PENALTY = 1.35  # ... by this factor


def _sizes(config, shapes) -> tuple[tuple[str, int | None], ...]:
    lead = shapes[0][:-1]
    tokens = math.prod(lead) if all(d is not None for d in lead) else None
    return (("tokens", tokens), ("in", config.in_features), ("out", sum(config.out_features)),
            ("projections", len(config.out_features)), ("biases", sum(config.biases)),
            ("packed", int(config.packed)), ("transposed", int(config.transposed)), ("addend", int(config.addend)))


def _key(config) -> str:
    return ":".join(str(v) for v in (config.in_features, config.out_features, config.biases, config.packed,
                                      config.transposed, config.addend))


register_op(FusedOp(OP, sizes=_sizes, key=_key))


def _common(ctx: Context) -> tuple[int, int, int, int, int, bool, bool, int, tuple[float, float, float, float]]:
    tokens = ctx.size("tokens")
    nominal = _NOMINAL_STEP_ROWS if ctx.size("packed") else _NOMINAL_TOKENS
    return (nominal if tokens is None else tokens, ctx.size("in") or 1, ctx.size("out") or 1,
            ctx.size("projections") or 1, ctx.size("biases") or 0, bool(ctx.size("packed")),
            bool(ctx.size("addend")), _BYTES.get(ctx.dtype, 4), _RATES.get(ctx.device, _RATES["cuda"]))


def _product(ctx: Context, tokens: int, width_in: int, width_out: int, row_major: bool = False) -> float:
    """Seconds for the products' FLOPs."""
    flops = _RATES.get(ctx.device, _RATES["cuda"])[0]
    penalty = _TRANSPOSED_PENALTY if ctx.device == "cpu" and tokens <= _FEW_ROWS and not row_major else 1.0
    return 2 * tokens * width_in * width_out / flops * penalty


def concat_cost(ctx: Context) -> float:
    tokens, width_in, width_out, n, biases, packed, addend, size, (_, bandwidth, launch, node) = _common(ctx)
    ops = 2  # the product (addmm with an addend), the split
    moved = tokens * (width_in + width_out * (1 + addend))  # x once, y (and the addend)
    if not packed:
        ops += 1 + (1 + n - biases if biases else 0)  # concatenating the weights; the biases, zeros where none
        moved += 2 * width_out * (width_in + 1)  # the copy, read and written, every call
    time = ops * launch + moved * size / bandwidth + _product(ctx, tokens, width_in, width_out)
    if ctx.training:  # backward: the same product's gradients; the concatenation's is views of them
        time += 2 * time + ops * node
    return time


def separate_cost(ctx: Context) -> float:
    tokens, width_in, width_out, n, biases, packed, addend, size, (_, bandwidth, launch, node) = _common(ctx)
    ops = n * (1 + addend) + (1 + (biases > 0) + addend if packed else addend)  # products, adds; splits
    moved = tokens * (n * width_in + width_out * (1 + 2 * addend))  # x once per projection
    time = ops * launch + moved * size / bandwidth + _product(ctx, tokens, width_in, width_out)
    if ctx.training:  # backward: as forward twice, and x's gradient summed over the projections
        time += 2 * time + ops * node + (n - 1) * (launch + 3 * tokens * width_in * size / bandwidth)
    return time


def transposed_cost(ctx: Context) -> float:
    tokens, width_in, width_out, _, biases, _, addend, size, (_, bandwidth, launch, _) = _common(ctx)
    moved = tokens * (width_in + width_out * (1 + addend))
    ops = 2 + (addend and biases > 0)  # the product (addmm), the split; the bias added to an addend
    return ops * launch + moved * size / bandwidth + _product(ctx, tokens, width_in, width_out, row_major=True)


def _transposed_applies(ctx: Context) -> str | None:
    if not ctx.size("transposed"):
        return "the weights do not come transposed (only packed weights, before a loop, do)"
    if ctx.training:
        return "gradients flow: backward would read the transposed weights the slow way round"
    return None


register(Kernel(OP, "separate", f"{__name__}.reference:separate", applies=lambda ctx: None, cost=separate_cost,
                plain=True, why="one product per projection: x read once each, a launch each, x's gradient summed"))
register(Kernel(OP, "concat", f"{__name__}.concat:concat", applies=lambda ctx: None, cost=concat_cost,
                why="one product on the concatenated weights, then a split: the weights copied once per call "
                    "(not where packed before a loop), x read once"))
register(Kernel(OP, "transposed", f"{__name__}.concat:transposed", applies=_transposed_applies, cost=transposed_cost,
                why="one product on the packed weights' transposed copy, row-major: faster for few rows on the CPU"))
