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
    seq_at = [i for i, r in enumerate(roles) if r == "seq"]
    state_at = [i for i, r in enumerate(roles) if r == "state"]
    length = args[seq_at[0]].shape[axes[0]]
    if length == 0:
        raise ValueError("scan over an empty axis")
    steps = range(length - 1, -1, -1) if reverse else range(length)
    # Slice each sequence once: unbind's backward is one stack, where a select per step would
    # build a full-size zero gradient per step (quadratic in the length).
    slices = [args[i].unbind(axis) for i, axis in zip(seq_at, axes)]
    # One step's arguments, updated in place: the constants stay, the slices and the states change.
    step_args = list(args)
    states = [args[i] for i in state_at]
    outs = []
    out = None
    for t in steps:
        for i, sliced in zip(seq_at, slices):
            step_args[i] = sliced[t]
        out, *states = cell(*step_args)
        for i, state in zip(state_at, states):
            step_args[i] = state
        if not last:
            outs.append(out)
    if last:
        return (out, *states)
    if reverse:
        outs.reverse()
    return (torch.stack(outs, dim=min(axes[0], out.dim())), *states)


def native_rnn(cell, args, kind, weights, reverse, last, axis):
    """`scan(cell, args, ...)` for a cell that is exactly torch's GRU or LSTM (kind "gru" / "lstm"), on torch's fused kernel.

    args are the sequence (steps at `axis`, any batch dims) then the states, (h,) or (h, c);
    weights name the cell's parameters per group (input, state, input bias, state bias), each
    in torch's gate order; the bias groups are empty for a cell without biases.
    """
    x, *states = args
    steps = x.movedim(axis, 0)
    batch = steps.shape[1:-1]
    inputs = steps.reshape(steps.shape[0], -1, steps.shape[-1])
    if reverse:
        inputs = inputs.flip(0)
    hx = [s.reshape(1, -1, s.shape[-1]) for s in states]
    flat = [torch.cat([cell.get_parameter(name) for name in group]) for group in weights if group]
    has_biases = len(flat) == 4
    if kind == "gru":
        out, *finals = torch._VF.gru(inputs, hx[0], flat, has_biases, 1, 0.0, True, False, False)
    else:
        out, *finals = torch._VF.lstm(inputs, tuple(hx), flat, has_biases, 1, 0.0, True, False, False)
    finals = [f.reshape(*batch, f.shape[-1]) for f in finals]
    if last:
        return (finals[0], *finals)
    if reverse:
        out = out.flip(0)
    out = out.reshape(out.shape[0], *batch, out.shape[-1])
    return (out.movedim(0, min(axis, out.dim() - 1)), *finals)


def early_exit(stages, args, roles, thresholds):
    """Early exit over a stack of stages, per sample (a row of the first dim).

    stages[l](*values) gives (head y_l, gate g_l, *carried values); `args` are the values the
    stages read, each with a role: "carry" (replaced by each stage's), "rows" (per sample, read
    only) or "whole" (shared). A sample exits at the first l with g_l > thresholds[l], else at
    the last stage. Training runs every stage on every sample; eval runs stage l only on the
    samples still in, and leaves NaN in ys and gs where a stage did not run.
    Returns (y, exit_at, ys [L, B, ...], gs [L, B], *each carried value at the sample's exit).
    """
    if stages[0].training:
        return _early_exit_everywhere(stages, args, roles, thresholds)
    return _early_exit_skipping(stages, args, roles, thresholds)


def _early_exit_everywhere(stages, args, roles, thresholds):
    values = list(args)
    heads, gates, carried = [], [], []
    for stage in stages:
        head, gate, *new = stage(*values)
        heads.append(head)
        gates.append(gate.reshape(gate.shape[0]))
        carried.append(new)
        fresh = iter(new)
        values = [next(fresh) if role == "carry" else v for v, role in zip(values, roles)]
    ys, gs = torch.stack(heads), torch.stack(gates)
    last = len(stages) - 1
    exit_at = torch.full(gs.shape[1:], last, dtype=torch.long, device=gs.device)
    for l in range(last - 1, -1, -1):  # backwards, so the first stage that fires wins
        exit_at = torch.where(gs[l] > thresholds[l], l, exit_at)
    rows = torch.arange(gs.shape[1], device=gs.device)
    at_exit = [torch.stack(per_stage)[exit_at, rows] for per_stage in zip(*carried)]
    return (ys[exit_at, rows], exit_at, ys, gs, *at_exit)


