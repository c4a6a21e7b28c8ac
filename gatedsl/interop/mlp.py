"""Mappings of std.mlp's blocks from the MLPs of transformers' models."""

from __future__ import annotations

from gatedsl.interop.mapping import Mapping, rename


def swiglu_from_llama() -> Mapping:
    """std.mlp's SwiGLU from a Llama-style gated MLP (LlamaMLP, Qwen3NextMLP, MistralMLP: gate_proj, up_proj and
    down_proj without biases; y = down(SiLU(gate(x)) ⊙ up(x)))."""
    return Mapping([
        rename("gate_proj.weight", "g.x_proj.weight"),
        rename("up_proj.weight", "v.x_proj.weight"),
        rename("down_proj.weight", "y.proj.weight"),
    ])
