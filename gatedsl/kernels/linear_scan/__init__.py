"""linear_scan (passes/parallel_scan.py): S_t = a_t ⊙ S_{t−1} + b_t read out every step, and its kernels.

- step (reference.py): the loop over time, each step as the cell computes it; the plain kernel, and
  the cheapest for a few steps, where the others' fixed work is not paid back.
- one_step (one_step.py): one step (T = 1, a decoder's call for one token): the recurrent update on the
  tensors given, without the loop's lists and stack, its readout one matrix product.
- chunked (chunked.py): gated linear attention's chunk-parallel form (a drive k_tᵀ v_t read out as
  o_t = q_t S_t, a scalar or per-key-dim decay proven positive, given as its log): matrix products
  within chunks, weighted by decays in log space, and a recurrence across chunks.
- blocked (blocked.py): any element-wise linear scan, any decay: a two-level scan of about 2√T steps
  that multiplies decays and never takes their log.
- triton (triton.py): the chunked form as Triton kernels, forward and backward, on CUDA.
"""

from __future__ import annotations

import math

from gatedsl.kernels.registry import Context, FusedOp, Kernel, one_step_only, register, register_op

OP = "linear_scan"


def chunk_size(T: int) -> int:
    """The chunked form's chunk: 64 steps (a power of 2, as its halving needs), or T's next power of 2 below that."""
    return min(64, 1 << max(0, T - 1).bit_length())


def _sizes(config, shapes) -> tuple[tuple[str, int | None], ...]:
    *per_step, state = shapes
    times = [s[0] for s in per_step]
    T = None if None in times else max(times)
    numel = None if None in state else math.prod(state)
    decay = shapes[0]
    gla = (config.drive == "outer" and config.key_readout and config.log_decay and decay[-1] == 1)
    width = decay[-2] if gla else None
    return (("T", T), ("state", numel), ("K", state[-2] if gla else None), ("V", state[-1] if gla else None),
            ("decay_width", width), ("gla", int(gla)))


def _key(config) -> str:
    return repr((config.log_decay, config.drive, config.readout, config.equation, config.key_readout,
                 config.reverse, config.last))


register_op(FusedOp(OP, sizes=_sizes, key=_key, time="T"))

# The cost rule: seconds as measured on the CPU this project is benchmarked on (one thread; process
# time over T = 1..2048 and states of 256 to 16384 elements), forward and training (forward, backward):
#   step     T · (3 µs + 1.5 ns · state)            T · (12 µs + 12 ns · state)
#   blocked  (C + n) · 6 µs + 8 ns · T · state       3 × that              (C ≈ √T steps per block, n blocks)
#   chunked  0.14 ms + 0.27 ns · T · state           0.8 ms + 0.95 ns · T · state   (per element, a step's per chunk at least)
#   one_step 2 µs + 1 ns · state (T = 1 only)       8 µs + 8 ns · state
# so the chunked form wins from T ≈ 6 (≈ 5 in training), while the blocked one wins only where a step's
# fixed cost outweighs its 4 passes per element (8 ns against the step's 1.5): small states (HGRN at B = 1),
# long T; on larger states (Mamba's [E, N], HGRN at B = 8) the step loop stays the fastest. One step alone
# (decoding) costs 0.3 to 0.6 of the loop's step at T = 1 (benchmarks/step_kernels.py): the loop's lists and
# stack, and an einsum where one matrix product reads the state out, are gone.
UNKNOWN_STATE = 4096  # elements per step where the batch is symbolic at compile time
# On a CUDA device a step is launch-bound: LAUNCH per eager op, plus PASS per state element for each pass
# over memory (estimates, not measured: no GPU was at hand when the step kernels were costed).
LAUNCH, PASS = 5e-6, 2e-12


def _train(ctx: Context, forward: float, training: float) -> float:
    return training if ctx.training else forward


def _state(ctx: Context) -> int:
    return ctx.size("state") or UNKNOWN_STATE


def _steps_on_cuda(ctx: Context, T: int, ops: int) -> float:
    """T steps of `ops` element-wise ops over the state each, on a CUDA device (its backward: twice as many)."""
    return _train(ctx, 1, 3) * T * ops * (LAUNCH + PASS * _state(ctx))


