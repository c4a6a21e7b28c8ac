"""The plain-PyTorch gate chain: each step one torch op, as the unfused graph runs it; autograd differentiates it."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from gatedsl.kernels.gate_chain.program import Program

# The forward fns call exactly what the backend runs for the unfused ops (fx_emit's lowerings), so
# this kernel computes bit for bit what -O0 does. The derivative helpers are their formulas
# written out (torch_fused calls torch's fused backward kernels instead): an independent check.
FNS = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "gelu": F.gelu, "silu": F.silu,
    "softplus": F.softplus, "logsigmoid": F.logsigmoid, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt, "abs": torch.abs, "neg": operator.neg, "sin": torch.sin, "cos": torch.cos,
    "elu": F.elu, "square": torch.square, "reciprocal": torch.reciprocal, "sign": torch.sign, "erf": torch.erf,
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
    "maximum": torch.maximum, "minimum": torch.minimum, "pow": operator.pow,
    "where": torch.where, "lerp": torch.lerp,
    "gt": operator.gt, "ge": operator.ge, "lt": operator.lt, "le": operator.le, "eq": operator.eq,
    "and": torch.logical_and,
    "sigmoid_grad": lambda g, y: g * (1 - y) * y,
    "tanh_grad": lambda g, y: g * (1 - y * y),
    "relu_grad": lambda g, y: torch.where(y > 0, g, 0.0),
    "silu_grad": lambda g, x: g * torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
    "gelu_grad": lambda g, x: g * (0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x * x) /
                                   math.sqrt(2 * math.pi)),
    "softplus_grad": lambda g, x: torch.where(x > 20, g, g * torch.sigmoid(x)),
    "elu_grad": lambda g, x: torch.where(x > 0, g, g * torch.exp(x)),
    "logsigmoid_grad": lambda g, x: g * torch.sigmoid(-x),
}


def evaluate(program: Program, tensors) -> list:
    """Every output of `program` on `tensors`."""
    values = list(tensors)
    for fn, args, consts in program.steps:
        operands = [values[a] for a in args]
        if fn == "const":
            values.append(consts[0])
        elif fn == "clamp":
            values.append(torch.clamp(operands[0], consts[0], consts[1]))
        elif fn == "addcmul":
            values.append(torch.addcmul(*operands, value=consts[0]))
        else:
            values.append(FNS[fn](*operands))
    return [values[o] for o in program.outputs]


def gate_chain(config, *tensors):
    outs = evaluate(config.program, tensors)
    return outs[0] if len(outs) == 1 else tuple(outs)
