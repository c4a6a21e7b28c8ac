"""Signatures: bind a call's arguments to the callee's parameters, checking static values against their domains and unifying tensor shapes, which binds the free sizes."""

from __future__ import annotations

import math
from typing import Any

from gatedsl.errors import LimitError, Note, ShapeError, Span, SpecTypeError
from gatedsl.frontend import ast
from gatedsl.ir.elaboration import Elaborating, Frame
from gatedsl.ir.types import Dim, Sym, TensorType, show_shape
from gatedsl.ir.values import Builtin, Tensor, describe, show, show_int


def bind_signature(
    el: Elaborating,
    definition: ast.Definition,
    frame: Frame,
    args: list[Any],
    kwargs: dict[str, tuple[Any, Span]],
    call: ast.Expr,
    step_axis: tuple[str | int | Sym, Span] | None,
) -> dict[str, tuple[str, int | None, Tensor | None]]:
    """Bind call arguments to a definition's parameters in `frame.env`, unifying tensor shapes.

    For a scan (`step_axis` given), sequence arguments are matched without the scanned axis.
    Returns, per tensor parameter, (role, scanned axis, the caller's tensor or None).
    Each tensor parameter's one-step type is stored in env under "\\0type:NAME".
    """
    env = frame.env
    params = definition.params
    by_name = {p.name: p for p in params}
    call_args = getattr(call, "args", [])
    call_span = call.span

    # 1. Match positional and keyword arguments to parameters.
    given: dict[str, tuple[Any, Span]] = {}
    if len(args) > len(params):
        raise SpecTypeError(f"{definition.name} takes {len(params)} arguments, got {len(args)}", call_span,
                            notes=[Note("defined here", definition.span)])
    for p, value, node in zip(params, args, call_args):
        given[p.name] = (value, node.span)
    dim_kwargs: dict[str, tuple[Any, Span]] = {}
    for name, (value, span) in kwargs.items():
        if name in given:
            raise SpecTypeError(f"argument '{name}' is given twice", span)
        if name in by_name:
            given[name] = (value, span)
        elif name in el.signature_dims(definition):
            dim_kwargs[name] = (value, span)
        else:
            names = ", ".join(p.name for p in params)
            raise SpecTypeError(f"{definition.name} has no parameter '{name}'", span,
                                notes=[Note(f"its parameters are: {names}", definition.span)])

    # 2. Static values given explicitly, and sizes passed by keyword (H=64).
    for name, (value, span) in dim_kwargs.items():
        env[name] = el.as_dim(value, span)
    for p in params:
        if p.tensor is None and p.name in given:
            value, span = given[p.name]
            env[p.name] = check_value_param(el, p, value, span)

    # 3. Tensor arguments: unify with the declared shapes, binding free dims.
    star: list[tuple[Dim, ...] | None] = [None]
    result: dict[str, tuple[str, int | None, Tensor | None]] = {}
    for p in params:
        if p.tensor is None:
            continue
        if p.name not in given:
            if not p.state:
                raise SpecTypeError(f"{definition.name} needs argument '{p.name}'", call_span,
                                    notes=[Note(f"{p.name} is declared here", p.span)])
            result[p.name] = ("state", None, None)
            continue
        value, span = given[p.name]
        if not isinstance(value, Tensor):
            raise SpecTypeError(f"argument '{p.name}' of {definition.name} must be a tensor, got {describe(value)}",
                                span, notes=[Note(f"{p.name} is declared here", p.span)])
        step_type, axis = value.type, None
        role = "state" if p.state else "const"
        if step_axis is not None and not p.state:
            axis = _find_axis(value.type, step_axis[0])
            if axis is not None:
                role = "seq"
                step_type = TensorType(value.type.shape[:axis] + value.type.shape[axis + 1:], value.type.dtype)
        unify(el, definition, p, step_type, env, star, span, value)
        result[p.name] = (role, axis, value)
        env[p.name] = value
        env[f"\0type:{p.name}"] = step_type
    if step_axis is not None and not any(r[0] == "seq" for r in result.values()):
        axis_name, axis_span = step_axis
        raise ShapeError(f"no input of {definition.name} has the axis {axis_name} to scan over", axis_span,
                         notes=[Note(f"{n} is {v[2].type}", v[2].origin) for n, v in result.items() if v[2]])

    # 4. Defaults of static parameters, evaluated in the callee with the dims bound so far.
    el.stack.append(frame)
    try:
        for p in params:
            if p.tensor is not None or p.name in env:
                continue
            if p.default is None:
                raise SpecTypeError(f"{definition.name} needs argument '{p.name}'", call_span,
                                    notes=[Note(f"{p.name} is declared here", p.span)])
            env[p.name] = check_value_param(el, p, el.eval(p.default), p.default.span)
        # 5. Declared types of states that start at zero: every dim must now be known.
        for p in params:
            if p.tensor is not None and p.name not in given:
                env[f"\0type:{p.name}"] = _declared_type(el, definition, p, env, star[0], call_span)
    finally:
        el.stack.pop()
    return result