def _early_exit_skipping(stages, args, roles, thresholds):
    per_sample = next(a for a, role in zip(args, roles) if role != "whole")
    n = per_sample.shape[0]
    last = len(stages) - 1
    active = torch.arange(n, device=per_sample.device)  # the samples still in, by their row in the batch
    values = list(args)
    for l, stage in enumerate(stages):
        head, gate, *new = stage(*values)
        gate = gate.reshape(gate.shape[0])
        if l == 0:
            y = head.new_empty((n, *head.shape[1:]))
            exit_at = torch.full((n,), last, dtype=torch.long, device=head.device)
            ys = head.new_full((len(stages), n, *head.shape[1:]), math.nan)
            gs = gate.new_full((len(stages), n), math.nan)
            at_exit = [c.new_empty((n, *c.shape[1:])) for c in new]
        ys[l, active] = head
        gs[l, active] = gate
        leave = gate > thresholds[l] if l < last else torch.ones_like(gate, dtype=torch.bool)
        gone = active[leave]
        y[gone] = head[leave]
        exit_at[gone] = l
        for buffer, c in zip(at_exit, new):
            buffer[gone] = c[leave]
        stay = ~leave
        active = active[stay]
        if active.numel() == 0:
            break
        fresh = iter([c[stay] for c in new])
        values = [next(fresh) if role == "carry" else a.index_select(0, active) if role == "rows" else a
                  for a, role in zip(args, roles)]
    return (y, exit_at, ys, gs, *at_exit)


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


def rms_norm(x, weight, eps, zero_centered):
    """RMSNorm over the last dim as transformers computes it: statistics in float32 at least (float64 stays float64).

    Llama's form (LlamaRMSNorm) casts x / rms(x) back to x's dtype, then scales by w; the zero-centred
    form (Qwen3NextRMSNorm) scales by 1 + w in float32 and then casts. The two differ only in half precision.
    """
    shape = (x.shape[-1],)
    compute = torch.promote_types(x.dtype, torch.float32)
    if zero_centered:
        return F.rms_norm(x.to(compute), shape, 1 + weight.to(compute), eps).to(x.dtype)
    if compute == x.dtype:
        return F.rms_norm(x, shape, weight, eps)
    normed = F.rms_norm(x.to(compute), shape, None, eps).to(x.dtype)
    return normed if weight is None else weight * normed


def rope(x, positions, theta, rotary_dim):
    """Rotary position embedding of [*, T, d] on its first rotary_dim features, as transformers' Llama and Qwen3-Next.

    Feature i < rotary_dim / 2 pairs with i + rotary_dim / 2 (rotate_half), turned by the angle p·θ^(−2i/rotary_dim)
    at position p (`positions`: [T], or [B, T] with B the first dim of x; None: 0..T-1). The angles, cosines and
    sines are computed in float32 and then cast to x's dtype, as transformers does, so a float64 model reproduces
    a transformers model's numbers.
    """
    if rotary_dim == 0:
        return x
    steps = x.shape[-2]
    if positions is None:
        positions = torch.arange(steps, device=x.device)
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim))
    angles = positions[..., None].float() * inv_freq
    if positions.dim() == 2:  # [B, T, r/2] -> [B, 1, ..., 1, T, r/2]: one row of positions per sample
        angles = angles.reshape(angles.shape[0], *(1,) * (x.dim() - 3), steps, -1)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    turned, kept = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = turned.chunk(2, dim=-1)
    turned = turned * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((turned, kept), dim=-1) if kept.shape[-1] else turned


