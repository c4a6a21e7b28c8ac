"""The compilation unit every pass reads and extends: the program, the chosen model, its graph and its counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gatedsl.frontend import ast
from gatedsl.frontend.loader import Program
from gatedsl.ir.graph import Graph
from gatedsl.ir.types import Poly, TensorType


@dataclass
class Limits:
    max_nodes: int = 200_000  # ops plus loop iterations: bounds any expansion
    max_params: int = 2**31  # learned elements in the whole model


@dataclass(frozen=True)
class Target:
    """Where the compiled model is meant to run: kernel selection reports its choices for this (and re-checks each call)."""

    device: str = "cpu"
    dtype: str = "float32"
    training: bool = True


@dataclass
class ModelIR:
    program: Program
    model: ast.Definition
    overrides: dict[str, Any]
    limits: Limits = field(default_factory=Limits)
    opt_level: int = 2  # -O: 0 runs the analysis passes only, higher levels add the optimisations
    target: Target = field(default_factory=Target)
    standalone: bool = False  # for `-o`: no pass that leaves ops needing gatedsl's kernels at run time
    # Filled by elaborate:
    graph: Graph | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, TensorType] = field(default_factory=dict)
    # model-level `require`s that read param_count()/flop_count(), each with the names bound where it stands
    budget_requires: list[tuple[ast.Require, dict[str, Any]]] = field(default_factory=list)
    # Filled by the counting passes:
    param_count: int = 0
    params_by_block: dict[str, int] = field(default_factory=dict)
    flops: Poly = field(default_factory=Poly)
    # Filled by select_kernels: the implementation of every fused op and scan, and why (gatedsl.kernels.registry.Choice)
    kernels: list[Any] = field(default_factory=list)
