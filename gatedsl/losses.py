"""Auxiliary losses computed from a compiled model's recorded values (`model.aux`), as the field's trainers do."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def load_balancing_loss(router_logits: Mapping[str, Tensor] | Sequence[Tensor], top_k: int,
                        attention_mask: Tensor | None = None) -> Tensor:
    """transformers' `load_balancing_loss_func` (the Switch Transformer's loss, as Mixtral and Qwen-MoE train with it):
    E · Σ_i f_i P_i, pooled over every layer's tokens (their router logits concatenated, not a sum of per-layer
    losses), f_i the share of the tokens' top-k assignments that went to expert i (counted k per token), P_i the mean
    router probability of expert i; tokens where `attention_mask` ([batch, time], 0 at padding) is 0 are left out.

    `router_logits` is a model's aux dict (every entry named `router_logits`, as std.moe's MixtralMoE and Qwen3NextMoE
    record them, in call order) or the logits themselves, each [..., experts] with the mask's batch and time first.
    Multiply by the config's router_aux_loss_coef and add to the task's loss, as MixtralForCausalLM does.
    """
    if isinstance(router_logits, Mapping):
        router_logits = [v for k, v in router_logits.items() if k.rsplit(".", 1)[-1] == "router_logits"]
    if not router_logits:
        raise ValueError("no router logits: record them (record_logits=true) and pass model.aux after a call")
    experts = router_logits[0].shape[-1]
    if any(logits.shape[-1] != experts for logits in router_logits):
        raise ValueError(f"the layers' routers differ in their number of experts: "
                         f"{sorted({logits.shape[-1] for logits in router_logits})}")
    if not 0 < top_k <= experts:
        raise ValueError(f"top_k must be in 1..{experts}, got {top_k}")
    rows = [logits.reshape(-1, experts) for logits in router_logits]
    probs = torch.softmax(torch.cat(rows), dim=-1)                             # [layers · tokens, experts]
    chosen = torch.topk(probs, top_k, dim=-1).indices
    assigned = torch.zeros_like(probs).scatter_add_(-1, chosen, torch.ones_like(chosen, dtype=probs.dtype))
    if attention_mask is None:
        weight = torch.ones_like(probs[:, :1])
    else:
        if any(r.shape[0] != attention_mask.numel() for r in rows):
            raise ValueError(f"attention_mask {list(attention_mask.shape)} does not cover each layer's "
                             f"{rows[0].shape[0]} tokens")
        weight = attention_mask.reshape(-1, 1).to(probs.dtype).repeat(len(rows), 1)
    total = weight.sum()
    tokens_per_expert = (assigned * weight).sum(0) / total                   # f_i (summing to k)
    prob_per_expert = (probs * weight).sum(0) / total                        # P_i
    return experts * (tokens_per_expert * prob_per_expert).sum()
