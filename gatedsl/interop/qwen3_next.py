"""The mapping between transformers' Qwen3NextForCausalLM (models/qwen3_next/modeling_qwen3_next.py) and
specs/zoo/qwen3_next.gate, composed from the std blocks' mappings."""

from __future__ import annotations

from torch import Tensor

from gatedsl.interop.attention import gated_attention_from_qwen3_next
from gatedsl.interop.gated_deltanet import gated_deltanet_from_qwen3_next
from gatedsl.interop.mapping import Mapping, MappingError, Rule, rename, transform
from gatedsl.interop.mlp import swiglu_from_llama
from gatedsl.interop.moe import qwen3_next_moe_from_transformers


def qwen3_next_from_transformers(layers: int, *, heads: int, head_dim: int, linear_key_heads: int,
                                 linear_key_head_dim: int, linear_value_heads: int, linear_value_head_dim: int,
                                 experts: int, full_attention_interval: int = 4, decoder_sparse_step: int = 1,
                                 attention_gate: str = "elementwise", bias: bool = False,
                                 tied: bool = False) -> Mapping:
    """A `Qwen3NextForCausalLM` of these sizes (its config's num_hidden_layers, num_attention_heads, head_dim,
    linear_num_key_heads, linear_key_head_dim, linear_num_value_heads, linear_value_head_dim, num_experts,
    full_attention_interval, decoder_sparse_step, attention_bias, tie_word_embeddings) and the zoo spec compiled with
    them and `attention_gate`: each `model.layers.i` its two norms, its gated attention or gated delta net (on the
    spec's schedule) and its sparse mixture or MLP; the embeddings, the final norm and the head.

    attention_gate="none" loads a Qwen3-Next checkpoint into the spec with its attention output gate switched off:
    the gate's half of each q_proj (every head's gate rows) is dropped on import, on purpose; such a model does not
    export, as Qwen3NextAttention has no ungated form. "headwise" has no Qwen3-Next checkpoint to load.
    """
    if attention_gate not in ("elementwise", "none"):
        raise MappingError(f"Qwen3NextAttention's gate is elementwise: a {attention_gate!r} gate has no checkpoint")
    mapping = Mapping([rename("model.norm.weight", "norm.norm.weight")])
    if tied:
        mapping += Mapping([transform(["model.embed_tokens.weight", "lm_head.weight"], "E", _one_table,
                                      lambda ours: [ours[0], ours[0]], "tied embedding and head")])
    else:
        mapping += Mapping([rename("model.embed_tokens.weight", "E"),
                            rename("lm_head.weight", "lm_head.norm_proj.weight")])
    attention = (gated_attention_from_qwen3_next(bias=bias) if attention_gate == "elementwise"
                 else _without_the_gate(gated_attention_from_qwen3_next(gate="none", bias=bias), heads, head_dim))
    delta_net = gated_deltanet_from_qwen3_next(linear_key_heads, linear_key_head_dim, linear_value_heads,
                                               linear_value_head_dim)
    moe, mlp = qwen3_next_moe_from_transformers(experts), swiglu_from_llama()
    for i in range(layers):
        ours, ref = f"layers.{i}", f"model.layers.{i}"
        mapping += Mapping([rename(f"{ref}.{norm}.weight", f"{ours}.{norm}.norm.weight")
                            for norm in ("input_layernorm", "post_attention_layernorm")])
        if (i + 1) % full_attention_interval == 0:  # Qwen3NextConfig's layer_types
            mapping += attention.under(f"{ours}.gated_attention", f"{ref}.self_attn")
        else:
            mapping += delta_net.under(f"{ours}.GatedDeltaNet", f"{ref}.linear_attn")
        if experts > 0 and (i + 1) % decoder_sparse_step == 0:  # Qwen3NextDecoderLayer's choice of mlp
            mapping += moe.under(f"{ours}.Qwen3NextMoE", f"{ref}.mlp")
        else:
            mapping += mlp.under(f"{ours}.SwiGLUExpert", f"{ref}.mlp")
    return mapping


def _without_the_gate(ungated: Mapping, heads: int, head_dim: int) -> Mapping:
    """`ungated` (Qwen3Attention's layout: q_proj holds the queries alone) reading Qwen3-Next's q_proj, whose rows
    are each head's head_dim query rows then its head_dim gate rows: the gate rows are dropped."""
    def queries(tensors: list[Tensor]) -> list[Tensor]:
        (fused,) = tensors
        if fused.shape[0] != 2 * heads * head_dim:
            raise MappingError(f"q_proj has {fused.shape[0]} rows, not a query and a gate for {heads} heads of "
                               f"{head_dim}: {2 * heads * head_dim}")
        return [fused.unflatten(0, (heads, 2 * head_dim))[:, :head_dim].flatten(0, 1)]

    def no_gate(tensors: list[Tensor]) -> list[Tensor]:
        raise MappingError("the attention output gate was dropped on import: Qwen3NextAttention has no place for "
                           "a model without it")

    def reading_the_gated(rule: Rule) -> Rule:
        if not rule.ref[0].startswith("q_proj."):
            return rule
        return transform(rule.ref[0], rule.ours[0], queries, no_gate, "each head's query rows; its gate rows dropped")

    return Mapping(reading_the_gated(rule) for rule in ungated.rules)


def _one_table(tensors: list[Tensor]) -> list[Tensor]:
    embeddings, head = tensors
    if not (embeddings is head or embeddings.equal(head)):
        raise MappingError("lm_head.weight differs from model.embed_tokens.weight: the checkpoint is not tied "
                           "(compile the spec with tie_word_embeddings=false)")
    return [embeddings]
