"""The search space a spec's model parameters describe: its dimensions, their conditions, and candidates (DNAs).

A model parameter with a domain is a dimension: `d: int in 32..512`, `lr: float in 1e-4..1e-1 log`,
`attention: bool`, `act: {relu, gelu}`, `cell: {GRU, LSTM, MGU}`. A parameter without one (`x: int = 3`,
`k = 2`, `ffn: block = SwiGLU`) keeps its default, or the value `fixed` gives it.

A dimension is conditional when every use of it in the model's body stands inside `if` branches: it is
active only when one of those branches is taken (`if attention { ... heads ... }` makes `heads` active
only when `attention` is true; nested ifs conjoin, an `else` negates, uses in several branches combine
with "or"). Only conditions on parameters declared before the dimension narrow it; any other condition
(on a value the body computes, a later parameter) is assumed to hold, so a dimension is never wrongly
dropped. A candidate's DNA is the plain dict {name: value} of its active dimensions (blocks by name):
inactive ones are left out, so candidates that differ only there are one candidate, with one hash. An
inactive dimension is bound to its spec default if that is a literal in its domain, else to the domain's
first value: the model does not read it.

Screening runs the analysis passes on the parsed spec (parsed once, elaborated per candidate), with no
weights allocated and without torch. Elaboration replays the calls of cells and blocks it has already
elaborated with the same arguments (passes/elaborate/memo.py CallMemo): a model's layers after the first, and the
calls the space keeps from earlier candidates; the unit, and so the verdict, is the one elaborating gives.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
import random
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, PrivateAttr

from gatedsl.api import check_dims, load, pick_model
from gatedsl.errors import NameResolutionError, Note, Span, SpecError, SpecTypeError, source_lines
from gatedsl.frontend import ast
from gatedsl.frontend.loader import resolve_import
from gatedsl.frontend.parser import parse
from gatedsl.ir.graph import Graph
from gatedsl.ir.model import Limits, ModelIR
from gatedsl.ir.values import Builtin
from gatedsl.passes import OPTIMIZATIONS, PIPELINE, check_budgets, elaborate, verify_graph
from gatedsl.passes.elaborate import CallMemo, Elaborator, Frame, override_value, unknown_parameter

Value = str | int | float | bool

# The analysis passes a candidate must pass, in pipeline order, up to the budgets. verify_graph is left out:
# it re-checks gatedsl's own invariants (a failure there is a bug, never a verdict on the candidate), and a
# candidate that is compiled runs the whole pipeline, verify_graph included.
SCREENING_PASSES = [p for p in PIPELINE[:PIPELINE.index(check_budgets) + 1]
                    if p is not verify_graph and p not in OPTIMIZATIONS]


class Dimension(BaseModel):
    """One searchable model parameter: its kind, its domain, and when it is active."""

    name: str
    kind: Literal["int", "float", "bool", "choice"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: list[str | int | float | bool] = []  # "choice": block names as str, or the values
    condition: str | None = None  # when it is active, as the spec writes it: "attention == true"
    default: str | int | float | bool  # what the model is built with while the dimension is inactive
    _active: Callable[[dict], bool] = PrivateAttr()

    def active(self, partial: dict) -> bool:
        """Whether the dimension counts, given the values of the dimensions declared before it."""
        return self._active(partial)

    def grid_values(self, float_points: int = 3) -> list[Value]:
        """Every value the grid takes: each int, both bools, each choice, `float_points` spaced floats."""
        if self.kind == "int":
            return list(range(self.low, self.high + 1))
        if self.kind == "bool":
            return [False, True]
        if self.kind == "choice":
            return list(self.choices)
        if float_points < 1:
            raise ValueError(f"float_points must be at least 1, got {float_points}")
        if float_points == 1 or self.low == self.high:
            return [self._from_unit(0.5)]
        inner = [self._from_unit(i / (float_points - 1)) for i in range(1, float_points - 1)]
        return [self.low] + inner + [self.high]

    def contains(self, value: Any) -> bool:
        if self.kind == "int":
            return type(value) is int and self.low <= value <= self.high
        if self.kind == "float":
            return type(value) is float and math.isfinite(value) and self.low <= value <= self.high
        if self.kind == "bool":
            return type(value) is bool
        return any(_same(value, c) for c in self.choices)

    def sample(self, rng: random.Random) -> Value:
        if self.kind == "int":
            if not self.log:
                return rng.randint(self.low, self.high)
            # log-uniform over [low, high + 1), floored: each int's share is its width on the log scale
            value = math.floor(math.exp(rng.uniform(math.log(self.low), math.log(self.high + 1))))
            return min(max(value, self.low), self.high)
        if self.kind == "float":
            return self._from_unit(rng.random())
        if self.kind == "bool":
            return rng.random() < 0.5
        return rng.choice(self.choices)

    def neighbour(self, value: Value, rng: random.Random) -> Value:
        """A different value in the domain: a step of up to an eighth of the range for numbers, else another choice."""
        if self.kind == "bool":
            return not value
        if self.kind == "choice":
            return rng.choice([c for c in self.choices if not _same(c, value)])
        if self.kind == "int":
            reach = max(1, (self.high - self.low) // 8)
            step = rng.randint(1, reach) * rng.choice((-1, 1))
            moved = min(max(value + step, self.low), self.high)
            return moved if moved != value else min(max(value - step, self.low), self.high)
        for _ in range(16):
            moved = self._from_unit(min(max(self._to_unit(value) + rng.gauss(0.0, 0.125), 0.0), 1.0))
            if moved != value:
                return moved
        return next(v for v in (self.low, self.high) if v != value)

    def size(self) -> int | float:
        if self.kind == "int":
            return self.high - self.low + 1
        if self.kind == "float":
            return 1 if self.low == self.high else math.inf
        return 2 if self.kind == "bool" else len(self.choices)

    def _from_unit(self, u: float) -> float:
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        return _plain_float(min(max(value, self.low), self.high))

    def _to_unit(self, value: float) -> float:
        if self.log:
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


class Screened(BaseModel):
    """A candidate's static verdict: shapes, parameter count, FLOPs and constraints, with no weight allocated."""

    ok: bool
    reason: str | None  # the violated constraint's message, as its SpecError says
    params: int | None
    flops: int | None  # with the symbolic sizes set by the space's `dims` (1 where not given)


