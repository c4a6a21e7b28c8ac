"""gate_chain: a chain of element-wise gate math as one op (passes/fuse_gate_chains.py), and its kernels.

Kernels: reference (plain torch, as written), torch and autograd (torch_fused.py: the fused
form, as one autograd node or recorded op by op), triton (CUDA). Sizes: `elements` (of the
chain's shape, None where symbolic at compile time), `ops` (torch ops the chain has as
written), `fused_ops` (after program.fuse_algebra), `backward_ops` (of its derivative program).
"""

from __future__ import annotations

from gatedsl.kernels.gate_chain.program import differentiate, fuse_algebra
from gatedsl.kernels.registry import Context, FusedOp, Kernel, register, register_op

_STATS: dict[str, tuple[int, int, int]] = {}  # program text -> (ops, fused ops, backward ops)


def _stats(config) -> tuple[int, int, int]:
    found = _STATS.get(config.text)
    if found is None:
        p = config.program
        # Where-conditions come from outside the chain; the counts do not depend on operand kinds.
        kinds = ("float",) * p.n_inputs
        fused = fuse_algebra(p, kinds)
        backward = differentiate(p, kinds, (True,) * len(p.outputs), (True,) * p.n_inputs, recompute=False)
        found = _STATS[config.text] = (_count(p), _count(fused), _count(backward.program))
    return found


def _count(p) -> int:
    return sum(1 for fn, _, _ in p.steps if fn != "const")


_SIZES: dict[tuple, tuple] = {}  # (program text, operand shapes) -> sizes: dispatch asks on every call


def sizes(config, shapes: list[tuple[int | None, ...]]) -> tuple[tuple[str, int | None], ...]:
    key = (config.text, tuple(shapes))
    found = _SIZES.get(key)
    if found is None:
        found = _SIZES[key] = _sizes(config, shapes)
    return found


def _sizes(config, shapes: list[tuple[int | None, ...]]) -> tuple[tuple[str, int | None], ...]:
    rank = max((len(s) for s in shapes), default=0)
    numel: int | None = 1
    for i in range(1, rank + 1):
        dims = [s[-i] for s in shapes if len(s) >= i]
        if any(d is None for d in dims):
            numel = None
            break
        numel *= max(dims)
    ops, fused, backward = _stats(config)
    return (("elements", numel), ("ops", ops), ("fused_ops", fused), ("backward_ops", backward))


register_op(FusedOp("gate_chain", sizes, key=lambda config: config.text))

# ------------------------------------------------------------------ cost
# Rough seconds, from timings of single torch ops and of the bench cells' chains (1 CPU thread;
# tests/test_kernels_gate_chain.py checks the choices they lead to). An element-wise torch op
# costs a fixed dispatch time plus its elements: about 1.5 µs + 0.15 ns an element while its
# operands stay in cache (the 8k-element steps of an RNN), 0.7 ns an element from memory (the
# 5.8M-element SwiGLU product). In training each recorded op adds an autograd node (~1.5 µs) and
# the backward runs about `backward_ops` more ops. The reference runs the chain as written; the
# torch kernel its fused form in place as one autograd.Function, whose Python forward and
# backward cost ~20 µs more than recorded ops (it pays off only on large tensors, where in-place
# ops spare fresh buffers); the autograd kernel the fused form op by op, recorded (no Python in
# the backward). On CUDA each op is a launch (~6 µs) and a pass over memory; the Triton kernel
# is one launch each way that reads every operand and writes every output once.
_NOMINAL_ELEMENTS = 1 << 16  # where the size is known only per call
_NODE = 1.5e-6  # one recorded op: building its autograd node and running it
_FUNCTION = 20e-6  # one Python autograd.Function: apply, save, its backward through the engine
_CACHE_BYTES = 1 << 21


def _elements(ctx: Context) -> int:
    n = ctx.size("elements")
    return _NOMINAL_ELEMENTS if n is None else n


def _width(ctx: Context) -> int:
    return {"float64": 8, "float16": 2, "bfloat16": 2}.get(ctx.dtype, 4)


def _op(ctx: Context) -> float:
    """One element-wise torch op over the chain's elements."""
    n, width = _elements(ctx), _width(ctx)
    if ctx.device == "cuda":
        return 6e-6 + 3 * n * width / 2e12
    per_element = 0.15e-9 if 3 * n * width < _CACHE_BYTES else 0.7e-9
    return 1.5e-6 + n * per_element * width / 4


def _in_memory(ctx: Context) -> bool:
    return 3 * _elements(ctx) * _width(ctx) >= _CACHE_BYTES


def _reference_cost(ctx: Context) -> float:
    ops = ctx.size("ops") or 1
    if not ctx.training:
        return ops * _op(ctx)
    return ops * (_op(ctx) + _NODE) + (ctx.size("backward_ops") or ops) * _op(ctx)


def _torch_cost(ctx: Context) -> float:
    fused = ctx.size("fused_ops") or 1
    in_place = 0.9 if _in_memory(ctx) else 1.0  # no fresh buffer to fault in
    if not ctx.training:
        return fused * _op(ctx) * in_place
    return (fused + (ctx.size("backward_ops") or fused)) * _op(ctx) * in_place + _FUNCTION


def _autograd_applies(ctx: Context) -> str | None:
    return None if ctx.training else "without gradients it is the torch kernel (in place)"


def _autograd_cost(ctx: Context) -> float:
    fused = ctx.size("fused_ops") or 1
    return fused * (_op(ctx) + _NODE) + (ctx.size("backward_ops") or fused) * _op(ctx)


def _triton_applies(ctx: Context) -> str | None:
    if ctx.device != "cuda":
        return f"Triton runs on CUDA only (this is {ctx.device})"
    if ctx.dtype not in ("float32", "float16", "bfloat16"):
        return f"the Triton kernel computes in float32 ({ctx.dtype} is not supported)"
    return None


def _triton_cost(ctx: Context) -> float:
    moved = 4 * _elements(ctx) * _width(ctx)  # a few operands in, an output or two out
    if not ctx.training:
        return 6e-6 + moved / 2e12
    return 2 * 6e-6 + 3 * moved / 2e12 + _FUNCTION


register(Kernel("gate_chain", "reference", "gatedsl.kernels.gate_chain.reference:gate_chain",
                applies=lambda ctx: None, cost=_reference_cost, plain=True,
                why="the chain as written, one torch op a step; autograd records each"))
register(Kernel("gate_chain", "torch", "gatedsl.kernels.gate_chain.torch_fused:gate_chain",
                applies=lambda ctx: None, cost=_torch_cost,
                why="fused form (lerp, addcmul, silu) in place; in training one autograd.Function (~20 µs of Python)"))
register(Kernel("gate_chain", "autograd", "gatedsl.kernels.gate_chain.torch_fused:recorded",
                applies=_autograd_applies, cost=_autograd_cost,
                why="fused form op by op, autograd records each: fewer nodes, no Python in the backward"))
register(Kernel("gate_chain", "triton", "gatedsl.kernels.gate_chain.triton:gate_chain",
                applies=_triton_applies, cost=_triton_cost,
                why="one generated kernel each way: every operand read once, every output written once"))
