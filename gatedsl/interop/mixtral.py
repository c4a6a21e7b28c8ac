"""The mapping between transformers' MixtralForCausalLM (models/mixtral/modeling_mixtral.py) and zoo/mixtral.gate."""

from __future__ import annotations

from gatedsl.interop.attention import self_attention_from_llama
from gatedsl.interop.mapping import Mapping, rename, tie
from gatedsl.interop.moe import mixtral_moe_from_transformers


def mixtral_from_transformers(layers: int, experts: int, *, tied: bool = False, fused: bool = True) -> Mapping:
    """A `MixtralForCausalLM` and specs/zoo/mixtral.gate: the embeddings are our table E (tied, lm_head too), each
    `model.layers.i` its two norms, a self_attention and a MixtralMoE, then the final norm and, untied, lm_head.

    `fused` is transformers 5's layout of the experts (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`);
    otherwise the mixture is `block_sparse_moe` with per-expert w1/w2/w3, the layout of transformers 4 and of
    Mixtral's released checkpoints.
    """
    mapping = Mapping([rename("model.norm.weight", "norm.norm.weight")])
    if tied:
        mapping += Mapping([tie(["model.embed_tokens.weight", "lm_head.weight"], "E")])
    else:
        mapping += Mapping([rename("model.embed_tokens.weight", "E"),
                            rename("lm_head.weight", "lm_head.norm_proj.weight")])
    attention = self_attention_from_llama()
    moe = mixtral_moe_from_transformers(experts, fused=fused)
    for i in range(layers):
        ref = f"model.layers.{i}"
        mapping += Mapping([rename(f"{ref}.{norm}.weight", f"layers.{i}.{norm}.norm.weight")
                            for norm in ("input_layernorm", "post_attention_layernorm")])
        mapping += attention.under(f"layers.{i}.self_attention", f"{ref}.self_attn")
        mapping += moe.under(f"layers.{i}.MixtralMoE", f"{ref}.mlp" if fused else f"{ref}.block_sparse_moe")
    return mapping