def signature_dims(definition: ast.Definition) -> set[str]:
    names = set()
    for p in definition.params:
        if p.tensor is not None:
            for d in p.tensor.dims:
                if isinstance(d, ast.Expr):
                    names |= {n.id for n in names_in(d)}
    return names


def _find_axis(ttype: TensorType, axis: str | int | Sym) -> int | None:
    """Where a scan's axis is in an argument: the one dim with that size name, or, for an integer axis,
    that position in every argument of a high enough rank (so an integer axis leaves no constants)."""
    if isinstance(axis, int):
        rank = ttype.rank
        return axis % rank if -rank <= axis < rank else None
    matches = [i for i, d in enumerate(ttype.shape) if d == (axis if isinstance(axis, Sym) else Sym.named(axis))]
    return matches[0] if len(matches) == 1 else None


def unify(el: Elaborating, definition: ast.Definition, p: ast.Param, actual: TensorType, env: dict, star: list,
          span: Span, value: Tensor) -> None:
    pattern = p.tensor
    dims = pattern.dims
    has_star = bool(dims) and isinstance(dims[0], ast.StarDim)
    fixed = dims[1:] if has_star else dims
    declared = f"{'' if pattern.dtype == 'float' else pattern.dtype}[{', '.join(_dim_src(d) for d in dims)}]"
    where = [Note(f"{p.name} is declared {declared}", p.span), Note(f"the argument is {actual}", value.origin)]
    if any(isinstance(d, ast.StarDim) for d in fixed):
        raise SpecTypeError("`*` may only stand first in a shape", p.span)
    if actual.dtype != pattern.dtype:
        raise SpecTypeError(f"argument '{p.name}' of {definition.name} must be {pattern.dtype}, got {actual.dtype}",
                            span, notes=where)
    rank_ok = actual.rank >= len(fixed) if has_star else actual.rank == len(fixed)
    if not rank_ok:
        raise ShapeError(f"argument '{p.name}' of {definition.name} has rank {actual.rank}, expected "
                         f"{'at least ' if has_star else ''}{len(fixed)}", span, notes=where)
    lead = actual.shape[: actual.rank - len(fixed)]
    if has_star:
        if star[0] is None:
            star[0] = lead
        elif star[0] != lead:
            raise ShapeError(
                f"argument '{p.name}' of {definition.name} has leading dims {show_shape(lead)}, "
                f"but an earlier argument's `*` matched {show_shape(star[0])}", span, notes=where)
    for d, size in zip(fixed, actual.shape[actual.rank - len(fixed):]):
        if isinstance(d, ast.Name) and d.id not in env and d.id not in el.builtins \
                and d.id not in el.program.definitions:
            env[d.id] = size  # a free dim: bound by this argument
            continue
        el.stack.append(Frame(definition, el.frame.graph, "", env))
        try:
            expected = el.as_dim(el.eval(d), d.span)
        finally:
            el.stack.pop()
        if expected != size:
            bound = ", ".join(f"{n.id} = {show(env[n.id])}" for n in names_in(d) if n.id in env)
            raise ShapeError(
                f"argument '{p.name}' of {definition.name}: expected {_dim_src(d)} = {expected}, got {size} "
                f"(in {actual})",
                span, notes=where + ([Note(bound)] if bound else []))


