"""Values that elaboration computes: static numbers and names, and tensors that live in the graph."""

from __future__ import annotations

from dataclasses import dataclass

from gatedsl.errors import Span
from gatedsl.ir.graph import Port
from gatedsl.ir.types import Sym, TensorType


@dataclass(frozen=True, init=False)
class Tensor:
    """A tensor produced by a graph node; `origin` is where the spec made it, for diagnostics."""

    port: Port
    type: TensorType
    origin: Span
    label: str

    def __init__(self, port: Port, type: TensorType, origin: Span, label: str):
        # Fields written straight to __dict__: a frozen dataclass's own __init__ (object.__setattr__ per field)
        # takes twice as long, and elaboration makes a few per op.
        self.__dict__.update(port=port, type=type, origin=origin, label=label)


@dataclass(frozen=True)
class Builtin:
    """A primitive function of the language (linear, sigmoid, ...), usable as a value."""

    name: str

    def __str__(self) -> str:
        return self.name


Static = int | float | bool | str | Sym


def describe(value) -> str:
    from gatedsl.frontend.ast import Definition

    if isinstance(value, Tensor):
        return f"a tensor {value.type}"
    if isinstance(value, bool):
        return f"the bool {str(value).lower()}"
    if isinstance(value, int):
        return f"the int {value}"
    if isinstance(value, float):
        return f"the float {value:g}"
    if isinstance(value, str):
        return f'the string "{value}"'
    if isinstance(value, Sym):
        return f"the symbolic size {value}"
    if isinstance(value, Definition):
        return f"the {value.kind} {value.name}"
    if isinstance(value, Builtin):
        return f"the builtin {value.name}"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return type(value).__name__


def show(value) -> str:
    """A static value as a spec would write it (a tensor as its type), for a diagnostic."""
    from gatedsl.frontend.ast import Definition

    if isinstance(value, Tensor):
        return str(value.type)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Definition):
        return value.name
    return str(value)


def show_int(n: int) -> str:
    """An integer for a diagnostic: its digits, or, past 30 of them, its ends and how many there are."""
    text = str(n)
    return text if len(text) <= 30 else f"{text[:12]}…{text[-6:]} ({len(text)} digits)"
