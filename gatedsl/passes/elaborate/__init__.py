"""Elaborate: evaluate a model's AST with its parameters bound, inlining blocks, expanding repeats and ifs, into the graph IR with every shape inferred."""

from gatedsl.passes.elaborate.interpreter import (
    FLOAT32_MAX,
    INT64_MAX,
    MAX_DEPTH,
    MAX_INT_BITS,
    MAX_SYM_FACTORS,
    Elaborator,
    Frame,
    elaborate,
)
from gatedsl.passes.elaborate.memo import CallMemo
from gatedsl.passes.elaborate.parameters import bind_model_parameters, override_value, unknown_parameter
from gatedsl.passes.elaborate.signature import bind_signature, check_value_param, unify

__all__ = ["FLOAT32_MAX", "INT64_MAX", "MAX_DEPTH", "MAX_INT_BITS", "MAX_SYM_FACTORS", "CallMemo", "Elaborator",
           "Frame", "bind_model_parameters", "bind_signature", "check_value_param", "elaborate", "override_value",
           "unify", "unknown_parameter"]