class _Literal:
    """A dimension's condition, one literal of a disjunction of conjunctions: `expr` evaluates to `holds`."""

    def __init__(self, expr: ast.Expr, holds: bool, text: str, key: str):
        self.expr, self.holds, self.text = expr, holds, text
        self.key = key  # the condition's source, spaces dropped: the same text reads the same parameters


class Space:
    """The search space of one model of a spec: dimensions, candidates, and their screening and compilation."""

    def __init__(self, spec: str | Path, *, model: str | None = None, fixed: dict | None = None,
                 dims: dict[str, int] | None = None, max_params: int | None = None,
                 max_flops: int | None = None, max_file_size: int | None = None):
        self.program = load(spec, max_file_size=max_file_size)
        self.model = pick_model(self.program, model)
        main = self.program.main
        if self.model not in main.definitions:
            raise SpecError(f"model {self.model.name} is imported; search a model defined in the spec itself",
                            self.model.span)
        self.text = main.text  # as parsed: the text spans count in, which bind() edits
        self.dims = dict(dims or {})
        check_dims(self.dims, None, self.model.name)
        self.max_params = max_params
        self.max_flops = max_flops
        self.limits = Limits() if max_params is None else Limits(max_params=max_params)
        self._memo = CallMemo(self.program)
        self._params = {p.name: p for p in self.model.params}
        # One scratch elaborator evaluates domains, defaults and conditions: static values only, no graph.
        self._el = Elaborator(self.program, self.limits)
        self._frame = Frame(self.model, Graph(self.model.name), "", {})
        self._el.stack.append(self._frame)
        self.fixed = {name: self._fixed_value(name, value) for name, value in (fixed or {}).items()}
        self.dimensions: list[Dimension] = []
        self._conditions: dict[str, list[list[_Literal]] | None] = {}
        for p in self.model.params:
            if p.name not in self.fixed and _is_dimension(p):
                self.dimensions.append(self._dimension(p))
        self._dims = {d.name: d for d in self.dimensions}
        self._derive_conditions()
        self.identity = self._identity()
        self.size = self._count(0, {})

    # ------------------------------------------------------------ candidates
    def canonical(self, dna: dict) -> dict:
        """The DNA with inactive dimensions dropped and each value in its dimension's type (ints, floats, names)."""
        if not isinstance(dna, dict):
            raise TypeError(f"a DNA is a dict of parameter values, got {type(dna).__name__}")
        unknown = [k for k in dna if k not in self._dims]
        if unknown:
            fixed = [k for k in unknown if k in self.fixed]
            raise ValueError(f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a search "
                             f"dimension of model {self.model.name}" + (" (fixed)" if fixed else "")
                             + f"; its dimensions: {', '.join(self._dims) or 'none'}")
        out: dict[str, Value] = {}
        for dim in self.dimensions:
            if not self._is_active(dim, out):
                continue
            if dim.name not in dna:
                raise ValueError(f"the DNA has no value for the active dimension '{dim.name}'")
            out[dim.name] = _typed(dim, dna[dim.name])
        return out

    def hash(self, dna: dict) -> str:
        """A stable content hash of the candidate: the same in any process, for the same spec and fixed values."""
        return _sha256({"spec": self.identity, "dna": self.canonical(dna)})

    def sample(self, seed_or_rng: int | random.Random) -> dict:
        """A candidate drawn dimension by dimension (log-uniform on log domains); the same seed gives the same DNA."""
        rng = _rng(seed_or_rng)
        out: dict[str, Value] = {}
        for dim in self.dimensions:
            if self._is_active(dim, out):
                out[dim.name] = dim.sample(rng)
        return out

    def mutate(self, dna: dict, seed_or_rng: int | random.Random, rate: float = 0.2) -> dict:
        """A different candidate: one active dimension always changes, each other one with probability `rate`."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        rng = _rng(seed_or_rng)
        parent = self.canonical(dna)
        movable = [name for name in parent if self._dims[name].size() > 1]
        if not movable:
            raise ValueError("no active dimension of this candidate can change: the space has one candidate here")
        forced = rng.choice(movable)
        out: dict[str, Value] = {}
        for dim in self.dimensions:
            if not self._is_active(dim, out):
                continue
            if dim.name not in parent:  # made active by an earlier change
                out[dim.name] = dim.sample(rng)
            elif dim.name == forced or (dim.size() > 1 and rng.random() < rate):
                out[dim.name] = dim.neighbour(parent[dim.name], rng)
            else:
                out[dim.name] = parent[dim.name]
        return out

    def grid(self, float_points: int = 3) -> Iterator[dict]:
        """Every candidate once (floats at `float_points` spaced values), the first dimension varying slowest."""
        values = {d.name: d.grid_values(float_points) for d in self.dimensions}

        def walk(i: int, partial: dict) -> Iterator[dict]:
            if i == len(self.dimensions):
                yield dict(partial)
                return
            dim = self.dimensions[i]
            if not self._is_active(dim, partial):
                yield from walk(i + 1, partial)
                return
            for value in values[dim.name]:
                partial[dim.name] = value
                yield from walk(i + 1, partial)
            del partial[dim.name]

        return walk(0, {})

    # --------------------------------------------------- texts and models
    def params(self, dna: dict) -> dict[str, Any]:
        """The candidate as `params=` for gatedsl.check / gatedsl.compile: every dimension and fixed value."""
        values = self._bound(self.canonical(dna))
        return {name: self._to_spec(self._params[name], value) for name, value in values.items()}

    def bind(self, dna: dict) -> str:
        """The spec's text with every dimension's default (and every fixed parameter's) set to the candidate's value.

        The rest of the file is kept; imports other than the standard library become absolute paths, so the
        text compiles to the same model from anywhere (gatedsl.compile(text, model=...)).
        """
        values = self._bound(self.canonical(dna))
        edits: list[tuple[int, int, str]] = []
        for imp in self.program.main.imports:
            if imp.quoted or imp.module.split(".")[0] != "std":
                path = str(resolve_import(imp, self.program.main.file).resolve())
                if not any(c in path for c in '"\\\n'):
                    edits.append((*self._offsets(imp.span), f'import "{path}"'))
        for name, value in values.items():
            p = self._params[name]
            literal = _literal(p, value, self.program)
            if p.default is not None:
                edits.append((*self._offsets(p.default.span), literal))
            else:
                end = self._offsets(p.span)[1]
                edits.append((end, end, f" = {literal}"))
        text = self.text
        for start, end, new in sorted(edits, reverse=True):
            text = text[:start] + new + text[end:]
        return text

    def dna_of(self, bound_text: str) -> dict:
        """The candidate a bound text fixes (the inverse of bind): each dimension's default, read as a literal."""
        module = parse(bound_text, "<bound text>")
        model = next((d for d in module.definitions if d.kind == "model" and d.name == self.model.name), None)
        if model is None:
            raise SpecError(f"the text defines no model {self.model.name}", Span("<bound text>", 1, 1))
        params = {p.name: p for p in model.params}
        values: dict[str, Value] = {}
        for dim in self.dimensions:
            if not self._is_active(dim, values):
                continue
            p = params.get(dim.name)
            if p is None:
                raise SpecError(f"model {model.name} has no parameter '{dim.name}'", model.span)
            value = _literal_value(p.default) if p.default is not None else None
            if value is None:
                raise SpecError(f"parameter '{dim.name}' is not set to a literal value", p.span,
                                help="a bound text gives every dimension a number, bool, string or name")
            try:
                values[dim.name] = _typed(dim, value)
            except ValueError as err:
                raise SpecError(str(err), p.default.span) from None
        return values

    def screen(self, dna: dict) -> Screened:
        """Shapes, parameter count, FLOPs and every constraint (`require`, budgets, max_params/max_flops),
        statically: the parsed spec is elaborated for this candidate, and nothing is allocated."""
        unit = ModelIR(self.program, self.model, self.params(dna), self.limits, opt_level=0)
        try:
            for compiler_pass in SCREENING_PASSES:
                # Elaboration replays the calls of cells and blocks it has elaborated with the same arguments:
                # every layer after the first, and calls this space has seen in earlier candidates too.
                unit = elaborate(unit, self._memo) if compiler_pass is elaborate else compiler_pass(unit)
        except SpecError as err:
            return Screened(ok=False, reason=err.message, params=None, flops=None)
        flops = unit.flops.evaluate(self.dims)
        if self.max_flops is not None and flops > self.max_flops:
            return Screened(ok=False, reason=f"the model has {flops:,} FLOPs, over the limit of {self.max_flops:,}",
                            params=unit.param_count, flops=flops)
        return Screened(ok=True, reason=None, params=unit.param_count, flops=flops)

    def compile(self, dna: dict, **kw):
        """gatedsl.compile of the candidate (keywords such as opt_level pass through): a torch.fx.GraphModule."""
        from gatedsl.api import compile as compile_spec

        kw.setdefault("max_params", self.max_params)
        return compile_spec(self.program, self.params(dna), model=self.model.name, **kw)

    # ----------------------------------------------------------- internals
    def _dimension(self, p: ast.Param) -> Dimension:
        vt = p.value_type
        if vt.kind == "bool":
            dim = Dimension(name=p.name, kind="bool", default=False)
        elif vt.kind == "choice":
            choices = [_choice_value(self.program, c, p) for c in vt.choices]
            for i, c in enumerate(choices):
                if any(_same(c, other) for other in choices[:i]):
                    raise SpecError(f"the choice {c!r} of '{p.name}' is listed twice", vt.choices[i].span)
            dim = Dimension(name=p.name, kind="choice", choices=choices, default=choices[0])
        else:
            low, high = (self._static_bound(p, e) for e in (vt.low, vt.high))
            if vt.kind == "int":
                low, high = math.ceil(low), math.floor(high)
            else:
                low, high = _plain_float(float(low)), _plain_float(float(high))
            if low > high:
                raise SpecTypeError(f"the domain of '{p.name}' holds no {vt.kind}", vt.span,
                                    notes=[Note("declared here", p.span)])
            if vt.log and low <= 0:
                raise SpecTypeError(f"a log domain needs a positive lower bound, got {low}", vt.low.span)
            dim = Dimension(name=p.name, kind=vt.kind, low=low, high=high, log=vt.log, default=low)
        spec_default = _literal_value(p.default) if p.default is not None else None
        if spec_default is not None:
            try:
                dim.default = _typed(dim, spec_default)
            except ValueError:
                pass  # not in the domain: check reports it for any candidate that reads it
        dim._active = lambda partial, dim=dim: self._is_active(dim, partial)
        return dim

    def _fixed_value(self, name: str, value: Any) -> Value:
        """A fixed value as the model binds it (text as for `-p`, "false" is false), blocks by name."""
        p = self._params.get(name)
        if p is None:
            raise unknown_parameter(self.model, name, value)
        self._frame.env = {}
        bound = override_value(self._el, p, value)
        if isinstance(bound, (ast.Definition, Builtin)):
            return bound.name
        if not isinstance(bound, (str, int, float, bool)):
            raise SpecTypeError(f"'{name}' cannot be fixed to {value!r}: the search fixes numbers, bools, strings "
                                "and blocks", p.span)
        return bound

    def _static_bound(self, p: ast.Param, expr: ast.Expr) -> int | float:
        """A domain bound, which must be a static number: the search samples between the two."""
        self._frame.env = {}
        try:
            value = self._el.eval(expr)
        except SpecError as err:
            raise SpecError(f"the search cannot sample '{p.name}': its bounds must be static numbers ({err.message})",
                            expr.span, notes=[Note("declared here", p.span)]) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecTypeError(f"the search cannot sample '{p.name}': a bound of its domain is not a number",
                                expr.span, notes=[Note("declared here", p.span)])
        return value

    def _derive_conditions(self) -> None:
        """Each dimension's condition: the disjunction, over its uses in the model, of the ifs around each use."""
        uses: dict[str, list[tuple[_Literal, ...]]] = {}
        locals_: set[str] = set()

        def walk(node: ast.Node, context: tuple[_Literal, ...]) -> None:
            if isinstance(node, ast.If):
                walk(node.cond, context)
                literal = self._literal(node.cond)
                for stmt in node.then:
                    walk(stmt, context + (literal(True),))
                for stmt in node.orelse:
                    walk(stmt, context + (literal(False),))
                return
            if isinstance(node, ast.Name):
                uses.setdefault(node.id, []).append(context)
            elif isinstance(node, ast.Assign):
                locals_.update(node.targets)
            elif isinstance(node, (ast.GateStmt, ast.InputStmt, ast.OutputStmt, ast.AuxStmt)):
                locals_.add(node.name)
            elif isinstance(node, (ast.Repeat, ast.Cascade)) and node.index is not None:
                locals_.add(node.index)
            for value in vars(node).values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, ast.Node):
                        walk(item, context)

        for p in self.model.params:  # a parameter read by another's default or domain is read unconditionally
            for item in (p.default, p.value_type):
                if item is not None:
                    walk(item, ())
        for stmt in self.model.body:
            walk(stmt, ())
        for i, dim in enumerate(self.dimensions):
            known = self._known_before(dim.name) - locals_
            disjuncts: list[list[_Literal]] | None = []
            for context in uses.get(dim.name, [()]):
                usable = [lit for lit in context if _names(lit.expr) <= known | self._statics(locals_)]
                if not usable:  # read where no usable condition guards it: always active
                    disjuncts = None
                    break
                disjuncts.append(usable)
            if disjuncts is not None:
                disjuncts = _simplify(disjuncts)
            self._conditions[dim.name] = disjuncts
            if disjuncts is not None:
                dim.condition = _condition_text(disjuncts)
        # Dimensions whose values a condition reads, directly or through a parameter's default: counting
        # and enumerating branch on these, and multiply the others out.
        read = set().union(*(_names(lit.expr) for conds in self._conditions.values() if conds
                             for conj in conds for lit in conj))
        for p in reversed(self.model.params):
            if p.name in read and p.name not in self._dims and p.name not in self.fixed and p.default is not None:
                read |= _names(p.default)
        self._branching = {name for name in self._dims if name in read}

    def _literal(self, cond: ast.Expr) -> Callable[[bool], _Literal]:
        negated = False
        while isinstance(cond, ast.UnaryOp) and cond.op == "not":  # `if not mix` is `mix == false`
            cond, negated = cond.operand, not negated
        start, end = self._offsets(cond.span)
        source = self.text[start:end]
        text, key = " ".join(source.split()), "".join(source.split())
        if isinstance(cond, ast.Name) and cond.id in self._params and _is_bool(self._params[cond.id]):
            return lambda holds: _Literal(cond, holds != negated, f"{text} == {str(holds != negated).lower()}", key)
        return lambda holds: _Literal(cond, holds != negated, text if holds != negated else f"not ({text})", key)

    def _known_before(self, name: str) -> set[str]:
        """Parameters whose values are known where dimension `name` is decided: the dimensions and fixed
        parameters declared before it, and the other parameters before it whose defaults read only those."""
        known: set[str] = set()
        for p in self.model.params:
            if p.name == name:
                break
            if p.name in self._dims or p.name in self.fixed:
                known.add(p.name)
            elif p.default is not None and _names(p.default) <= known | self._statics(set()):
                known.add(p.name)
        return known

    def _statics(self, locals_: set[str]) -> set[str]:
        """Names that mean the same in every candidate: definitions and builtins a parameter or local does not shadow."""
        return (set(self.program.definitions) | set(self._el.builtins)) - set(self._params) - locals_

    def _is_active(self, dim: Dimension, partial: dict) -> bool:
        conditions = self._conditions.get(dim.name)
        if conditions is None:
            return True
        env = self._env_before(dim.name, partial)
        self._frame.env = env
        for conj in conditions:
            if all(self._holds(lit) for lit in conj):
                return True
        return False

    def _holds(self, lit: _Literal) -> bool:
        try:
            value = self._el.eval(lit.expr)
        except SpecError:
            return True  # the candidate fails elaboration on this very condition: keep the dimension
        return value is lit.holds if isinstance(value, bool) else True

    def _env_before(self, name: str, partial: dict) -> dict[str, Any]:
        """The values elaboration binds to the parameters declared before dimension `name`, for this candidate."""
        env: dict[str, Any] = {}
        self._frame.env = env
        for p in self.model.params:
            if p.name == name:
                break
            if p.name in self._dims:
                dim = self._dims[p.name]
                value = partial[p.name] if p.name in partial else dim.default
                env[p.name] = self._to_spec(p, value)
            elif p.name in self.fixed:
                env[p.name] = self._to_spec(p, self.fixed[p.name])
            elif p.default is not None:
                try:
                    env[p.name] = self._el.eval(p.default)
                except SpecError:
                    pass  # a condition reading it keeps its dimension active
        return env

    def _bound(self, canonical: dict) -> dict[str, Value]:
        """Every value the candidate binds: its dimensions (inactive ones at their default) and the fixed values."""
        values: dict[str, Value] = {}
        for p in self.model.params:
            if p.name in self._dims:
                values[p.name] = canonical.get(p.name, self._dims[p.name].default)
            elif p.name in self.fixed:
                values[p.name] = self.fixed[p.name]
        return values

    def _to_spec(self, p: ast.Param, value: Any) -> Any:
        """A DNA value as elaboration takes it: a block name becomes the block."""
        if isinstance(value, str) and _names_block(p, value, self.program):
            return self.program.definitions.get(value) or Builtin(value)
        return value

    def _count(self, i: int, partial: dict) -> int | float:
        """The number of distinct DNAs from dimension i on, branching only on dimensions that conditions read."""
        if i == len(self.dimensions):
            return 1
        dim = self.dimensions[i]
        if not self._is_active(dim, partial):
            return self._count(i + 1, partial)
        if dim.size() == math.inf:
            return math.inf
        if dim.name not in self._branching:
            return dim.size() * self._count(i + 1, partial)
        total = 0
        for value in dim.grid_values():
            total += self._count(i + 1, {**partial, dim.name: value})
        return total

    def _identity(self) -> str:
        """The spec's content: every file's text (not its path), the model, the fixed values."""
        texts = [module.text for module in self.program.modules]
        return _sha256({"files": texts, "model": self.model.name, "fixed": self.fixed})

    def _offsets(self, span: Span) -> tuple[int, int]:
        starts = getattr(self, "_line_starts", None)
        if starts is None:
            starts = self._line_starts = [0] + list(itertools.accumulate(len(line) + 1 for line in
                                                                         source_lines(self.text)))
        return starts[span.line - 1] + span.column - 1, starts[span.end_line - 1] + span.end_column - 1


