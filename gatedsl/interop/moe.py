"""Mappings between transformers' sparse mixtures (Mixtral, Qwen3-Next) and std.moe's MixtralMoE / Qwen3NextMoE."""

from __future__ import annotations

import torch

from gatedsl.interop.mapping import Mapping, Rule, rename, transform
from gatedsl.interop.mlp import swiglu_from_llama


def mixtral_moe_from_transformers(experts: int, *, fused: bool = True) -> Mapping:
    """A `MixtralSparseMoeBlock` and a std `MixtralMoE` instance: `gate.weight` is the router; with `fused` (the
    layout of transformers 5) experts.gate_up_proj [E, 2·hidden, D] stacks each expert's [W₁; W₃] and
    experts.down_proj [E, D, hidden] its W₂; otherwise experts.{i}.w1/w3/w2.weight, the per-expert layout of
    transformers 4 and of Mixtral's released checkpoints."""
    return Mapping([rename("gate.weight", "router.x_proj.weight"), *_routed_experts(experts, fused)])


def qwen3_next_moe_from_transformers(experts: int) -> Mapping:
    """A `Qwen3NextSparseMoeBlock` and a std `Qwen3NextMoE` instance: the router, the fused routed experts (as
    Mixtral's), the shared expert (a Qwen3NextMLP: gate_proj, up_proj, down_proj) and its sigmoid gate."""
    return Mapping([
        rename("gate.weight", "router.x_proj.weight"),
        *_routed_experts(experts, fused=True),
        rename("shared_expert_gate.weight", "shared_expert_gate.x_proj.weight"),
    ]) + swiglu_from_llama().under("shared_expert", "shared_expert")


def _routed_experts(experts: int, fused: bool) -> list[Rule]:
    expert = [f"experts.{i}.expert" for i in range(experts)]
    if not fused:
        return [rule for i, e in enumerate(expert) for rule in (
            rename(f"experts.{i}.w1.weight", f"{e}.g.x_proj.weight"),
            rename(f"experts.{i}.w3.weight", f"{e}.v.x_proj.weight"),
            rename(f"experts.{i}.w2.weight", f"{e}.y.proj.weight"))]
    gate_up = [key for e in expert for key in (f"{e}.g.x_proj.weight", f"{e}.v.x_proj.weight")]
    return [
        transform("experts.gate_up_proj", gate_up,
                  lambda ref: [half for row in ref[0].unbind(0) for half in row.chunk(2, 0)],
                  lambda ours: [torch.stack([torch.cat(ours[j:j + 2]) for j in range(0, len(ours), 2)])],
                  "each expert's [W₁; W₃] stacked"),
        transform("experts.down_proj", [f"{e}.y.proj.weight" for e in expert],
                  lambda ref: list(ref[0].unbind(0)), lambda ours: [torch.stack(ours)], "each expert's W₂ stacked"),
    ]
