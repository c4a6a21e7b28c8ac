"""An elaboration in progress as the code it calls sees it: a Frame per invocation, the Names taken under each instance path, and the Elaborating interface (passes/elaborate's Elaborator) through which primitives, signature binding and the call memo build the graph."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from gatedsl.errors import Span
from gatedsl.frontend import ast
from gatedsl.frontend.loader import Program
from gatedsl.ir.graph import Graph, InitSpec, ParamSpec
from gatedsl.ir.model import Limits, ModelIR
from gatedsl.ir.types import Dim, TensorType
from gatedsl.ir.values import Tensor


@dataclass
class Frame:
    """One invocation of a definition: its graph, its variables and its instance path."""

    definition: ast.Definition
    graph: Graph
    path: str  # instance path prefix: "" or "layers.1.cell."
    env: dict[str, Any]
    returns: list[Any] | None = None
    stmt: str = ""  # the statement path being elaborated, e.g. "layers.1.cell.z"
    # Where the statement's own learned tensors and modules start in graph.params / graph.modules: only those
    # can sit under its path, so looking for them never scans the whole model (which would be quadratic).
    stmt_params: int = 0
    stmt_modules: int = 0


class Names(set):
    """The names taken under one instance-path prefix; `fresh(base)` takes `base`, or else the first of base_1,
    base_2, ... not taken."""

    __slots__ = ("_next",)  # per base name, the suffix to try first (made when a base is first taken twice)

    def fresh(self, base: str) -> str:
        if base not in self:
            self.add(base)
            return base
        # Every suffix below the one to try first was taken when the base was last asked for, and a name is never
        # given back: each look-up goes on from there (`h = h + 1` N times is linear, not quadratic) and finds
        # what a search from base_1 would.
        try:
            next_suffix = self._next
        except AttributeError:
            next_suffix = self._next = {}
        i = next_suffix.get(base, 1)
        name = f"{base}_{i}"
        while name in self:
            i += 1
            name = f"{base}_{i}"
        self.add(name)
        next_suffix[base] = i + 1
        return name


class Elaborating(Protocol):
    """The elaborator, as what it calls back sees it: the frames being elaborated (innermost last), what has been
    built so far, and the operations that evaluate the spec and add to the graph."""

    program: Program
    limits: Limits
    builtins: dict[str, Callable[[Elaborating, ast.Call], Any]]  # the primitives, by name (ir/builtins.py)
    stack: list[Frame]
    budget: int  # operations added and loop iterations run, against limits.max_nodes
    param_total: int  # learned elements declared, against limits.max_params
    declared_params: list[ParamSpec]
    shapes: dict[str, TensorType]  # every named tensor's type, by instance path
    used_names: dict[str, Names]  # per instance-path prefix, the names taken
    counted: ModelIR | None  # the counted unit, where model-level budgets are checked (None while elaborating)

    @property
    def frame(self) -> Frame: ...

    def eval(self, expr: ast.Expr) -> Any: ...

    def as_int(self, value: Any, span: Span, what: str) -> int: ...

    def as_dim(self, value: Any, span: Span) -> Dim: ...

    def signature_dims(self, definition: ast.Definition) -> set[str]: ...

    def add(self, op: str, attrs: dict[str, Any], inputs: list[Tensor], span: Span, label: str = "",
            params_at: str | None = None) -> list[Tensor]: ...

    def add_param(self, path: str, shape: tuple[int, ...], init: InitSpec | None, span: Span) -> None: ...

    def module_path(self, role: str) -> str: ...