# ---------------------------------------------------------------- helpers
def _is_dimension(p: ast.Param) -> bool:
    vt = p.value_type
    if vt is None or p.tensor is not None:
        return False
    return vt.kind in ("bool", "choice") or (vt.kind in ("int", "float") and vt.low is not None)


def _is_bool(p: ast.Param) -> bool:
    return p.value_type is not None and p.value_type.kind == "bool"


def _names(node: ast.Node | None) -> set[str]:
    found: set[str] = set()
    if node is None:
        return found
    if isinstance(node, ast.Name):
        found.add(node.id)
    for value in vars(node).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, ast.Node):
                found |= _names(item)
    return found


def _simplify(disjuncts: list[list[_Literal]]) -> list[list[_Literal]] | None:
    """The disjunction without repeated, implied or contradictory conjunctions, pairs that differ in one literal's
    polarity merged (x and A or not x and A is A); None when that leaves an empty conjunction (always true)."""
    first: dict[tuple[str, bool], _Literal] = {}
    for conj in disjuncts:
        for lit in conj:
            first.setdefault((lit.key, lit.holds), lit)
    conjs = {frozenset((lit.key, lit.holds) for lit in conj) for conj in disjuncts}
    conjs = {c for c in conjs if len({key for key, _ in c}) == len(c)}  # `x and not x`: never true
    while True:
        conjs = {c for c in conjs if not any(other < c for other in conjs)}
        merge = next(((a, b) for a in conjs for b in conjs
                      if len(a) == len(b) and len(a ^ b) == 2 and len({key for key, _ in a ^ b}) == 1), None)
        if merge is None:
            break
        conjs = (conjs - set(merge)) | {merge[0] & merge[1]}
    if frozenset() in conjs:
        return None
    order = list(first)
    ordered = sorted((sorted(c, key=order.index) for c in conjs), key=lambda c: [order.index(x) for x in c])
    return [[first[x] for x in conj] for conj in ordered]


