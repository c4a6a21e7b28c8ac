"""Functions the generated code calls where torch has no single op; they depend on torch alone.

`gatedsl compile -o` copies this file's functions into the standalone module it writes,
so nothing here may import gatedsl.
"""

import math

import torch
import torch.nn.functional as F


def scan(cell, args, roles, axes, reverse, last):
    """Run `cell` along the scanned axis of each "seq" argument, carrying the "state" ones.

    Returns (outputs, *final_states): outputs stacked at the scanned axis, or the last step's.
    """
    seqs = [a for a, r in zip(args, roles) if r == "seq"]
    states = [a for a, r in zip(args, roles) if r == "state"]
    length = seqs[0].shape[axes[0]]
    if length == 0:
        raise ValueError("scan over an empty axis")
    steps = range(length - 1, -1, -1) if reverse else range(length)
    outs = []
    out = None
    for t in steps:
        seq_i = 0
        state_i = 0
        step_args = []
        for arg, role in zip(args, roles):
            if role == "seq":
                step_args.append(arg.select(axes[seq_i], t))
                seq_i += 1
            elif role == "const":
                step_args.append(arg)
            else:
                step_args.append(states[state_i])
                state_i += 1
        out, *states = cell(*step_args)
        if not last:
            outs.append(out)
    if last:
        return (out, *states)
    if reverse:
        outs.reverse()
    return (torch.stack(outs, dim=min(axes[0], out.dim())), *states)


def fill(sizes, value, like, kind):
    """A tensor of `sizes` filled with `value`: floats take `like`'s dtype, everything its device."""
    if kind == "float":
        dtype = like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype()
    else:
        dtype = torch.long if kind == "int" else torch.bool
    device = like.device if like is not None else None
    return torch.full(tuple(sizes), value, dtype=dtype, device=device)


def cast(x, kind, like):
    if kind == "float":
        return x.to(like.dtype if like is not None and like.is_floating_point() else torch.get_default_dtype())
    return x.to(torch.long if kind == "int" else torch.bool)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, threshold):
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def binary_gate(x, threshold):
    """1[x > threshold] in the forward pass; the gradient passes straight through."""
    return _StraightThrough.apply(x, threshold)


def topk_softmax(x, k, dim):
    """Softmax over the k largest entries along `dim`, exactly zero elsewhere."""
    values, index = torch.topk(x, k, dim=dim)
    return torch.zeros_like(x).scatter(dim, index, torch.softmax(values, dim=dim))


def topk_mask(x, k, dim):
    _, index = torch.topk(x, k, dim=dim)
    return torch.zeros_like(x).scatter(dim, index, 1.0)


def group_norm_last(x, groups, weight, bias, eps):
    """Group norm over channels-last input: statistics per group of the last dim."""
    shape = x.shape
    grouped = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    mean = grouped.mean(dim=-1, keepdim=True)
    var = grouped.var(dim=-1, unbiased=False, keepdim=True)
    y = ((grouped - mean) / torch.sqrt(var + eps)).reshape(shape)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def conv_channels_last(x, weight, bias, spatial, stride, padding, dilation, groups, causal):
    """Convolution of [*, L, C] (or [*, H, W, C]) input; causal pads the left only."""
    lead = x.shape[: x.dim() - spatial - 1]
    y = x.reshape(-1, *x.shape[x.dim() - spatial - 1:]).movedim(-1, 1)
    if spatial == 1:
        if causal:
            y = F.pad(y, (padding[0], 0))
            y = F.conv1d(y, weight, bias, stride[0], 0, dilation[0], groups)
        else:
            y = F.conv1d(y, weight, bias, stride[0], padding[0], dilation[0], groups)
    else:
        y = F.conv2d(y, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
    y = y.movedim(1, -1)
    return y.reshape(*lead, *y.shape[1:])


def pool_channels_last(x, kind, kernel, stride, spatial):
    lead = x.shape[: x.dim() - spatial - 1]
    y = x.reshape(-1, *x.shape[x.dim() - spatial - 1:]).movedim(-1, 1)
    if spatial == 1:
        fn = F.avg_pool1d if kind == "avg" else F.max_pool1d
    else:
        fn = F.avg_pool2d if kind == "avg" else F.max_pool2d
    y = fn(y, tuple(kernel), tuple(stride)).movedim(1, -1)
    return y.reshape(*lead, *y.shape[1:])


def split_heads(x, heads):
    """[*, T, D] -> [*, heads, T, D/heads]"""
    return x.unflatten(-1, (heads, -1)).transpose(-2, -3)


def merge_heads(x):
    """[*, heads, T, d] -> [*, T, heads*d]"""
    return x.transpose(-2, -3).flatten(-2)


def cumulative(x, fn, dim, reverse):
    op = torch.cumsum if fn == "sum" else torch.cumprod
    if reverse:
        return op(x.flip(dim), dim).flip(dim)
    return op(x, dim)


def prod(x, dims, keepdim):
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, d, keepdim=keepdim)
    return x


def one_hot(index, num, like):
    return F.one_hot(index, num).to(like.dtype if like is not None and like.is_floating_point()
                                    else torch.get_default_dtype())


def fan_in_uniform_(tensor, fan_in):
    """PyTorch's default for Linear and Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)