def attention(q, k, v, mask, lengths, causal, window, left_padded, scale, groups):
    """Scaled dot-product attention under every mask given, together, over `groups` query heads per key/value head.

    Query t may see key s where s ≤ t (causal), t − window < s (a sliding window), s is one of the sample's
    valid keys (its first `lengths[b]`, or its last where left_padded) and `mask` holds (bool); a float `mask`
    is added to the scores. A query that may see no key gets zeros, as torch's SDPA gives. Key/value head h
    serves query heads h·groups to h·groups + groups − 1 (dim -3), as transformers' repeat_kv has them.
    """
    steps, keys = q.shape[-2], k.shape[-2]
    kwargs = {"scale": scale} if scale is not None else {}
    keep = None  # bool, broadcasting to the scores: true where a query may see a key
    if causal and window is None and lengths is None and mask is None:
        kwargs["is_causal"] = True  # SDPA's own causal mask, which its fastest kernels take
    elif causal:
        key_at = torch.arange(keys, device=q.device)
        query_at = torch.arange(steps, device=q.device)[:, None]
        keep = key_at <= query_at
        if window is not None:
            keep = keep & (key_at > query_at - window)
    if lengths is not None:
        key_at = torch.arange(keys, device=q.device)
        valid = key_at >= keys - lengths[:, None] if left_padded else key_at < lengths[:, None]
        valid = valid.reshape(valid.shape[0], *(1,) * (q.dim() - 2), keys)
        keep = valid if keep is None else keep & valid
    if mask is not None and mask.dtype == torch.bool:
        keep = mask if keep is None else keep & mask
    elif mask is not None:
        keep = mask if keep is None else torch.where(keep, mask, float("-inf"))
    if groups > 1 and torch.__version__ >= "2.5":
        kwargs["enable_gqa"] = True
    elif groups > 1:  # torch 2.4's SDPA cannot group heads
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, **kwargs)


def shift(x, dim, steps, value, fill=None):
    """x moved `steps` positions later along dim, the first ones `fill` (a slice, broadcast) or `value`."""
    length = x.shape[dim]
    kept = min(steps, length)
    return torch.cat([shift_fill(x, dim, kept, value, fill), x.narrow(dim, 0, length - kept)], dim=dim)


def shift_fill(x, dim, steps, value, fill):
    """`steps` positions of a shift's fill, shaped like x but along dim."""
    dim = dim % x.dim()
    shape = list(x.shape)
    shape[dim] = steps
    if fill is None:
        return x.new_full(shape, value)
    return fill.to(x.dtype).expand(shape[:dim] + shape[dim + 1:]).unsqueeze(dim).expand(shape)


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


def s4d_real_(tensor):
    """log n along the last dim (n = 1..N), the S4D-real A_n = −n stored as Mamba's A_log = log(−A)."""
    with torch.no_grad():
        n = torch.arange(1, tensor.shape[-1] + 1, dtype=tensor.dtype, device=tensor.device)
        return tensor.copy_(torch.log(n).expand_as(tensor))


def dt_bias_(tensor, dt_min, dt_max, floor):
    """softplus⁻¹(Δ₀), Δ₀ log-uniform in [dt_min, dt_max] and at least `floor`: Mamba's bias of Δ, so that
    softplus(bias) starts at Δ₀ (as mamba_ssm and transformers' MambaMixer draw it)."""
    with torch.no_grad():
        log_dt = torch.rand_like(tensor) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt = torch.exp(log_dt).clamp(min=floor)
        return tensor.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(y) = y + log(1 − e^{−y})


class Noise(torch.nn.Module):
    """`noise_like(x)`: standard normal noise of x's shape, dtype and device in training, zeros in eval."""

    def forward(self, x):
        return torch.randn_like(x) if self.training else torch.zeros_like(x)


class AuxRecorder(torch.nn.Module):
    """Holds the `aux NAME = ...` values of the model's latest call, by instance path, in `values`.

    Each call of the model replaces `values`; the tensors keep their autograd history, so a loss
    built from them backpropagates. They are not state: neither the state dict nor a pickled or
    copied model carries them.
    """

    def __init__(self, names):
        super().__init__()
        self.names = tuple(names)
        self.values = {}

    def forward(self, *values):
        self.values = dict(zip(self.names, values))

    def extra_repr(self):
        return ", ".join(self.names)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["values"] = {}
        return state


def aux_values(model):
    """The aux values of `model`'s latest call, {instance path: tensor}; {} before the first call or without aux."""
    recorder = getattr(model, "_orig_mod", model)._modules.get("_aux")  # through torch.compile's wrapper too
    return dict(recorder.values) if recorder is not None else {}
