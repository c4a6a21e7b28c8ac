"""The gate chain as one Triton kernel generated from its program, and its backward as a second one generated from the derivative program.

One launch computes every output of the chain: each program instance loads a block of
elements of each operand (contiguous, a single number, or any strided/broadcast layout
through the index of the output), evaluates the steps in registers in float32 (float16 and
bfloat16 operands are widened, as torch computes them) and stores the outputs. The
backward kernel recomputes the forward values from the saved operands and evaluates the
derivative program (program.differentiate with recompute), so the forward saves only its
operands; gradients of broadcast operands are summed to their shapes by torch afterwards.
Kernels are generated and cached per program, operand layout and rank; CUDA only (tested
on CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import linecache
import math

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from gatedsl.kernels.gate_chain.program import Program, deduplicate, differentiate, value_kinds

BLOCK = 1024

# Functions Triton's core language lacks (tanh, log1p, expm1 are libdevice-only), written with
# exp/log so that they run in the interpreter as on the GPU; accurate to a few float32 ulps.
_HELPERS = '''
@triton.jit
def _tanh(x):
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    x2 = x * x
    # Near 0, 1 - e cancels: the odd Taylor series to x^9 is exact to float32 there.
    small = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                  + x2 * 0.021869488536155203))))
    return tl.where(a < 0.2, small, tl.where(x < 0.0, -t, t))


@triton.jit
def _log1p_exp_neg_abs(x):
    return tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + _log1p_exp_neg_abs(x))


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - _log1p_exp_neg_abs(x)


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _sign(x):
    return tl.where(x > 0.0, 1.0, 0.0) - tl.where(x < 0.0, 1.0, 0.0)


@triton.jit
def _maximum(a, b):
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _minimum(a, b):
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def _lerp(a, b, w):
    return tl.where(tl.abs(w) < 0.5, a + w * (b - a), b - (b - a) * (1.0 - w))


@triton.jit
def _gelu_grad(g, x):
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return g * (cdf + x * pdf)


@triton.jit
def _silu_grad(g, x):
    s = tl.sigmoid(x)
    return g * s * (1.0 + x * (1.0 - s))
'''

_EXPR = {
    "sigmoid": "tl.sigmoid({0})", "tanh": "_tanh({0})", "relu": "tl.where({0} < 0.0, 0.0, {0})",
    "gelu": "_gelu({0})", "silu": "({0} * tl.sigmoid({0}))", "softplus": "_softplus({0})",
    "logsigmoid": "_logsigmoid({0})", "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt({0})",
    "rsqrt": "tl.rsqrt({0})", "abs": "tl.abs({0})", "neg": "(-{0})", "sin": "tl.sin({0})", "cos": "tl.cos({0})",
    "elu": "tl.where({0} > 0.0, {0}, tl.exp({0}) - 1.0)", "square": "({0} * {0})", "reciprocal": "(1.0 / {0})",
    "sign": "_sign({0})", "erf": "tl.erf({0})",
    "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
    "maximum": "_maximum({0}, {1})", "minimum": "_minimum({0}, {1})",
    "where": "tl.where({0}, {1}, {2})", "lerp": "_lerp({0}, {1}, {2})", "addcmul": "({0} + {c0} * {1} * {2})",
    "gt": "({0} > {1})", "ge": "({0} >= {1})", "lt": "({0} < {1})", "le": "({0} <= {1})", "eq": "({0} == {1})",
    "and": "({0} & {1})",
    "sigmoid_grad": "({0} * (1.0 - {1}) * {1})", "tanh_grad": "({0} * (1.0 - {1} * {1}))",
    "relu_grad": "tl.where({1} <= 0.0, 0.0, {0})", "silu_grad": "_silu_grad({0}, {1})",
    "gelu_grad": "_gelu_grad({0}, {1})",
    "softplus_grad": "tl.where({1} > 20.0, {0}, {0} * tl.sigmoid({1}))",
    "elu_grad": "tl.where({1} > 0.0, {0}, {0} * tl.exp({1}))", "logsigmoid_grad": "({0} * tl.sigmoid(-{1}))",
}


def _float(value) -> str:
    value = float(value)
    if math.isinf(value):
        return "float('inf')" if value > 0 else "float('-inf')"
    return repr(value)


def _pow(base: str, exponent: float) -> str:
    """base ** exponent for a constant exponent, as torch computes it (negative bases with integer exponents too)."""
    if exponent == int(exponent) and abs(exponent) <= 4:
        k = int(abs(exponent))
        product = " * ".join([base] * k) if k else "1.0"
        return f"({product})" if exponent >= 0 else f"(1.0 / ({product}))"
    if exponent == 0.5:
        return f"tl.sqrt({base})"
    if exponent == -0.5:
        return f"tl.rsqrt({base})"
    if exponent == int(exponent):
        magnitude = f"tl.exp({_float(exponent)} * tl.log(tl.abs({base})))"
        return magnitude if int(exponent) % 2 == 0 else f"tl.where({base} < 0.0, -{magnitude}, {magnitude})"
    return f"tl.exp({_float(exponent)} * tl.log({base}))"


def _step_code(fn: str, operands: list[str], consts: tuple, constant: list) -> str:
    if fn == "pow":
        base, exponent = constant
        if exponent is not None:
            return _pow(operands[0], exponent)
        return f"tl.exp({operands[1]} * {_float(math.log(base))})"
    if fn == "clamp":
        low, high = consts
        code = operands[0]
        if low is not None:
            code = f"tl.where({code} < {_float(low)}, {_float(low)}, {code})"
        if high is not None:
            code = f"tl.where({code} > {_float(high)}, {_float(high)}, {code})"
        return code
    return _EXPR[fn].format(*operands, **{f"c{i}": _float(c) for i, c in enumerate(consts)})


def kernel_source(program: Program, input_kinds: tuple[str, ...], layouts: tuple[str, ...], rank: int,
                  name: str) -> str:
    """Triton source of one kernel computing `program`; layouts per input: "full", "scalar" or "strided"."""
    n = program.n_inputs
    kinds = value_kinds(program, input_kinds)
    strided = [i for i, layout in enumerate(layouts) if layout == "strided"]
    params = [f"p{i}" for i in range(n)] + [f"o{j}" for j in range(len(program.outputs))] + ["N"]
    if strided:
        params += [f"d{k}" for k in range(rank)]
        params += [f"s{i}_{k}" for i in strided for k in range(rank)]
    lines = ["@triton.jit", f"def {name}({', '.join(params)}, BLOCK: tl.constexpr):",
             "    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)",
             "    mask = offs < N"]
    if strided:
        lines.append("    rest = offs")
        for k in range(rank - 1, 0, -1):
            lines.append(f"    i{k} = rest % d{k}")
            lines.append(f"    rest = rest // d{k}")
        lines.append("    i0 = rest")
    for i, layout in enumerate(layouts):
        if layout == "scalar":
            load = f"tl.load(p{i})"
        else:
            where = "offs" if layout == "full" else " + ".join(f"i{k} * s{i}_{k}" for k in range(rank))
            load = f"tl.load(p{i} + {where}, mask=mask, other=0)"
        lines.append(f"    x{i} = ({load} != 0)" if kinds[i] == "bool" else f"    x{i} = {load}.to(tl.float32)")
    names = [f"x{i}" for i in range(n)] + [f"v{n + k}" for k in range(len(program.steps))]
    constants = {}
    for k, (fn, args, consts) in enumerate(program.steps):
        ref = n + k
        if fn == "const":
            constants[ref] = consts[0]
            names[ref] = _float(consts[0])
            continue
        code = _step_code(fn, [names[a] for a in args], consts, [constants.get(a) for a in args])
        lines.append(f"    {names[ref]} = {code}")
    for j, o in enumerate(program.outputs):
        lines.append(f"    tl.store(o{j} + offs, ({names[o]} + 0.0).to(o{j}.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


_KERNELS: dict[tuple, object] = {}


def _kernel(program: Program, input_kinds: tuple[str, ...], layouts: tuple[str, ...], rank: int):
    key = (program, input_kinds, layouts, rank)
    kernel = _KERNELS.get(key)
    if kernel is None:
        name = f"gate_chain_{len(_KERNELS)}"
        source = _HELPERS + "\n\n" + kernel_source(program, input_kinds, layouts, rank, name)
        filename = f"<gatedsl {name}>"
        # triton.jit reads the function's source through inspect, which finds it in linecache.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        scope = {"triton": triton, "tl": tl}
        exec(compile(source, filename, "exec"), scope)
        kernel = _KERNELS[key] = scope[name]
    return kernel


def _layouts(tensors, full: torch.Size) -> tuple[tuple[str, ...], list]:
    """Each operand's layout, and its strides over the output's index where strided."""
    layouts, strides = [], []
    for t in tensors:
        if t.numel() == 1:
            layouts.append("scalar")
        elif t.shape == full and t.is_contiguous():
            layouts.append("full")
        else:
            layouts.append("strided")
            strides += list(t.broadcast_to(full).stride())
    return tuple(layouts), strides


def launch(program: Program, input_kinds: tuple[str, ...], tensors, out_dtypes) -> list[torch.Tensor]:
    """Run `program` on `tensors` (of one broadcast shape) in one kernel; one contiguous output per dtype given."""
    full = torch.broadcast_shapes(*(t.shape for t in tensors))
    numel = math.prod(full)
    device = tensors[0].device
    outs = [torch.empty(full, dtype=dtype, device=device) for dtype in out_dtypes]
    if numel == 0:
        return outs
    rank = max(len(full), 1)
    layouts, strides = _layouts(tensors, full)
    args = [*tensors, *outs, numel]
    if "strided" in layouts:
        args += list(full) if full else [1]
        args += strides if full else [0] * layouts.count("strided")
    _kernel(program, input_kinds, layouts, rank)[(triton.cdiv(numel, BLOCK),)](*args, BLOCK=BLOCK)
    return outs


class _GateChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, program: Program, input_kinds, *tensors):
        dtype = next(t.dtype for t in tensors if t.is_floating_point())
        outs = launch(program, input_kinds, tensors, [dtype] * len(program.outputs))
        ctx.program, ctx.input_kinds = program, input_kinds
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*tensors)
        return tuple(outs)

    @staticmethod
    @once_differentiable  # the backward is a Triton kernel: a second derivative would need its own
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        given = tuple(g is not None for g in grads)
        wanted = tuple(need and kind == "float" for need, kind in zip(ctx.needs_input_grad[2:], ctx.input_kinds))
        none = (None, None) + (None,) * len(tensors)
        if not any(given) or not any(wanted):
            return none
        derivative = _derivative(ctx.program, ctx.input_kinds, given, wanted)
        full = torch.broadcast_shapes(*(t.shape for t in tensors))
        # Gradients summed over broadcast dims are accumulated in float32, then cast.
        out_dtypes = [tensors[i].dtype if tensors[i].shape == full else torch.float32
                      for i, index in enumerate(derivative.grads) if index is not None]
        kinds = ctx.input_kinds + ("float",) * sum(given)
        results = launch(derivative.program, kinds, [*tensors, *(g for g in grads if g is not None)], out_dtypes)
        out = [None, None]
        for i, index in enumerate(derivative.grads):
            if index is None:
                out.append(None)
                continue
            g = results[index]
            if g.shape != tensors[i].shape:
                g = g.sum_to_size(tensors[i].shape).to(tensors[i].dtype)
            out.append(g)
        return tuple(out)


_DEDUPLICATED: dict[tuple, Program] = {}


def _deduplicated(config, input_kinds) -> Program:
    key = (config.text, input_kinds)
    found = _DEDUPLICATED.get(key)
    if found is None:
        found = _DEDUPLICATED[key] = deduplicate(config.program, input_kinds)
    return found


_DERIVATIVES: dict[tuple, object] = {}


def _derivative(program: Program, input_kinds, given, wanted):
    key = (program, input_kinds, given, wanted)
    found = _DERIVATIVES.get(key)
    if found is None:
        found = _DERIVATIVES[key] = differentiate(program, input_kinds, given, wanted, recompute=True)
    return found


def gate_chain(config, *tensors):
    floats = {t.dtype for t in tensors if t.is_floating_point()}
    if len(floats) > 1:  # mixed precisions: compute in the promoted one, as torch's ops would
        dtype = floats.pop()
        for d in floats:
            dtype = torch.promote_types(dtype, d)
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    input_kinds = tuple("bool" if t.dtype == torch.bool else "float" for t in tensors)
    program = _deduplicated(config, input_kinds)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outs = _GateChain.apply(program, input_kinds, *tensors)
    else:
        outs = launch(program, input_kinds, tensors, [next(t.dtype for t in tensors if t.is_floating_point())]
                      * len(program.outputs))
    return outs[0] if len(outs) == 1 else tuple(outs)
