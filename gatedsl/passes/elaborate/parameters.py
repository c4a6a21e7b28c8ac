"""A model's parameters: their declared domains, and binding defaults and overrides (Python values or CLI strings) to values."""

from __future__ import annotations

import math
from typing import Any

from gatedsl.errors import LimitError, OverrideError, SourceCache, SpecError, SpecTypeError, clip
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
            raise unknown_parameter(model, name, overrides[name])
    env = el.frame.env
    bound: dict[str, Any] = {}
    for p in model.params:
        if p.name in overrides:
            bound[p.name] = env[p.name] = override_value(el, p, overrides[p.name])
            continue
        if p.default is None:
            raise SpecError(f"parameter '{p.name}' of model {model.name} has no default", p.span,
                            help=f"give it one, or pass -p {p.name}=VALUE")
        bound[p.name] = env[p.name] = check_value_param(el, p, el.eval(p.default), p.default.span)
    return bound


def unknown_parameter(model: ast.Definition, name: str, value: Any) -> OverrideError:
    """The error for an override naming no parameter of `model`: it lists the ones there are."""
    known = ", ".join(p.name for p in model.params) or "none"
    reason = f"model {model.name} has no parameter '{name}'; its parameters are: {known}"
    return OverrideError(reason, model.span, name=name, value=value, reason=reason,
                         declared=f"model {model.name} is declared here")


def override_value(el: Elaborating, p: ast.Param, value: Any) -> Any:
    """One override as the model binds it: text read as for `-p NAME=VALUE`, then checked against the domain; a
    value the declaration does not allow is an OverrideError (a mistake in the declaration stays a SpecError)."""
    try:
        return check_value_param(el, p, _static_value(_from_user(el, p, value), p), p.span)
    except SpecError as err:
        if err.span is not p.span:  # raised at the domain's bounds or choices: the spec's mistake, not the value's
            raise
        shown = clip(value if isinstance(value, str) else repr(value), 60)
        expected = _expected(p)
        reason = f"{p.name} is {expected}, got {shown}" if expected else err.message
        raise OverrideError(err.message, p.span, name=p.name, value=value, reason=reason,
                            declared=f"'{p.name}' is declared here") from None


def _expected(p: ast.Param) -> str | None:
    """What the declaration of `p` allows, in words ("an int in 32..512", "one of {GRU, LSTM}"); None if untyped."""
    vt = p.value_type
    if vt is None:
        return None
    if vt.kind == "choice":
        return "one of {" + ", ".join(_as_written(c) for c in vt.choices) + "}"
    words = {"int": "an int", "float": "a float", "bool": "true or false", "str": "a string",
             "block": "a block or cell"}[vt.kind]
    if vt.low is not None:
        words += f" in {_as_written(vt.low)}..{_as_written(vt.high)}" + (" (log)" if vt.log else "")
    return words


def _as_written(expr: ast.Expr) -> str:
    """An expression as the spec writes it (a bound, a choice)."""
    span = expr.span
    line = SourceCache.line(span.file, span.line)
    if line is None or span.end_line != span.line or not span.end_column:
        return "…"
    return line[span.column - 1:span.end_column - 1]


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
    kind = p.value_type.kind if p.value_type else None
    if not isinstance(value, str):
        return value
    text = value.strip()
    if kind in (None, "str", "choice") and len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]  # `-p 'form="plain"'`: a string as the spec writes one (a spec's string holds no quote)
    if kind == "str":
        return value
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
