"""A model's parameters: their declared domains, and binding defaults and overrides (Python values or CLI strings) to values."""

from __future__ import annotations

import math
from typing import Any

from gatedsl.errors import LimitError, NameResolutionError, Note, SpecError, SpecTypeError
from gatedsl.frontend import ast
from gatedsl.ir.elaboration import Elaborating
from gatedsl.ir.values import Builtin
from gatedsl.passes.elaborate.signature import check_value_param


def bind_model_parameters(el: Elaborating, model: ast.Definition, overrides: dict[str, Any]) -> dict[str, Any]:
    """Values of every model parameter, defaults first and then overrides, each checked against its domain."""
    declared = {p.name: p for p in model.params}
    for p in model.params:
        if p.tensor is not None:
            raise SpecTypeError("a model takes tensors through `input` statements, not its signature", p.span,
                                help=f"write `input {p.name}: [...]` in the body")
    for name in overrides:
        if name not in declared:
            known = ", ".join(declared) or "none"
            raise NameResolutionError(f"model {model.name} has no parameter '{name}'", model.span,
                                      notes=[Note(f"its parameters are: {known}")])
    env = el.frame.env
    bound: dict[str, Any] = {}
    for p in model.params:
        if p.name in overrides:
            value = _static_value(_from_user(el, p, overrides[p.name]), p)
            span = p.span
        elif p.default is not None:
            value = el.eval(p.default)
            span = p.default.span
        else:
            raise SpecError(f"parameter '{p.name}' of model {model.name} has no default", p.span,
                            help=f"give it one, or pass -p {p.name}=VALUE")
        bound[p.name] = env[p.name] = check_value_param(el, p, value, span)
    return bound


def override_value(el: Elaborating, p: ast.Param, value: Any) -> Any:
    """One override as the model binds it: text read as for `-p NAME=VALUE`, then checked against the domain."""
    return check_value_param(el, p, _static_value(_from_user(el, p, value), p), p.span)


def _static_value(value: Any, p: ast.Param) -> Any:
    """An override must be a value a spec could have written: a finite number, a bool, a string, a block, or a
    list of those; anything else (None, a dict, a tensor, NaN) is rejected here rather than deep in elaboration."""
    if isinstance(value, (list, tuple)):
        return [_static_value(v, p) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecTypeError(f"parameter '{p.name}' must be finite, got {value}", p.span)
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        raise LimitError(f"parameter '{p.name}' is too large ({value.bit_length()} bits)", p.span)
    if not isinstance(value, (bool, int, float, str, ast.Definition, Builtin)):
        raise SpecTypeError(f"parameter '{p.name}' cannot be set to {type(value).__name__} {value!r:.40}", p.span,
                            help="pass a number, bool, string, block name, or a list of those")
    return value


def _from_user(el: Elaborating, p: ast.Param, value: Any) -> Any:
    """An override as the parameter's type: CLI strings are parsed, names resolve to blocks."""
    if not isinstance(value, str) or (p.value_type is not None and p.value_type.kind == "str"):
        return value
    text = value.strip()
    kind = p.value_type.kind if p.value_type else None
    if kind == "choice" and any(isinstance(c, ast.String) and c.value == text for c in p.value_type.choices):
        return text  # a string choice stays a string, even "1" or "true"
    if text in ("true", "false", "True", "False") and kind in (None, "bool", "choice"):
        return text.lower() == "true"
    for convert in (int, float):
        try:
            number = convert(text)
        except ValueError:
            continue
        if kind == "float":
            return float(number)
        return number
    if kind == "choice":
        for c in p.value_type.choices:
            if isinstance(c, ast.Name) and c.id == text:
                return el.eval(c)
            if isinstance(c, ast.String) and c.value == text:
                return c.value
    if text in el.program.definitions:
        return el.program.definitions[text]
    if text in el.builtins:
        return Builtin(text)
    return text
