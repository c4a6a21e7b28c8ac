"""Mappings of std.attention's blocks from the attention layers of transformers' models."""

from __future__ import annotations

from gatedsl.interop.mapping import Mapping, Rule, rename


def self_attention_from_llama(bias: bool = False) -> Mapping:
    """std.attention's self_attention from a Llama-style attention layer (LlamaAttention, MistralAttention,
    MixtralAttention: q_proj, k_proj, v_proj and o_proj, with biases where `bias`, as Llama's attention_bias=True)."""
    return Mapping(_projections("q.x_proj", bias))


def gated_attention_from_qwen3_next(gate: str = "elementwise", qk_norm: bool = True, bias: bool = False) -> Mapping:
    """std.attention's gated_attention from Qwen3NextAttention (gate "elementwise"), or from Qwen3Attention (gate
    "none", zero_centered=false), with the block's `gate`, `qk_norm` and `bias`.

    Qwen3-Next's q_proj emits each head's query and then its gate, head after head: the layout of the block's `qg`
    projection, so its weight moves as it is (a "headwise" gate keeps that layout, with one gate row per head).
    """
    rules = _projections("q.x_proj" if gate == "none" else "qg.x_proj", bias)
    if qk_norm:
        rules += [rename("q_norm.weight", "q_norm.norm.weight"), rename("k_norm.weight", "k_norm.norm.weight")]
    return Mapping(rules)


def _projections(queries: str, bias: bool) -> list[Rule]:
    """q_proj, k_proj, v_proj and o_proj, to the blocks' query projection (`queries`), k, v and y.o_proj."""
    ours = {"q": queries, "k": "k.x_proj", "v": "v.x_proj", "o": "y.o_proj"}
    leaves = ("weight", "bias") if bias else ("weight",)
    return [rename(f"{name}_proj.{leaf}", f"{path}.{leaf}") for leaf in leaves for name, path in ours.items()]
