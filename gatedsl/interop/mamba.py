"""Mappings between transformers' Mamba (models/mamba/modeling_mamba.py) and std.linear_rnn's Mamba, zoo/mamba.gate."""

from __future__ import annotations

from gatedsl.interop.mapping import Mapping, rename, split, tie


def mamba_from_transformers(dt_rank: int, state_size: int, *, bias: bool = False,
                            conv_bias: bool = True) -> Mapping:
    """A `MambaMixer` (its keys) and a std `Mamba` block instance: in_proj is our [u, z] projections stacked,
    x_proj our [δ, B, C] projections stacked (R, N and N rows); the rest are renames."""
    rules = [
        split("in_proj.weight", ["u.x_proj.weight", "z.x_proj.weight"]),
        rename("conv1d.weight", "u.conv.weight"),
        split("x_proj.weight", ["dt.u_proj.weight", "B_t.u_proj.weight", "C_t.u_proj.weight"],
              sizes=[dt_rank, state_size, state_size]),
        rename("dt_proj.weight", "dt.proj.weight"),
        rename("dt_proj.bias", "dt.proj.bias"),
        rename("A_log", "A_log"),
        rename("D", "D_skip"),
        rename("out_proj.weight", "out.proj.weight"),
    ]
    if bias:
        rules += [split("in_proj.bias", ["u.x_proj.bias", "z.x_proj.bias"]), rename("out_proj.bias", "out.proj.bias")]
    if conv_bias:
        rules.append(rename("conv1d.bias", "u.conv.bias"))
    return Mapping(rules)


def mamba_lm_from_transformers(layers: int, dt_rank: int, state_size: int, *, bias: bool = False,
                               conv_bias: bool = True, tied: bool = True) -> Mapping:
    """A `MambaForCausalLM` and specs/zoo/mamba.gate: the embeddings (and, tied, the head) are our table E, each
    `backbone.layers.i` its norm and a Mamba block, then norm_f; untied, lm_head is our own."""
    mapping = Mapping([rename("backbone.norm_f.weight", "norm_f.norm.weight")])
    if tied:
        mapping += Mapping([tie(["backbone.embeddings.weight", "lm_head.weight"], "E")])
    else:
        mapping += Mapping([rename("backbone.embeddings.weight", "E"),
                            rename("lm_head.weight", "lm_head.norm_f_proj.weight")])
    block = mamba_from_transformers(dt_rank, state_size, bias=bias, conv_bias=conv_bias)
    for i in range(layers):
        mapping += Mapping([rename(f"backbone.layers.{i}.norm.weight", f"layers.{i}.h.norm.weight")])
        mapping += block.under(f"layers.{i}.Mamba", f"backbone.layers.{i}.mixer")
    return mapping