def _dim_src(d) -> str:
    if isinstance(d, ast.StarDim):
        return "*"
    if isinstance(d, ast.Name):
        return d.id
    if isinstance(d, ast.Number):
        return str(d.value)
    return "…"


def _declared_type(el: Elaborating, definition: ast.Definition, p: ast.Param, env: dict,
                   star: tuple[Dim, ...] | None, span: Span) -> TensorType:
    dims: list[Dim] = []
    for d in p.tensor.dims:
        if isinstance(d, ast.StarDim):
            if star is None:
                raise ShapeError(f"cannot tell the leading dims `*` of state {p.name}", span,
                                 notes=[Note("declared here", p.span)],
                                 help="pass an input with `*` in its shape, or an initial state")
            dims.extend(star)
            continue
        if isinstance(d, ast.Name) and d.id not in env and d.id not in el.builtins:
            raise ShapeError(
                f"cannot tell the size {d.id} of state {p.name}", span,
                notes=[Note(f"{p.name} is declared here", p.span)],
                help=f"pass {d.id}=... or an initial {p.name}=... to {definition.name}",
            )
        dims.append(el.as_dim(el.eval(d), d.span))
    return TensorType(tuple(dims), p.tensor.dtype)


def check_value_param(el: Elaborating, p: ast.Param, value: Any, span: Span) -> Any:
    """Check a static argument against its declared type and domain."""
    vt = p.value_type
    if vt is None:
        return value
    if isinstance(value, Tensor):
        raise SpecTypeError(f"'{p.name}' is a static {vt.kind} parameter; a tensor cannot set it", span,
                            notes=[Note("declared here", p.span)])
    if vt.kind == "int":
        value = el.as_int(value, span, f"'{p.name}'")
    elif vt.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecTypeError(f"'{p.name}' must be a float, got {describe(value)}", span)
        try:
            value = float(value)
        except OverflowError:
            raise LimitError(f"'{p.name}' = {show_int(value)} is too large for a float", span) from None
        if not math.isfinite(value):
            raise SpecTypeError(f"'{p.name}' must be a finite float, got {value}", span)
    elif vt.kind == "bool":
        if not isinstance(value, bool):
            raise SpecTypeError(f"'{p.name}' must be true or false, got {describe(value)}", span)
    elif vt.kind == "str":
        if not isinstance(value, str):
            raise SpecTypeError(f"'{p.name}' must be a string, got {describe(value)}", span)
    elif vt.kind == "block":
        if not isinstance(value, (ast.Definition, Builtin)) or (isinstance(value, ast.Definition)
                                                                 and value.kind == "model"):
            raise SpecTypeError(f"'{p.name}' must be a block, got {describe(value)}", span)
    elif vt.kind == "choice":
        choices = [el.eval(c) for c in vt.choices]
        if not any(_same(value, c) for c in choices):
            shown = ", ".join(show(c) for c in choices)
            raise SpecTypeError(f"'{p.name}' must be one of {{{shown}}}, got {show(value)}", span,
                                notes=[Note("declared here", p.span)])
    if vt.kind in ("int", "float") and vt.low is not None:
        low, high = el.eval(vt.low), el.eval(vt.high)
        for bound, node in ((low, vt.low), (high, vt.high)):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                raise SpecTypeError(f"the domain of '{p.name}' needs static numbers as bounds, got {describe(bound)}",
                                    node.span)
        if low > high:
            raise SpecTypeError(f"the domain {show(low)}..{show(high)} of '{p.name}' is empty", vt.span)
        if vt.log and low <= 0:
            raise SpecTypeError(f"a log domain needs a positive lower bound, got {show(low)}", vt.low.span)
        if not (low <= value <= high):
            shown = show_int(value) if isinstance(value, int) else show(value)
            raise SpecTypeError(f"'{p.name}' = {shown} is outside its domain {show(low)}..{show(high)}", span,
                                notes=[Note("declared here", p.span)])
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def names_in(expr: ast.Expr):
    """Every name `expr` reads, in order."""
    if isinstance(expr, ast.Name):
        yield expr
    for value in vars(expr).values():
        if isinstance(value, ast.Expr):
            yield from names_in(value)
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, ast.Expr):
                    yield from names_in(v)
