"""The plain-PyTorch projection group: one F.linear per projection, as the unfused graph runs them."""

from __future__ import annotations

import torch.nn.functional as F


def unpack(config, tensors):
    """(weights, biases, addend): a weight and a bias (None where it has none) per projection, views if packed."""
    sizes = list(config.out_features)
    tensors = list(tensors)
    addend = tensors.pop() if config.addend else None
    if config.packed:
        weights = tensors[0].split(sizes)
        packed_bias = tensors[-1].split(sizes) if any(config.biases) else [None] * len(sizes)
        biases = [b if has else None for b, has in zip(packed_bias, config.biases)]
    else:
        weights = tensors[:len(sizes)]
        given = iter(tensors[len(sizes):])
        biases = [next(given) if has else None for has in config.biases]
    return weights, biases, addend


def separate(config, x, *tensors):
    """y_j = x W_jᵀ + b_j (+ addend_j), one product per projection."""
    weights, biases, addend = unpack(config, tensors)
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases)]
    if addend is not None:
        outs = [y + a for y, a in zip(outs, addend.split(config.out_features, -1))]
    return outs[0] if len(outs) == 1 else tuple(outs)
