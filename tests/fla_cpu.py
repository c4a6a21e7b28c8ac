"""fla's layers and models run on the CPU in float64, as references: their Triton pieces swapped for fla's own
plain-PyTorch forms, and fla's casts to float32 raised to float64.

Everything fla's layer classes compute themselves (projections, head layout, gate logits, short convolutions'
weights, norms' weights, the residual wiring of its models) stays fla's code. What cannot run here is swapped,
by name in the module that calls it (`patch_fla`), for the plain-PyTorch form fla ships beside it:
- the recurrences (fla/ops/*/chunk.py, fused_recurrent.py: Triton) -> fla/ops/*/naive.py, the loops over time fla
  tests its kernels against (naive_recurrent_gla, naive_recurrent_simple_gla, naive_retention, naive_recurrent_hgrn);
- FusedRMSNormGated's Triton kernel -> fla.modules.norm.layernorm_gated.rms_norm_ref (norm, then x SiLU(gate));
- RMSNorm's Triton kernel -> fla.modules.norm.layernorm.rms_norm_ref (with its residual and prenorm);
- RotaryEmbedding's Triton kernel -> fla.modules.rotary.ops.rotary_embedding_ref;
- ShortConvolution's Triton kernel -> the nn.Conv1d it subclasses (its padding of width − 1, cut to T), then its
  activation;
- fla's swish, swiglu and swiglu_linear (Triton, no plain form in fla) -> their documented math, SiLU(x),
  SiLU(x) ⊙ y and (SiLU(x) ⊙ y) Wᵀ + b (swish is looked up in fla's ACT2FN when a layer is built).
fla's naive ops and norms cast to float32 (`.float()`, dtype=torch.float32) to compute; `Float64` is a torch
function mode that turns those casts into float64, so the reference runs in float64 and agrees to ~1e-15.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class Float64(TorchFunctionMode):
    """Every cast to float32 made while it is active (`.float()`, `.to(torch.float32)`, `dtype=torch.float32`) is
    made to float64 instead."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
        if func is torch.Tensor.float:
            return args[0].to(torch.float64)
        if func is torch.Tensor.to:
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


def _gla(q, k, v, gk=None, g=None, initial_state=None, output_final_state=False, **_):
    from fla.ops.gla.naive import naive_recurrent_gla

    return naive_recurrent_gla(q, k, v, gk if gk is not None else g, initial_state, output_final_state)


def _simple_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, **_):
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla

    return naive_recurrent_simple_gla(q, k, v, g, scale, initial_state, output_final_state)


def _retention(q, k, v, initial_state=None, output_final_state=False, **_):
    from fla.ops.retention.naive import naive_retention

    assert initial_state is None and not output_final_state, "naive_retention has no state"
    o = naive_retention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))   # it takes [B, H, T, d]
    return o.transpose(1, 2), None


def _hgrn(x, g, initial_state=None, output_final_state=False, **_):
    from fla.ops.hgrn.naive import naive_recurrent_hgrn

    return naive_recurrent_hgrn(x, g, initial_state, output_final_state)


def _rms_norm_gated(x, g, weight, bias, activation="swish", residual=None, prenorm=False, residual_in_fp32=False,
                    eps=1e-6):
    from fla.modules.norm.layernorm_gated import rms_norm_ref

    assert activation in ("swish", "silu") and residual is None and not prenorm
    return rms_norm_ref(x, weight, bias, z=g, eps=eps, norm_before_gate=True, upcast=False)


def _rms_norm(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False):
    from fla.modules.norm.layernorm import rms_norm_ref

    return rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=False)


def _rotary_embedding(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, **_):
    from fla.modules.rotary.ops import rotary_embedding_ref

    assert cu_seqlens is None and isinstance(seqlen_offsets, int)
    time = x.shape[1]
    return rotary_embedding_ref(x, cos[seqlen_offsets:seqlen_offsets + time],
                                sin[seqlen_offsets:seqlen_offsets + time], interleaved)


def _short_convolution(self, x, residual=None, mask=None, cache=None, output_final_state=False, cu_seqlens=None,
                       **_):
    assert residual is None and mask is None and cache is None and cu_seqlens is None
    y = nn.Conv1d.forward(self, x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)   # [B, T, D], causal
    return (F.silu(y) if self.activation in ("silu", "swish") else y), None


def _swiglu(x, y):
    return F.silu(x) * y


def _swiglu_linear(x, y, weight, bias):
    return F.linear(F.silu(x) * y, weight, bias)


def patch_fla(monkeypatch) -> None:
    """Swap fla's Triton pieces for their plain forms (see the module's docstring), for one test."""
    import fla.layers.gla
    import fla.layers.hgrn
    import fla.layers.multiscale_retention
    import fla.layers.simple_gla
    import fla.modules.activations
    import fla.modules.mlp
    import fla.modules.norm.fused_norm_gate
    import fla.modules.norm.layernorm
    import fla.modules.rotary.ops
    from fla.modules import ShortConvolution

    for name in ("chunk_gla", "fused_chunk_gla", "fused_recurrent_gla"):
        monkeypatch.setattr(fla.layers.gla, name, _gla)
    for name in ("chunk_simple_gla", "fused_recurrent_simple_gla"):
        monkeypatch.setattr(fla.layers.simple_gla, name, _simple_gla)
    for name in ("chunk_retention", "fused_chunk_retention", "fused_recurrent_retention"):
        monkeypatch.setattr(fla.layers.multiscale_retention, name, _retention)
    for name in ("chunk_hgrn", "fused_recurrent_hgrn"):
        monkeypatch.setattr(fla.layers.hgrn, name, _hgrn)
    monkeypatch.setattr(fla.layers.hgrn, "swiglu", _swiglu)
    monkeypatch.setattr(fla.modules.norm.fused_norm_gate, "rms_norm_gated", _rms_norm_gated)
    monkeypatch.setattr(fla.modules.norm.layernorm, "rms_norm", _rms_norm)
    monkeypatch.setattr(fla.modules.rotary.ops, "rotary_embedding", _rotary_embedding)
    monkeypatch.setattr(ShortConvolution, "forward", _short_convolution)
    monkeypatch.setitem(fla.modules.activations.ACT2FN, "swish", F.silu)
    monkeypatch.setattr(fla.modules.mlp, "swiglu", _swiglu)
    monkeypatch.setattr(fla.modules.mlp, "swiglu_linear", _swiglu_linear)
