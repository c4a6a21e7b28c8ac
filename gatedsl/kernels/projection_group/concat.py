"""The projection group as one product: x times the concatenated weights, then a split into each projection's columns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gatedsl.kernels.projection_group.reference import unpack


def packed(config, tensors):
    """The concatenated weight [Σ out, in] and bias [Σ out] (zero where a projection has none; None if none has)."""
    if config.packed:
        return tensors[0], tensors[1 + config.transposed] if any(config.biases) else None
    weights, biases, _ = unpack(config, tensors)
    weight = torch.cat(weights)  # autograd hands each projection its rows of the gradient
    if not any(config.biases):
        return weight, None
    bias = torch.cat([b if b is not None else weight.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
    return weight, bias


def _split(config, y):
    return y if len(config.out_features) == 1 else y.split(config.out_features, -1)


def concat(config, x, *tensors):
    weight, bias = packed(config, tensors)
    if not config.addend:
        y = F.linear(x, weight, bias)
    elif x.dim() == 2 and bias is None:
        y = torch.addmm(tensors[-1], x, weight.t())  # the addend folded into the product: one op
    else:
        y = F.linear(x, weight, bias) + tensors[-1]
    return _split(config, y)


def transposed(config, x, *tensors):
    """`concat` on the weights given transposed [in, Σ out]: a row-major right operand multiplies few rows faster."""
    weight_t = tensors[1]
    addend = tensors[-1] if config.addend else (tensors[2] if any(config.biases) else None)
    if config.addend and any(config.biases):
        addend = tensors[-1] + tensors[2]
    if x.dim() == 2:
        y = torch.mm(x, weight_t) if addend is None else torch.addmm(addend, x, weight_t)
    else:
        y = torch.matmul(x, weight_t)
        y = y if addend is None else y + addend
    return _split(config, y)
