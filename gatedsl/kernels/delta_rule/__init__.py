"""delta_rule_scan (passes/chunk_delta_rule.py): the gated delta rule over a sequence, and its kernels.

- loop (reference.py): step by step, as the cell computes it; the plain kernel, and the cheapest for a
  few steps, where the chunked form's fixed work is not paid back.
- one_step (one_step.py): one step (T = 1, a decoder's call for one token) in the op's own layout: the
  loop's arithmetic in 7 ops, every layout change a view.
- chunked (chunked.py): the WY representation in chunks of 64 steps: the UT transform by one
  triangular solve and attention-like products within chunks, a recurrence across chunks, decays in
  log space; autograd through plain torch ops.
- triton (triton.py): the chunked form as Triton kernels, forward and backward, on CUDA.

The cost rule estimates seconds: per torch op a fixed dispatch cost (autograd's backward roughly
doubles the work), plus flops at the rate the op's size allows (small matrix-vector products run
far below the rate of a chunk's matrix products).
"""

from __future__ import annotations

import math

from gatedsl.kernels.registry import Context, FusedOp, Kernel, one_step_only, register, register_op

OP = "delta_rule_scan"
CHUNK = 64  # chunked.CHUNK, here without importing torch
NOMINAL_T = 2048  # where T is symbolic at compile time, the report ranks the kernels for this length


def _sizes(config, shapes) -> tuple[tuple[str, int | None], ...]:
    q, v = shapes[0], shapes[2]
    rows = None if None in q[:-2] else math.prod(q[:-2])
    return (("T", q[-2]), ("K", q[-1]), ("V", v[-1]), ("rows", rows))


def _key(config) -> str:
    return repr((config.gate, config.beta))  # the cell's body is never run: it plays no part


register_op(FusedOp(OP, sizes=_sizes, key=_key, time="T"))

# (device) -> seconds per dispatched op, flop/s of a step's matrix-vector products, flop/s of a chunk's
# matrix products: eager PyTorch on this project's 2-core CPU (measured: the two forms cross at T ≈ 3 for
# 8 rows of 64 x 64 states, forward and backward), and on a CUDA GPU (launch-bound ops).
RATES = {"cpu": (10e-6, 1e10, 2e10), "cuda": (10e-6, 1e11, 1e13)}


def _shape(ctx: Context) -> tuple[int, int, int, int]:
    T = ctx.size("T") or NOMINAL_T
    return T, ctx.size("K") or 64, ctx.size("V") or 64, ctx.size("rows") or 8


def _train(ctx: Context) -> float:
    return 3.0 if ctx.training else 1.0


def _loop_cost(ctx: Context) -> float:
    T, K, V, rows = _shape(ctx)
    dispatch, small, _ = RATES.get(ctx.device, RATES["cpu"])
    return _train(ctx) * T * (8 * dispatch + 8 * rows * K * V / small)


def _one_step_cost(ctx: Context) -> float:
    _, K, V, rows = _shape(ctx)
    dispatch, small, _ = RATES.get(ctx.device, RATES["cpu"])
    # 7 ops where the loop's step runs about 15 (it also slices every input and stacks the outputs), the
    # same flops: measured at about half a step of the loop (benchmarks/step_kernels.py), so half its 8.
    return _train(ctx) * (4 * dispatch + 8 * rows * K * V / small)


def _chunk_flops(T: int, K: int, V: int, rows: int) -> float:
    C = min(CHUNK, T)
    # Per step: K Kᵀ and Q Kᵀ, the triangular solve and the scores' products (each ~C (K + V)), and
    # three [K, V] products with the state.
    return rows * T * (C * (4 * K + 3 * V) + 6 * K * V)


def _chunked_cost(ctx: Context) -> float:
    T, K, V, rows = _shape(ctx)
    dispatch, small, big = RATES.get(ctx.device, RATES["cpu"])
    chunks = math.ceil(T / CHUNK)
    # Its recurrence across chunks does a step's work on the state per chunk, matrices times vectors at a
    # step's rate: all there is to a call of a few steps, however few its flops.
    work = max(_chunk_flops(T, K, V, rows) / big, chunks * 8 * rows * K * V / small)
    return _train(ctx) * ((25 + 4 * chunks) * dispatch + work)


TRITON_MAX_DIM = 128  # a program holds a [V, K] state tile and [C, K], [C, V] tiles in registers


def _triton_applies(ctx: Context) -> str | None:
    if ctx.device != "cuda":
        return "Triton kernels run on CUDA only"
    if ctx.dtype not in ("float32", "float16", "bfloat16"):
        return f"no Triton kernel for {ctx.dtype}"
    K, V = ctx.size("K"), ctx.size("V")
    if K is None or V is None or K > TRITON_MAX_DIM or V > TRITON_MAX_DIM:
        return f"K and V must be known and at most {TRITON_MAX_DIM} (a state tile per program)"
    return None


def _triton_cost(ctx: Context) -> float:
    T, K, V, rows = _shape(ctx)
    dispatch, _, big = RATES["cuda"]
    return _train(ctx) * (10 * dispatch + _chunk_flops(T, K, V, rows) / (4 * big))


_SYMBOLIC = f"; where T is symbolic at compile time, ranked for T = {NOMINAL_T}: each call decides by its own T"
register(Kernel(OP, "loop", "gatedsl.kernels.delta_rule.reference:step_loop", applies=lambda ctx: None,
                cost=_loop_cost, plain=True,
                why="T steps of ~8 small ops (matrix-vector products); the cheapest for a few steps (for one: "
                    "one_step)" + _SYMBOLIC))
register(Kernel(OP, "one_step", "gatedsl.kernels.delta_rule.one_step:one_step", applies=one_step_only,
                cost=_one_step_cost,
                why="the recurrent step S = α S (I − β k kᵀ) + β v kᵀ, o = S q on the tensors given: O(K·V) per "
                    "token, no set-up to pay back"))
register(Kernel(OP, "chunked", "gatedsl.kernels.delta_rule.chunked:chunked", applies=lambda ctx: None,
                cost=_chunked_cost,
                why=f"~25 ops plus 4 per chunk of {CHUNK} steps, as matrix products" + _SYMBOLIC))
register(Kernel(OP, "triton", "gatedsl.kernels.delta_rule.triton:chunked", applies=_triton_applies,
                cost=_triton_cost,
                why="the chunked form in 3 Triton kernels forward and 2 backward, tensor-core products"))
