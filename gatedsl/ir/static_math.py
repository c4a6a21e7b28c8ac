"""Arithmetic on static values (ints, floats, bools, symbolic sizes), guarded so no spec can hang or overflow the compiler."""

from __future__ import annotations

import math
import operator
from typing import Any

from gatedsl.errors import LimitError, Span, SpecTypeError
from gatedsl.ir.types import Sym, dim_div, dim_mul
from gatedsl.ir.values import describe

_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
          "//": operator.floordiv, "%": operator.mod, "**": operator.pow}
_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
            ">": operator.gt, ">=": operator.ge}
MAX_BITS = 64
MAX_STR = 10_000  # characters in a static string: `s = s + s` in a repeat must not exhaust memory
MAX_SYM_FACTORS = 16  # sizes in a symbolic product B*T*...


def static_binop(op: str, left: Any, right: Any, span: Span) -> Any:
    if isinstance(left, Sym) or isinstance(right, Sym):
        return _symbolic(op, left, right, span)
    if op in ("==", "!="):
        same = left == right and isinstance(left, bool) == isinstance(right, bool)
        return same if op == "==" else not same
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (left, right))
    if op in _COMPARE:
        if not numeric:
            raise SpecTypeError(f"cannot compare {describe(left)} with {describe(right)}", span)
        return _COMPARE[op](left, right)
    if op == "+" and isinstance(left, str) and isinstance(right, str):
        if len(left) + len(right) > MAX_STR:
            raise LimitError(f"a static string longer than {MAX_STR:,} characters", span)
        return left + right
    if op == "+" and isinstance(left, list) and isinstance(right, list):  # collecting values: ys = ys + [y]
        if len(left) + len(right) > MAX_STR:
            raise LimitError(f"a static list longer than {MAX_STR:,} items", span)
        return left + right
    if not numeric:
        raise SpecTypeError(f"cannot apply {op} to {describe(left)} and {describe(right)}", span)
    if op in ("/", "//", "%") and right == 0:
        raise SpecTypeError("division by zero", span)
    if op == "**":
        # |left| ** right has more than (bit_length(|left|) - 1) * right bits: refuse before computing it. Below
        # that bound the result has at most 2 * MAX_BITS bits, cheap to compute and checked like any other.
        if isinstance(left, int) and isinstance(right, int) and right > 0 \
                and abs(left) > 1 and right * (abs(left).bit_length() - 1) > MAX_BITS:
            raise LimitError(f"{left} ** {right} is too large", span)
        if isinstance(right, int) and right < 0 and left == 0:
            raise SpecTypeError("0 raised to a negative power", span)
    try:
        result = _ARITH[op](left, right)
    except (OverflowError, ZeroDivisionError, ValueError) as err:
        raise LimitError(f"{op} on {left} and {right}: {err}", span) from None
    if isinstance(result, complex):
        raise SpecTypeError(f"{left} ** {right} is not a real number", span)
    if isinstance(result, int) and result.bit_length() > MAX_BITS:
        raise LimitError(f"{left} {op} {right} is too large ({result.bit_length()} bits; static ints have at most "
                         f"{MAX_BITS})", span)
    if isinstance(result, float) and not math.isfinite(result):
        raise LimitError(f"{op} on {left} and {right} overflows", span)
    return result


def _symbolic(op: str, left: Any, right: Any, span: Span) -> Any:
    def dim(v):
        if isinstance(v, Sym) or (isinstance(v, int) and not isinstance(v, bool)):
            return v
        raise SpecTypeError(f"cannot combine a symbolic size with {describe(v)}", span)

    a, b = dim(left), dim(right)
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op == "*":
        out = dim_mul(a, b)
        if isinstance(out, Sym) and (len(out.factors) > MAX_SYM_FACTORS or out.coeff.bit_length() > MAX_BITS):
            raise LimitError(f"the symbolic size {a} * {b} is too large", span)
        return out
    if op in ("/", "//"):
        out = dim_div(a, b)
        if out is None:
            raise SpecTypeError(f"{a} {op} {b} is not a whole symbolic size", span)
        return out
    raise SpecTypeError(f"symbolic sizes support only *, / and ==, not {op} ({a} {op} {b})", span,
                        help="give the size a value (a parameter or a concrete input shape)")
