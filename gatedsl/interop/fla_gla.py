"""Mappings of std.linear_rnn's GLA family from flash-linear-attention's layers (fla 0.6, fla/layers/), and of
specs/zoo/gla.gate from fla's GLAForCausalLM (fla/models/gla/).

Each block mapping is relative to the block instance on our side (`GLA.`) and to the fla layer on the other
(`model.layers.0.attn.`); the options name the parts that exist only in some configurations, as fla's own
constructor arguments do. Our statement `q` holds the projection `q.x_proj` and, with short convolutions, the
convolution of its second assignment, `q_1.conv`.
"""

from __future__ import annotations

from gatedsl.interop.mapping import Mapping, Rule, rename, transform
from gatedsl.interop.mlp import swiglu_from_llama


def _short_convs(names: str, conv_bias: bool) -> list[Rule]:
    """fla's ShortConvolution `{n}_conv1d` (an nn.Conv1d of weight [C, 1, width]) of each projection named."""
    rules = []
    for n in names:
        rules.append(rename(f"{n}_conv1d.weight", f"{n}_1.conv.weight"))
        if conv_bias:
            rules.append(rename(f"{n}_conv1d.bias", f"{n}_1.conv.bias"))
    return rules


def _output(fused_norm: bool, output_gate: bool) -> list[Rule]:
    """The per-head norm (fla's g_norm_swish_gate when fused with the gate, else g_norm), the gate and o_proj."""
    norm = "g_norm_swish_gate" if fused_norm and output_gate else "g_norm"
    rules = [rename(f"{norm}.weight", "o_norm.norm.weight")]
    if output_gate:
        return rules + [rename("g_proj.weight", "g.x_proj.weight"), rename("o_proj.weight", "y.proj.weight")]
    return rules + [rename("o_proj.weight", "y.o_norm_proj.weight")]


def gla_from_fla(short_conv: bool = False, conv_bias: bool = False, output_gate: bool = True,
                 fused_norm: bool = True) -> Mapping:
    """std.linear_rnn's GLA (norm="rms", no gate bias) from fla's GatedLinearAttention: q/k/v_proj, gk_proj's two
    linears (the low-rank decay), g_proj, the per-head norm and o_proj; `fused_norm` is fla's fuse_norm."""
    return Mapping([
        rename("q_proj.weight", "q.x_proj.weight"),
        rename("k_proj.weight", "k.x_proj.weight"),
        rename("v_proj.weight", "v.x_proj.weight"),
        *(_short_convs("qkv", conv_bias) if short_conv else []),
        rename("gk_proj.0.weight", "alpha.x_proj.weight"),
        rename("gk_proj.1.weight", "alpha.proj.weight"),
        rename("gk_proj.1.bias", "alpha.proj.bias"),
        *_output(fused_norm, output_gate),
    ])


def simple_gla_from_fla(short_conv: bool = True, conv_bias: bool = False, fused_norm: bool = True) -> Mapping:
    """std.linear_rnn's SimpleGLA from fla's SimpleGatedLinearAttention: q/k/v_proj with their short convolutions
    (on by default, as fla's), gk_proj (the scalar decay per head, with its bias), g_proj, the norm and o_proj."""
    return Mapping([
        rename("q_proj.weight", "q.x_proj.weight"),
        rename("k_proj.weight", "k.x_proj.weight"),
        rename("v_proj.weight", "v.x_proj.weight"),
        *(_short_convs("qkv", conv_bias) if short_conv else []),
        rename("gk_proj.weight", "gamma.x_proj.weight"),
        rename("gk_proj.bias", "gamma.x_proj.bias"),
        *_output(fused_norm, True),
    ])


def retnet_from_fla(short_conv: bool = False, conv_bias: bool = False, output_gate: bool = True,
                    fused_norm: bool = True) -> Mapping:
    """std.linear_rnn's RetNet (norm="rms") from fla's MultiScaleRetention: q/k/v_proj, g_proj, the per-head norm
    and o_proj (its rotary frequencies are a buffer outside the state dict, recomputed by `rope` from `base`)."""
    return Mapping([
        rename("q_proj.weight", "q.x_proj.weight"),
        rename("k_proj.weight", "k.x_proj.weight"),
        rename("v_proj.weight", "v.x_proj.weight"),
        *(_short_convs("qkv", conv_bias) if short_conv else []),
        *_output(fused_norm, output_gate),
    ])


def hgrn_from_fla(short_conv: bool = False, conv_bias: bool = False) -> Mapping:
    """std.linear_rnn's HGRN from fla's HGRNAttention: i/f/g_proj, its gated norm g_norm over the whole width, and
    o_proj (the lower bound is an input of the block, as it is an argument of fla's forward)."""
    return Mapping([
        rename("i_proj.weight", "i.x_proj.weight"),
        rename("f_proj.weight", "f.x_proj.weight"),
        *(_short_convs("if", conv_bias) if short_conv else []),
        rename("g_proj.weight", "g.x_proj.weight"),
        rename("g_norm.weight", "y.norm.weight"),
        rename("o_proj.weight", "y.proj.weight"),
    ])


def gla_lm_from_fla(layers: int, tie: bool = False, short_conv: bool = False, conv_bias: bool = False,
                    output_gate: bool = True) -> Mapping:
    """specs/zoo/gla.gate from fla's GLAForCausalLM (fuse_norm as its default, no attnres, no hybrid attention
    layers): the embeddings, each GLABlock's attn_norm, GLA layer, mlp_norm and GatedMLP (std.mlp's SwiGLU),
    the final norm and lm_head, or with `tie` (tie_word_embeddings) the one table both read."""
    model = Mapping([rename("model.norm.weight", "logits.norm.weight")])
    if tie:
        model += Mapping([transform(("model.embeddings.weight", "lm_head.weight"), "E",
                                    lambda ts: [ts[0]], lambda ts: [ts[0], ts[0]], "tied embeddings")])
    else:
        model += Mapping([rename("model.embeddings.weight", "h.embedding.weight"),
                          rename("lm_head.weight", "logits.proj.weight")])
    for i in range(layers):
        ref, ours = f"model.layers.{i}", f"layers.{i}"
        model += Mapping([rename(f"{ref}.attn_norm.weight", f"{ours}.h.norm.weight"),
                          rename(f"{ref}.mlp_norm.weight", f"{ours}.h_1.norm.weight")])
        model += gla_from_fla(short_conv, conv_bias, output_gate).under(f"{ours}.GLA", f"{ref}.attn")
        model += swiglu_from_llama().under(f"{ours}.SwiGLU", f"{ref}.mlp")
    return model
