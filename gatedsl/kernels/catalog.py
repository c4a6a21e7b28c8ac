"""The fused ops and their kernels: importing a package below registers its FusedOp and Kernels (torch-free)."""

import importlib

# One package per fused op under gatedsl/kernels/, in the order the passes that create them run.
FUSED_OP_PACKAGES: tuple[str, ...] = ("moe_dispatch", "projection_group", "gate_chain", "linear_scan", "delta_rule")

for _package in FUSED_OP_PACKAGES:
    importlib.import_module(f"gatedsl.kernels.{_package}")