def _condition_text(disjuncts: list[list[_Literal]]) -> str:
    """The condition as text, each clause once, in order: two literals of different source may read the same
    (`attention` is written `attention == true`), and say it twice (`attention == true or attention == true`)."""
    conjs = list(dict.fromkeys(tuple(dict.fromkeys(lit.text for lit in conj)) for conj in disjuncts))
    return " or ".join(" and ".join(conj) if len(conjs) == 1 or len(conj) == 1 else "(" + " and ".join(conj) + ")"
                       for conj in conjs)


def _literal_value(expr: ast.Expr) -> Value | None:
    """The value of a literal (a number, a negated number, a bool, a string, a name), or None for anything else."""
    if isinstance(expr, (ast.Number, ast.Bool, ast.String)):
        return expr.value
    if isinstance(expr, ast.UnaryOp) and expr.op == "-" and isinstance(expr.operand, ast.Number):
        return -expr.operand.value
    if isinstance(expr, ast.Name):
        return expr.id
    return None


def _choice_value(program, expr: ast.Expr, p: ast.Param) -> Value:
    value = _literal_value(expr)
    if value is None:
        raise SpecError(f"the search cannot sample '{p.name}': a choice must be a number, bool, string or "
                        "block name", expr.span, notes=[Note("declared here", p.span)])
    if isinstance(expr, ast.Name) and expr.id not in program.definitions:
        from gatedsl.ir.builtins import BUILTINS

        if expr.id not in BUILTINS:
            raise NameResolutionError(f"the choice '{expr.id}' of '{p.name}' names no block", expr.span)
    if isinstance(expr, ast.String) and any(c in value for c in '"\\\n'):
        raise SpecError(f"the choice {value!r} of '{p.name}' cannot be written back into a spec", expr.span)
    return value


