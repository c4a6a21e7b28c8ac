"""Mappings of std.linear_rnn's GatedDeltaNet from fla's GatedDeltaNet layer and from transformers'
Qwen3NextGatedDeltaNet."""

from __future__ import annotations

import torch

from gatedsl.interop.mapping import Mapping, MappingError, rename, split, transform


def gated_deltanet_from_fla(gate: bool = True, conv_bias: bool = False) -> Mapping:
    """GatedDeltaNet from fla's `fla.layers.GatedDeltaNet` (use_gate=`gate`, conv_bias=`conv_bias`, use_short_conv):
    every tensor is the same, under another name."""
    rules = [
        rename("q_proj.weight", "q.x_proj.weight"),
        rename("k_proj.weight", "k.x_proj.weight"),
        rename("v_proj.weight", "v.x_proj.weight"),
        rename("a_proj.weight", "alpha.x_proj.weight"),
        rename("b_proj.weight", "beta.x_proj.weight"),
        rename("A_log", "A_log"),
        rename("dt_bias", "dt_bias"),
        rename("o_norm.weight", "o_norm.norm.weight"),
        rename("o_proj.weight", "y.o_norm_proj.weight"),
    ]
    for name in "qkv":
        rules.append(rename(f"{name}_conv1d.weight", f"{name}.conv.weight"))
        if conv_bias:
            rules.append(rename(f"{name}_conv1d.bias", f"{name}.conv.bias"))
    if gate:
        rules.append(rename("g_proj.weight", "g.x_proj.weight"))
    return Mapping(rules)


def gated_deltanet_from_qwen3_next(heads: int, head_dim: int, v_heads: int, v_head_dim: int) -> Mapping:
    """GatedDeltaNet(heads, head_dim, v_heads, v_head_dim, norm_eps=1e-6, init="qwen3_next") from transformers'
    `Qwen3NextGatedDeltaNet` (linear_num_key_heads, linear_key_head_dim, linear_num_value_heads,
    linear_value_head_dim of its config).

    Its projections are fused and grouped by key head (its `fix_query_key_value_ordering`): `in_proj_qkvz` holds, for
    each key head h in turn, that head's q rows, its k rows, then the v rows and the z (output gate) rows of the
    value heads it serves (h·r … h·r + r − 1, r = v_heads / heads); `in_proj_ba` holds, for each key head, the β
    rows then the α rows of those value heads. Its one `conv1d` runs over the channels [q | k | v] concatenated.
    """
    if heads <= 0 or v_heads % heads:
        raise MappingError(f"v_heads ({v_heads}) must be a multiple of heads ({heads})")
    group = v_heads // heads
    qkvz = [head_dim, head_dim, group * v_head_dim, group * v_head_dim]  # one key head's rows of in_proj_qkvz

    def ungroup(parts: list[int]):
        """The fused weight [heads·Σparts, D] as one [·, D] weight per part, each the parts of every head in turn."""
        def to_ours(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            (fused,) = tensors
            by_head = fused.reshape(heads, sum(parts), fused.shape[-1])
            return [p.reshape(-1, fused.shape[-1]) for p in by_head.split(parts, dim=1)]

        def to_ref(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            by_head = [t.reshape(heads, -1, t.shape[-1]) for t in tensors]
            return [torch.cat(by_head, dim=1).reshape(-1, tensors[0].shape[-1])]

        return to_ours, to_ref

    key_dim, value_dim = heads * head_dim, v_heads * v_head_dim
    return Mapping([
        transform("in_proj_qkvz.weight", ["q.x_proj.weight", "k.x_proj.weight", "v.x_proj.weight", "g.x_proj.weight"],
                  *ungroup(qkvz), what=f"grouped by key head: q, k, v, z rows {qkvz} per head"),
        transform("in_proj_ba.weight", ["beta.x_proj.weight", "alpha.x_proj.weight"], *ungroup([group, group]),
                  what=f"grouped by key head: b, a rows {[group, group]} per head"),
        split("conv1d.weight", ["q.conv.weight", "k.conv.weight", "v.conv.weight"],
              sizes=[key_dim, key_dim, value_dim]),
        rename("A_log", "A_log"),
        rename("dt_bias", "dt_bias"),
        rename("norm.weight", "o_norm.norm.weight"),
        rename("out_proj.weight", "y.o_norm_proj.weight"),
    ])
