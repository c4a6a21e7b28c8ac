"""The gate chain as one autograd node: generated Python that runs the chain's algebraically fused form in place, and its derivative program as the backward.

For each program and operand shapes, the forward is generated once: fewer torch ops
(program.fuse_algebra: lerp, addcmul, silu), each result written into a buffer that is no
longer needed where one of the chain's shape is free. It runs without recording an autograd
graph; in training it keeps only the operands and intermediate values the gradient formulas
read. The backward is the derivative program (program.differentiate, from the per-fn rules),
generated the same way and calling torch's fused backward kernels (sigmoid_backward, ...);
gradients of broadcast operands are summed to their shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from gatedsl.kernels.gate_chain.program import Program, differentiate, fuse_algebra, value_kinds

aten = torch.ops.aten

# Out-of-place torch code per fn: operands {0}, {1}, {2}; constants {c0}, {c1}.
_EXPR = {
    "sigmoid": "torch.sigmoid({0})", "tanh": "torch.tanh({0})", "relu": "torch.relu({0})", "gelu": "F.gelu({0})",
    "silu": "F.silu({0})", "softplus": "F.softplus({0})", "logsigmoid": "F.logsigmoid({0})", "exp": "torch.exp({0})",
    "log": "torch.log({0})", "sqrt": "torch.sqrt({0})", "rsqrt": "torch.rsqrt({0})", "abs": "torch.abs({0})",
    "neg": "(-{0})", "sin": "torch.sin({0})", "cos": "torch.cos({0})", "elu": "F.elu({0})",
    "square": "torch.square({0})", "reciprocal": "torch.reciprocal({0})", "sign": "torch.sign({0})",
    "erf": "torch.erf({0})",
    "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
    "maximum": "torch.maximum({0}, {1})", "minimum": "torch.minimum({0}, {1})", "pow": "({0} ** {1})",
    "where": "torch.where({0}, {1}, {2})", "clamp": "torch.clamp({0}, {c0}, {c1})", "lerp": "torch.lerp({0}, {1}, {2})",
    "addcmul": "torch.addcmul({0}, {1}, {2}, value={c0})",
    "gt": "({0} > {1})", "ge": "({0} >= {1})", "lt": "({0} < {1})", "le": "({0} <= {1})", "eq": "({0} == {1})",
    "and": "torch.logical_and({0}, {1})",
    "sigmoid_grad": "aten.sigmoid_backward({0}, {1})", "tanh_grad": "aten.tanh_backward({0}, {1})",
    "relu_grad": "aten.threshold_backward({0}, {1}, 0)", "silu_grad": "aten.silu_backward({0}, {1})",
    "gelu_grad": "aten.gelu_backward({0}, {1})", "softplus_grad": "aten.softplus_backward({0}, {1}, 1, 20)",
    "elu_grad": "aten.elu_backward({0}, 1.0, 1, 1, False, {1})", "logsigmoid_grad": "({0} * torch.sigmoid(-{1}))",
}
# The same, writing into operand 0's buffer.
_IN_PLACE = {
    **{f: "{0}.%s_()" % f for f in ("sigmoid", "tanh", "relu", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "sin",
                                     "cos", "square", "reciprocal", "sign", "erf")},
    "silu": "F.silu({0}, inplace=True)", "elu": "F.elu({0}, inplace=True)",
    "add": "{0}.add_({1})", "sub": "{0}.sub_({1})", "mul": "{0}.mul_({1})", "div": "{0}.div_({1})",
    "pow": "{0}.pow_({1})", "clamp": "{0}.clamp_({c0}, {c1})", "lerp": "{0}.lerp_({1}, {2})",
    "addcmul": "{0}.addcmul_({1}, {2}, value={c0})",
    "maximum": "torch.maximum({0}, {1}, out={0})", "minimum": "torch.minimum({0}, {1}, out={0})",
    "sigmoid_grad": "aten.sigmoid_backward.grad_input({0}, {1}, grad_input={0})",
    "tanh_grad": "aten.tanh_backward.grad_input({0}, {1}, grad_input={0})",
    "silu_grad": "aten.silu_backward.grad_input({0}, {1}, grad_input={0})",
    "gelu_grad": "aten.gelu_backward.grad_input({0}, {1}, grad_input={0})",
}
_COMMUTATIVE = ("add", "mul", "maximum", "minimum")


def _broadcast(a: tuple, b: tuple) -> tuple:
    return tuple(torch.broadcast_shapes(a, b))


def generate(program: Program, kinds: list[str], shapes: list[tuple], keep: set[int], name: str,
             returns: list[list[int]]) -> Callable:
    """A Python function of the program's inputs returning, per list in `returns`, a tuple of those values.

    A step writes into the buffer of a value no longer needed (never an input, nor a value in
    `keep`) where that buffer has the step's shape; the buffers are the chain's own temporaries."""
    n = program.n_inputs
    full = ()
    for s in shapes[:n]:
        full = _broadcast(full, s)
    last_use = {}
    for k, (_, args, _) in enumerate(program.steps):
        for a in args:
            last_use[a] = n + k
    names = [f"x{i}" for i in range(n)] + [f"v{n + k}" for k in range(len(program.steps))]
    literal = {}
    lines = [f"def {name}({', '.join(names[:n])}):"]
    for k, (fn, args, consts) in enumerate(program.steps):
        ref = n + k
        if fn == "const":
            literal[ref] = repr(consts[0])
            continue
        operands = [literal.get(a, names[a]) for a in args]
        reusable = [i for i, a in enumerate(args) if a >= n and a not in literal and a not in keep
                    and last_use[a] == ref and kinds[a] == "float" and shapes[a] == shapes[ref]
                    and args.count(a) == 1]
        code = None
        if kinds[ref] == "float" and shapes[ref] == full and fn in _IN_PLACE:
            if 0 in reusable:
                code = _IN_PLACE[fn]
            elif fn in _COMMUTATIVE and 1 in reusable:
                operands = operands[::-1]
                code = _IN_PLACE[fn]
        code = (code or _EXPR[fn]).format(*operands, **{f"c{i}": repr(c) for i, c in enumerate(consts)})
        lines.append(f"    {names[ref]} = {code}")
    groups = ["(" + "".join(f"{literal.get(r, names[r])}, " for r in group) + ")" for group in returns]
    lines.append(f"    return ({', '.join(groups)},)")
    source = "\n".join(lines) + "\n"
    scope = {"torch": torch, "F": F, "aten": aten, "inf": math.inf, "nan": math.nan}
    exec(compile(source, f"<gate_chain {name}>", "exec"), scope)
    fn = scope[name]
    fn.source = source
    return fn


@dataclass
class Plan:
    """The generated code of one program for one set of operand shapes and kinds."""

    program: Program  # the algebraically fused program
    kinds: list[str]
    shapes: list[tuple]
    n_outputs: int
    infer: Callable  # (*inputs) -> (outputs,)
    train: Callable  # (*inputs) -> (outputs, saved)
    recorded: Callable  # (*inputs) -> (outputs,), no value overwritten: for autograd to record
    saved: tuple[int, ...]  # the forward values the gradient formulas read, as `train` returns them
    read_inputs: tuple[int, ...]  # the inputs the gradient formulas read
    promote: object  # the dtype mixed float operands are converted to first, None where they agree
    backwards: dict = field(default_factory=dict)  # (grads given, gradients wanted) -> (fn, saved indices)


_PLANS: dict[tuple, Plan] = {}


def plan_for(config, tensors) -> Plan:
    key = (config.text, tuple([(t.shape, t.dtype) for t in tensors]))
    plan = _PLANS.get(key)
    if plan is None:
        shapes = [tuple(t.shape) for t in tensors]
        input_kinds = tuple("bool" if t.dtype == torch.bool else "float" for t in tensors)
        floats = {t.dtype for t in tensors if t.is_floating_point()}
        promote = None
        if len(floats) > 1:  # mixed precisions: computed in the promoted one, as torch's ops would
            promote = floats.pop()
            for dtype in floats:
                promote = torch.promote_types(promote, dtype)
        plan = _PLANS[key] = _make_plan(config.program, shapes, input_kinds, promote)
    return plan


def _value_shapes(program: Program, input_shapes: list) -> list[tuple]:
    out = list(input_shapes)
    for fn, args, _ in program.steps:
        shape = ()
        for a in args:
            shape = _broadcast(shape, out[a])
        out.append(shape)
    return out


def _make_plan(original: Program, input_shapes: list, input_kinds: tuple[str, ...], promote) -> Plan:
    program = fuse_algebra(original, input_kinds)
    kinds = value_kinds(program, input_kinds)
    shapes = _value_shapes(program, input_shapes)
    outputs = list(program.outputs)
    all_grads = tuple(True for _ in outputs)
    float_inputs = tuple(k == "float" for k in input_kinds)
    derivative = differentiate(program, input_kinds, all_grads, float_inputs, recompute=False)
    saved = derivative.saved
    read = set()
    for _, args, _ in derivative.program.steps:
        read.update(a for a in args if a < program.n_inputs)
    read.update(o for o in derivative.program.outputs if o < program.n_inputs)
    infer = generate(program, kinds, shapes, set(outputs), "forward", [outputs])
    train = generate(program, kinds, shapes, set(outputs) | set(saved), "forward_train", [outputs, list(saved)])
    every = set(range(len(kinds)))
    recorded = generate(program, kinds, shapes, every, "forward_recorded", [outputs])
    return Plan(program, kinds, shapes, len(outputs), infer, train, recorded, saved, tuple(sorted(read)), promote)


def _backward_fn(plan: Plan, given: tuple[bool, ...], wanted: tuple[bool, ...], in_place: bool):
    """The generated backward for these output gradients and wanted input gradients; in place only where no
    graph of the backward itself is recorded (create_graph)."""
    key = (given, wanted, in_place)
    found = plan.backwards.get(key)
    if found is None:
        p = plan.program
        input_kinds = tuple(plan.kinds[:p.n_inputs])
        d = differentiate(p, input_kinds, given, wanted, recompute=False)
        b = d.program
        full = [plan.shapes[i] for i in range(p.n_inputs)] + [plan.shapes[r] for r in d.saved] + \
               [plan.shapes[o] for o, g in zip(p.outputs, given) if g]
        kinds = value_kinds(b, input_kinds + ("float",) * (b.n_inputs - p.n_inputs))
        shapes = _value_shapes(b, full)
        keep = set(b.outputs) if in_place else set(range(len(kinds)))
        fn = generate(b, kinds, shapes, keep, "backward", [list(b.outputs)])
        found = plan.backwards[key] = (fn, tuple(plan.saved.index(r) for r in d.saved), d.grads)
    return found


class _GateChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: Plan, *tensors):
        outs, saved = plan.train(*tensors)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.shapes = [t.shape for t in tensors]
        ctx.save_for_backward(*(t if i in plan.read_inputs else None for i, t in enumerate(tensors)), *saved)
        return outs

    @staticmethod
    def backward(ctx, *grads):
        plan: Plan = ctx.plan
        n = plan.program.n_inputs
        stored = ctx.saved_tensors
        inputs, saved = stored[:n], stored[n:]
        given = tuple(g is not None for g in grads)
        wanted = tuple(ctx.needs_input_grad[1:])
        if not any(given):
            return (None,) * (n + 1)
        fn, saved_indices, which = _backward_fn(plan, given, wanted, in_place=not torch.is_grad_enabled())
        (results,) = fn(*inputs, *(saved[i] for i in saved_indices), *(g for g in grads if g is not None))
        out = [None]
        for i, index in enumerate(which):
            if index is None or not wanted[i]:
                out.append(None)
                continue
            g = results[index]
            if isinstance(g, torch.Tensor) and tuple(g.shape) != tuple(ctx.shapes[i]):
                g = g.sum_to_size(ctx.shapes[i])
            out.append(g)
        return tuple(out)


def gate_chain(config, *tensors):
    """The chain as one autograd node (the backward is the derivative program), or in place where no gradient flows."""
    plan = plan_for(config, tensors)
    if plan.promote is not None:
        tensors = [t.to(plan.promote) if t.is_floating_point() else t for t in tensors]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outs = _GateChain.apply(plan, *tensors)
    else:
        (outs,) = plan.infer(*tensors)
    return outs[0] if plan.n_outputs == 1 else tuple(outs)


def recorded(config, *tensors):
    """The chain's fused form, each op recorded by autograd (its backward is torch's, in C++); in place where no gradient flows.

    For small tensors on the CPU this beats one Python autograd node: no Python runs in the backward."""
    plan = plan_for(config, tensors)
    if plan.promote is not None:
        tensors = [t.to(plan.promote) if t.is_floating_point() else t for t in tensors]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        (outs,) = plan.recorded(*tensors)
    else:
        (outs,) = plan.infer(*tensors)
    return outs[0] if plan.n_outputs == 1 else tuple(outs)