def _names_block(p: ast.Param, value: str, program) -> bool:
    """Whether a str value of parameter `p` names a block (a choice among blocks, a block parameter) rather than text."""
    vt = p.value_type
    if vt is not None and vt.kind == "choice":
        return any(isinstance(c, ast.Name) and c.id == value for c in vt.choices)
    if vt is not None and vt.kind == "block":
        return True
    if vt is None:
        from gatedsl.ir.builtins import BUILTINS

        return value in program.definitions or value in BUILTINS
    return False


def _literal(p: ast.Param, value: Value, program) -> str:
    """`value` written as the spec would write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"'{p.name}' = {value} cannot be written into a spec")
        return repr(value)  # the shortest text that reads back as exactly this float
    if isinstance(value, str):
        if _names_block(p, value, program):
            return value
        if any(c in value for c in '"\\\n'):
            raise ValueError(f"'{p.name}' = {value!r} cannot be written as a spec string")
        return f'"{value}"'
    raise ValueError(f"'{p.name}' = {value!r} is not a value a spec can hold (a number, bool, string or block name)")


def _typed(dim: Dimension, value: Any) -> Value:
    """`value` as the dimension's type, or ValueError when it is not in the domain."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if dim.kind == "int" and isinstance(value, numbers.Integral) and number:
        value = int(value)  # numpy's ints too
    elif dim.kind == "int" and number and float(value).is_integer():
        value = int(value)
    elif dim.kind == "float" and number:
        value = float(value)
    elif dim.kind == "choice":
        value = next((c for c in dim.choices if _same(value, c)), value)
    if dim.kind == "float" and isinstance(value, float):
        value = _plain_float(value)
    if not dim.contains(value):
        raise ValueError(f"{value!r} is not in the domain of '{dim.name}' ({_describe_domain(dim)})")
    return value


def _describe_domain(dim: Dimension) -> str:
    if dim.kind in ("int", "float"):
        return f"{dim.kind} in {dim.low!r}..{dim.high!r}" + (" log" if dim.log else "")
    if dim.kind == "bool":
        return "bool"
    return "{" + ", ".join(map(repr, dim.choices)) + "}"


def _same(a: Any, b: Any) -> bool:
    return a == b and type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                             and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def _plain_float(value: float) -> float:
    return 0.0 if value == 0 else float(value)  # -0.0 would hash apart from 0.0


def _rng(seed_or_rng: int | random.Random) -> random.Random:
    if isinstance(seed_or_rng, random.Random):
        return seed_or_rng
    if isinstance(seed_or_rng, bool) or not isinstance(seed_or_rng, int):
        raise TypeError(f"pass an int seed or a random.Random, got {type(seed_or_rng).__name__}")
    return random.Random(seed_or_rng)


def _sha256(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
