"""What a decoding model's generated code calls for each op that carries state: the op run on the new positions,
starting from what the previous call left (passes/derive_decoding.py says which ops, and why)."""

from __future__ import annotations

import torch

from gatedsl.backend import runtime
from gatedsl.backend.decode_state import DecodeState, Entry


class DecodeCall:
    """One call of a decoder: the state it starts from (None for a prefill), the entries it leaves, the batch's
    rows and the number of new positions."""

    def __init__(self, state: DecodeState | None, rows: int, steps: int):
        self.state, self.rows, self.steps = state, rows, steps
        self.left: dict[str, Entry] = {}

    def get(self, key: str) -> Entry | None:
        return None if self.state is None else self.state.entries.get(key)

    def put(self, key: str, kind: str, tensors, batch_dims: tuple[int, ...]) -> None:
        self.left[key] = Entry(kind, tuple(tensors), batch_dims)

    def positions(self, device: torch.device) -> torch.Tensor | None:
        """The new positions' numbers: None at a prefill (0..t-1, as a full forward has them), [t] where every row
        is at one position, [B, t] where rows differ (rows joined from prompts of different lengths)."""
        if self.state is None:
            return None
        start = self.state.position.to(device)
        offsets = torch.arange(self.steps, device=device)
        if bool((start == start[0]).all()):
            return start[0] + offsets
        return start[:, None] + offsets


def scan(call: DecodeCall, key, batch_dims, cell, args, roles, axes, last, kernel, weights):
    """A scan along the axis, its cell's states starting where the previous call left them."""
    entry = call.get(key)
    if entry is not None:
        args = list(args)
        for i, state in zip([i for i, r in enumerate(roles) if r == "state"], entry.tensors):
            args[i] = state
        args = tuple(args)
    if kernel == "loop":
        out = runtime.scan(cell, args, roles, axes, False, last)
    else:
        out = runtime.native_rnn(cell, args, kernel, weights, False, last, axes[0])
    call.put(key, "scan", out[1:], batch_dims)
    return out


def fused_scan(call: DecodeCall, key, kind, batch_dims, run, *tensors):
    """A linear_scan or delta_rule_scan (its last input the state before the first step, its last output the state
    after the last), continued from the previous call's state."""
    entry = call.get(key)
    if entry is not None:
        tensors = tensors[:-1] + (entry.tensors[0],)
    out = run(*tensors)
    call.put(key, kind, out[-1:], batch_dims)
    return out


def attention(call: DecodeCall, key, batch_dims, window, q, k, v, scale, groups):
    """Causal attention of the new queries over the cached keys and values and the new ones, which the cache then
    keeps (under a sliding window, only the window's newest)."""
    rows_k = batch_dims[0]
    steps = q.shape[-2]
    fresh = torch.ones(k.shape[rows_k] if rows_k >= 0 else 1, steps, dtype=torch.bool, device=k.device)
    entry = call.get(key)
    if entry is None:
        out = runtime.attention(q, k, v, None, None, True, window, False, scale, groups)
        keys, values, keep = k, v, fresh
    else:
        cached_k, cached_v, cached_keep = entry.tensors
        keys, values = torch.cat([cached_k, k], dim=-2), torch.cat([cached_v, v], dim=-2)
        keep = torch.cat([cached_keep, fresh.expand(cached_keep.shape[0], -1)], dim=-1)
        total = keys.shape[-2]
        key_at = torch.arange(total, device=q.device)
        query_at = torch.arange(total - steps, total, device=q.device)[:, None]
        allowed = key_at <= query_at
        if window is not None:
            allowed = allowed & (key_at > query_at - window)
        # [B, L] real keys per row -> [B, 1, ..., 1, 1, L] beside [t, L]: the rows' padding, joined by DecodeState.cat
        real = keep.reshape(keep.shape[0], *(1,) * (q.dim() - 2), total)
        out = runtime.attention(q, keys, values, allowed & real, None, False, None, False, scale, groups)
    if window is not None and keys.shape[-2] > window:
        keys, values, keep = keys[..., -window:, :], values[..., -window:, :], keep[:, -window:]
    call.put(key, "kv_cache", (keys, values, keep), (*batch_dims, 0))
    return out


def causal_conv(call: DecodeCall, key, batch_dims, width, x, weight, bias, dilation, groups):
    """A causal 1-D convolution of the new positions, its left padding the previous call's last `width` inputs."""
    entry = call.get(key)
    before = entry.tensors[0] if entry is not None else x.new_zeros(*x.shape[:-2], width, x.shape[-1])
    full = torch.cat([before, x], dim=-2)
    out = runtime.conv_channels_last(full, weight, bias, 1, (1,), (0,), dilation, groups, False)
    call.put(key, "conv_window", (full[..., full.shape[-2] - width:, :],), batch_dims)
    return out


def running_total(call: DecodeCall, key, batch_dims, x, fn, dim):
    """cumsum / cumprod along the axis, continued from the previous call's last total."""
    out = torch.cumsum(x, dim) if fn == "sum" else torch.cumprod(x, dim)
    entry = call.get(key)
    if entry is not None:
        out = out + entry.tensors[0] if fn == "sum" else out * entry.tensors[0]
    call.put(key, "running_total", (out.narrow(dim, out.shape[dim] - 1, 1),), batch_dims)
    return out


def rope(call: DecodeCall, x, theta, rotary_dim):
    """Rotary embedding at the new positions' numbers (a prefill's are 0..t-1)."""
    return runtime.rope(x, call.positions(x.device), theta, rotary_dim)


def shift(call: DecodeCall, key, batch_dims, x, dim, steps, value, fill=None):
    """A token shift of the new positions, the previous call's last `steps` inputs (a prefill: the fill) before them."""
    entry = call.get(key)
    before = entry.tensors[0] if entry is not None else runtime.shift_fill(x, dim, steps, value, fill)
    full = torch.cat([before, x], dim=dim)
    call.put(key, "shift", (full.narrow(dim, full.shape[dim] - steps, steps),), batch_dims)
    return full.narrow(dim, 0, x.shape[dim])
