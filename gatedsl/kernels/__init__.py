"""Implementations of the fused ops: one package per op, each kernel beside the plain-PyTorch reference it must equal.

`registry.py` declares how a kernel is chosen; `catalog.py` lists the fused ops.
"""