def _step_cost(ctx: Context) -> float:
    T = ctx.size("T")
    if T is None:
        return 0.0  # the compile-time choice when T is symbolic; each call decides with its own T
    if ctx.device == "cuda":
        return _steps_on_cuda(ctx, T, 5)  # the decay's step, the drive, its product and sum, the readout
    state = _state(ctx)
    return T * _train(ctx, 3e-6 + 1.5e-9 * state, 12e-6 + 12e-9 * state)


def _one_step_cost(ctx: Context) -> float:
    if ctx.device == "cuda":
        return _steps_on_cuda(ctx, 1, 4)  # the decay's exp, its product, one addcmul, the readout
    state = _state(ctx)
    return _train(ctx, 2e-6 + 1e-9 * state, 8e-6 + 8e-9 * state)


def _blocked_cost(ctx: Context) -> float:
    T = ctx.size("T")
    if T is None:
        return 1.0
    C = math.ceil(math.sqrt(T))
    forward = (C + math.ceil(T / C)) * 6e-6 + 8e-9 * T * _state(ctx)
    return _train(ctx, forward, 3 * forward)


def _chunked_applies(ctx: Context) -> str | None:
    if not ctx.size("gla"):
        return ("not gated linear attention's form (a drive k_tᵀ v_t read out as q_t S_t over the key dim, "
                "a scalar or per-key decay proven positive)")
    return None


def _chunked_cost(ctx: Context) -> float:
    T = ctx.size("T")
    if T is None:
        return 1.0
    # Its recurrence across chunks does at least a step's work on the state per chunk (the step loop's cost
    # per element): all there is to a call of a few steps.
    chunks = math.ceil(T / chunk_size(T))
    forward = 1.4e-4 + max(0.27e-9 * T, 1.5e-9 * chunks) * _state(ctx)
    return _train(ctx, forward, 8e-4 + max(0.95e-9 * T, 12e-9 * chunks) * _state(ctx))


def _triton_applies(ctx: Context) -> str | None:
    if ctx.device != "cuda":
        return "Triton kernels run on CUDA only"
    if ctx.dtype not in ("float32", "float16", "bfloat16"):
        return f"no Triton kernel for {ctx.dtype}"
    blocked = _chunked_applies(ctx)
    if blocked is not None:
        return blocked
    K, V = ctx.size("K"), ctx.size("V")
    if K is None or V is None or K > 128 or V > 128:
        return "the Triton kernel keeps a [K, V] state per program: K and V must be known and at most 128"
    return None


def _triton_cost(ctx: Context) -> float:
    # One launch per direction instead of an op per chunk step, after copying q, k, v and the decays into
    # rows [N, T, ·] and before copying the output back: about 8 launches however short the call.
    return _chunked_cost(ctx) / 20 + _train(ctx, 8 * LAUNCH, 16 * LAUNCH)


register(Kernel(OP, "step", "gatedsl.kernels.linear_scan.reference:step", applies=lambda ctx: None,
                cost=_step_cost, plain=True,
                why="T steps of a few ops each; the cheapest for a few steps (for one: one_step); T unknown at "
                    "compile time: each call decides by its T"))
register(Kernel(OP, "one_step", "gatedsl.kernels.linear_scan.one_step:one_step", applies=one_step_only,
                cost=_one_step_cost,
                why="the recurrent update S = a ⊙ S + b and its readout on the tensors given: O(state) per token, "
                    "no fixed cost to pay back"))
register(Kernel(OP, "chunked", "gatedsl.kernels.linear_scan.chunked:chunked", applies=_chunked_applies,
                cost=_chunked_cost,
                why="chunks of 64 steps: matrix products within, a step per chunk across; wins from T ≈ 6"))
register(Kernel(OP, "blocked", "gatedsl.kernels.linear_scan.blocked:blocked", applies=lambda ctx: None,
                cost=_blocked_cost, why="about 2√T steps of 4 passes per element; wins for small states and long T"))
register(Kernel(OP, "triton", "gatedsl.kernels.linear_scan.triton:chunked", applies=_triton_applies,
                cost=_triton_cost, why="the chunked form in two Triton kernels (forward, backward)"))
