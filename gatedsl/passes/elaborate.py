"""Elaborate: evaluate a model's AST with its parameters bound, inlining blocks, expanding repeats and ifs, into the graph IR with every shape inferred."""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import ValidationError

from gatedsl.errors import (
    LimitError,
    NameResolutionError,
    Note,
    ShapeError,
    SourceCache,
    Span,
    SpecError,
    SpecTypeError,
)
from gatedsl.frontend import ast
from gatedsl.frontend.loader import Program
from gatedsl.ir.graph import GATE_KINDS, NODE_KEYS, GateMark, Graph, InitSpec, ModuleSpec, ParamSpec, Port
from gatedsl.ir.model import Limits, ModelIR
from gatedsl.ir.ops import REGISTRY
from gatedsl.ir.types import Dim, Sym, TensorType, dim_mul, show_shape
from gatedsl.ir.values import Builtin, Tensor, describe
from gatedsl.ir.reserved_names import safe_argument_name, safe_attribute_name

MAX_DEPTH = 64  # nested block calls
MAX_INT_BITS = 64  # static integers beyond this are surely a mistake
MAX_SYM_FACTORS = 16  # a symbolic size B*T*... with more factors is surely a runaway product


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


class Elaborator:
    def __init__(self, program: Program, limits: Limits, memo: CallMemo | None = None):
        self.program = program
        self.limits = limits
        # Calls elaborated before, replayed at a new instance path (screening many candidates of one spec).
        self.memo = memo if memo is not None and memo.program is program else None
        self._recordings: list[_Recording] = []  # the memoised calls being elaborated, innermost last
        self._calls: dict[tuple, _Template | None] = {}  # the calls this elaboration recorded (see CallMemo)
        self._signature_dims: dict[int, set[str]] = {}
        self._calls_by_name: dict[int, list[ast.Call]] = {}  # per expression, its calls of param_count/flop_count
        self.budget = 0
        self.param_total = 0  # learned elements declared so far
        self.declared_params: list[ParamSpec] = []  # every learned tensor so far, for the over-the-limit diagnostic
        self.stack: list[Frame] = []
        self.used_names: dict[str, set[str]] = {}  # per path prefix, names already taken
        self.shapes: dict[str, TensorType] = {}
        # Model-level `require`s that read param_count()/flop_count(), with the names bound where they stand:
        # passes/check_budgets.py checks them once the counts exist (then `counted` is the counted unit).
        self.budget_requires: list[tuple[ast.Require, dict[str, Any]]] = []
        self.counted: ModelIR | None = None
        from gatedsl.ir import builtins  # registers the primitive functions

        self.builtins = builtins.BUILTINS

    # ------------------------------------------------------------------ helpers
    @property
    def frame(self) -> Frame:
        return self.stack[-1]

    def tick(self, span: Span, n: int = 1) -> None:
        self.budget += n
        if self.budget > self.limits.max_nodes:
            raise LimitError(
                f"the model expands to more than {self.limits.max_nodes} operations",
                span,
                help="a repeat count or a nesting is larger than intended",
            )

    def unique(self, prefix: str, base: str) -> str:
        taken = self.used_names.setdefault(prefix, set())
        # Instance paths become torch module attributes and Python names in generated code: keywords,
        # nn.Module / GraphModule attributes (training, forward, state_dict, ...) and _private names get a "_".
        base = safe_attribute_name(base)
        name, i = base, 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    def argument_name(self, name: str) -> str:
        """The name an input takes in the current graph's generated forward(): the spec's, unless Python or
        torch.fx reserves it (`def`, `self`, `torch`, `getattr` become `def_`, ...)."""
        graph = self.frame.graph
        taken = {graph.node(n)["attrs"].name for _, n in graph.inputs}
        return safe_argument_name(name, taken)

    def signature_dims(self, definition: ast.Definition) -> set[str]:
        """The names the sizes in a definition's tensor parameters read (H in `state h: [*, H]`), which a call may
        set by keyword."""
        found = self._signature_dims.get(id(definition))  # the program holds its definitions: ids stay theirs
        if found is None:
            found = self._signature_dims[id(definition)] = _signature_dims(definition)
        return found

    def module_path(self, role: str) -> str:
        """A fresh instance path for a primitive with learned tensors in the current statement."""
        stmt = self.frame.stmt
        return stmt + "." + self.unique(stmt + ".", role)

    def add(
        self,
        op: str,
        attrs: dict[str, Any],
        inputs: list[Tensor],
        span: Span,
        label: str = "",
        params_at: str | None = None,
    ) -> list[Tensor]:
        """Validate attrs, infer output types, add the node (and its learned tensors) to the current graph."""
        opdef = REGISTRY[op]
        self.budget += 1
        if self.budget > self.limits.max_nodes:
            self.tick(span, 0)  # raises the limit's error
        _check_constants(op, attrs.values(), span)
        try:
            validated = opdef.attrs(**attrs)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise SpecTypeError(f"{op}: {where}: {first['msg']}", span) from None
        in_types = [t.type for t in inputs]
        try:
            out_types = opdef.infer(validated, in_types)
        except ShapeError as err:
            notes = [Note(f"{_describe_operand(t)} is {t.type}", t.origin) for t in inputs if t.origin != span]
            raise ShapeError(err.message, span, notes=notes, help=err.help) from None
        for t in out_types:
            for d in t.shape:
                if type(d) is int:  # the common case first: this runs for every output of every op
                    if d < 0 or d.bit_length() > 48:
                        raise LimitError(f"{op} gives a dimension of size {d}", span)
                elif isinstance(d, Sym) and (d.coeff <= 0 or d.coeff.bit_length() > 48
                                             or len(d.factors) > MAX_SYM_FACTORS):
                    raise LimitError(f"{op} gives a dimension of size {d}", span)
        graph = self.stack[-1].graph
        # Read the field directly: getattr on a pydantic model without it takes a slow path through __getattr__.
        name = (label or validated.__dict__.get("fn") or op).replace(".", "_")
        node = graph.add(op, validated, [t.port for t in inputs], out_types, span, name)
        if params_at is not None:
            for decl in opdef.params(validated, in_types):
                self.add_param(params_at + "." + decl.role, decl.shape, decl.init, span)
        if len(out_types) == 1:
            return [Tensor((node, 0), out_types[0], span, label)]
        return [Tensor((node, i), t, span, label) for i, t in enumerate(out_types)]

    def add_param(self, path: str, shape: tuple[int, ...], init, span: Span) -> None:
        for d in shape:
            if not isinstance(d, int) or d <= 0:
                raise SpecTypeError(f"learned tensor {path} needs positive static sizes, got {list(shape)}", span)
        if init is not None:
            _check_constants("init", init.args, span)
        # Counted as they are declared, so that a model far over the limit stops here, not after a long expansion.
        numel = math.prod(shape)
        self.param_total += numel
        frame = self.stack[-1]
        spec = ParamSpec(path, tuple(shape), init, span, frame.path.rstrip("."))
        self.declared_params.append(spec)
        if self.param_total > self.limits.max_params:
            raise LimitError(
                f"the model has more than {self.limits.max_params:,} parameters (limit reached at {path}, "
                f"{numel:,} elements {list(shape)})",
                span,
                notes=[Note(f"{q.path} has {q.numel:,} elements {list(q.shape)}", q.span)
                       for q in sorted(self.declared_params, key=lambda q: -q.numel)[:3]],
                help="reduce the sizes, or raise the limit (max_params= / --max-params)",
            )
        frame.graph.params.append(spec)

    # --------------------------------------------------------------- the model
    def elaborate_model(self, model: ast.Definition, overrides: dict[str, Any]) -> tuple[Graph, dict[str, Any]]:
        from gatedsl.frontend.parameters import bind_model_parameters

        graph = Graph(model.name)
        frame = Frame(model, graph, "", {})
        self.stack.append(frame)
        bound = bind_model_parameters(self, model, overrides)
        frame.env.update(bound)
        self.run_body(model.body)
        self.stack.pop()
        if not graph.outputs:
            raise SpecError(f"model {model.name} has no output", model.span,
                            help="add `output y = ...`")
        return graph, bound

    # ------------------------------------------------------------ statements
    def run_body(self, body: list[ast.Stmt]) -> None:
        for stmt in body:
            try:
                self.run_stmt(stmt)
            except RecursionError:  # the innermost statement reports it; outer ones see a LimitError
                raise LimitError("the spec nests too deeply to elaborate (blocks within blocks, or expressions)",
                                 stmt.span, help="flatten the nesting: name intermediate values") from None

    def run_stmt(self, stmt: ast.Stmt) -> None:
        kind = self.frame.definition.kind
        if isinstance(stmt, ast.Assign):
            self.assign(stmt.targets, stmt.value, stmt.span)
        elif isinstance(stmt, ast.GateStmt):
            self.gate(stmt)
        elif isinstance(stmt, ast.InputStmt):
            if kind != "model" or len(self.stack) > 1:
                raise SpecError("`input` declares a model input; a block or cell takes tensors as parameters",
                                stmt.span, help=f"add `{stmt.name}: [...]` to the signature instead")
            self.model_input(stmt)
        elif isinstance(stmt, ast.OutputStmt):
            if kind != "model" or len(self.stack) > 1:
                raise SpecError("`output` belongs in a model; a block or cell uses `return`", stmt.span)
            self.model_output(stmt)
        elif isinstance(stmt, ast.Return):
            if kind == "model":
                raise SpecError("a model names its results with `output NAME = ...`, not `return`", stmt.span)
            if self.frame.returns is not None:
                raise SpecError("a second `return` in the same definition", stmt.span)
            self.set_stmt("out")
            self.frame.returns = [self.eval(v) for v in stmt.values]
        elif isinstance(stmt, ast.Repeat):
            self.repeat(stmt)
        elif isinstance(stmt, ast.If):
            cond = self.static_bool(stmt.cond, "an `if` condition")
            self.run_body(stmt.then if cond else stmt.orelse)
        elif isinstance(stmt, ast.Require):
            if self.counted is None and self.budget_calls(stmt.cond):
                if len(self.stack) > 1:
                    raise SpecError("a budget (param_count(), flop_count()) is known only for a whole model", stmt.span,
                                    help="require it at the top level of the model, not in a block, cell or stage")
                self.budget_requires.append((stmt, dict(self.frame.env)))
            else:
                self.check_require(stmt)
        elif isinstance(stmt, ast.AuxStmt):
            self.aux(stmt)
        elif isinstance(stmt, ast.ExitStmt):
            self.exit_stage(stmt)
        else:  # pragma: no cover - the grammar has no other statements
            raise SpecError(f"unsupported statement {type(stmt).__name__}", stmt.span)

    def check_require(self, stmt: ast.Require) -> None:
        """Raise the requirement's SpecError, with the values it read, unless its condition holds."""
        if not self.static_bool(stmt.cond, "a `require` condition"):
            notes = self._binding_notes(stmt.cond)
            for call in self.budget_calls(stmt.cond):
                sizes = ", ".join(f"{kw.name}={_show(self.eval(kw.value))}" for kw in call.kwargs)
                notes.append(Note(f"{call.func.id}({sizes}) = {self.eval(call):,}", call.span))
            raise SpecError(f"requirement failed: {stmt.message or 'the condition is false'}", stmt.cond.span,
                            notes=notes)

    def budget_calls(self, expr: ast.Node) -> list[ast.Call]:
        """The calls of param_count() and flop_count(...) in `expr` (names a spec has not rebound)."""
        calls = self._calls_by_name.get(id(expr))  # the program holds its AST: ids stay their nodes'
        if calls is None:
            calls = self._calls_by_name[id(expr)] = _budget_named_calls(expr)
        env, definitions = self.frame.env, self.program.definitions
        return [c for c in calls if c.func.id not in env and c.func.id not in definitions]

    def _binding_notes(self, expr: ast.Expr) -> list[Note]:
        names = sorted({n.id for n in _names_in(expr) if n.id in self.frame.env})
        shown = [f"{n} = {_show(self.frame.env[n])}" for n in names]
        return [Note(", ".join(shown))] if shown else []

    def set_stmt(self, target: str) -> None:
        frame = self.frame
        frame.stmt = frame.path + self.unique(frame.path, target)
        frame.stmt_params = len(frame.graph.params)
        frame.stmt_modules = len(frame.graph.modules)

    def assign(self, targets: list[str], expr: ast.Expr, span: Span) -> None:
        self.set_stmt(targets[0])
        if isinstance(expr, ast.Scan):
            value = self.scan(expr, want_all=len(targets) > 1)
        elif isinstance(expr, ast.Cascade):
            value = self.cascade(expr, len(targets))
        else:
            value = self.eval(expr)
        if len(targets) == 1:
            values = [value]
        else:
            if not isinstance(value, (tuple, list)):
                raise SpecTypeError(f"cannot unpack {describe(value)} into {len(targets)} names", span)
            if len(value) != len(targets):
                raise SpecTypeError(f"{len(targets)} names on the left, {len(value)} values on the right", span)
            values = list(value)
        for name, v in zip(targets, values):
            self.bind(name, v, span)

    def bind(self, name: str, value: Any, span: Span) -> None:
        if name in self.builtins or name in self.program.definitions:
            raise NameResolutionError(f"'{name}' is a builtin or a definition and cannot be reassigned", span,
                                      help="choose another name")
        frame = self.stack[-1]
        if isinstance(value, Tensor):
            value = Tensor(value.port, value.type, value.origin, name)
            self.shapes[frame.path + name] = value.type
            node = frame.graph.node(value.port[0])
            if node["op"] not in ("input", "param"):
                if self._recordings:
                    self._touch(value.port[0])
                if len(node["types"]) > 1:  # `y, h_T = scan ...`: a name per output, the node is `y_h_T`
                    names = node.setdefault("out_names", {})
                    names[value.port[1]] = name
                    node["name"] = "_".join(names[i] for i in sorted(names)) + (
                        "" if len(names) == len(node["types"]) else "_all")
                else:
                    node["name"] = name  # generated code reads like the spec
        frame.env[name] = value

    def float_tensor(self, expr: ast.Expr, what: str, fix: str) -> Tensor:
        """Evaluate `expr`, which must give a float tensor: `what` must be one, and `fix` says how."""
        value = self.eval(expr)
        if not isinstance(value, Tensor):
            raise SpecTypeError(f"{what} must be a tensor, got {describe(value)}", expr.span)
        if value.type.dtype != "float":
            raise SpecTypeError(f"{what} must be a float tensor, got {value.type}", expr.span, help=fix)
        return value

    def gate(self, stmt: ast.GateStmt) -> None:
        self.set_stmt(stmt.name)
        value = self.float_tensor(stmt.value, "a gate multiplies, so it",
                                  "wrap it in to_float(...), or use binary(...) for a 0/1 gate")
        node = self.frame.graph.node(value.port[0])
        kind = stmt.kind or _gate_kind(node)
        if kind is None:
            raise SpecTypeError(
                f"cannot tell what kind of gate '{stmt.name}' is from its last op ({node['op']})",
                stmt.span,
                help=f"name it: `gate KIND {stmt.name} = ...` with KIND one of {', '.join(GATE_KINDS)}",
            )
        if kind not in GATE_KINDS:
            raise SpecTypeError(f"unknown gate kind '{kind}'", stmt.span,
                                help=f"gate kinds are {', '.join(GATE_KINDS)}")
        self._touch(value.port[0])
        node["gate"] = GateMark(kind=kind, name=self.frame.path + stmt.name, line=stmt.span.line,
                                file=stmt.span.file)
        self.bind(stmt.name, value, stmt.span)

    def aux(self, stmt: ast.AuxStmt) -> None:
        """`aux NAME = expr`: a value the compiled module records at each call under its instance path."""
        top = self.stack[0].graph
        if self.frame.graph is not top:
            raise SpecError(
                f"`aux {stmt.name}` inside a scanned cell (a sub-graph run once per step): aux values are recorded "
                "once per call of the model", stmt.span,
                help="return the value from the cell (or carry it as a state) and record it with `aux` after the scan")
        self.set_stmt(stmt.name)
        value = self.float_tensor(stmt.value, "an aux value (usually a scalar loss)", "wrap it in to_float(...)")
        path = self.frame.path + stmt.name
        if any(name == path for name, _ in top.aux):
            raise NameResolutionError(f"aux '{path}' is recorded twice", stmt.span,
                                      help="give each aux value of a block its own name")
        top.aux.append((path, value.port))
        self.bind(stmt.name, value, stmt.span)

    def model_input(self, stmt: ast.InputStmt) -> None:
        if stmt.name in self.frame.env:
            raise NameResolutionError(f"'{stmt.name}' is already defined", stmt.span)
        ttype = self.eval_tensor_type(stmt.type, free_symbols=True)
        (t,) = self.add("input", {"name": self.argument_name(stmt.name), "type": ttype}, [], stmt.span,
                        label=stmt.name)
        self.frame.graph.inputs.append((stmt.name, t.port[0]))
        self.bind(stmt.name, t, stmt.span)
        for d in ttype.shape:  # symbolic sizes become names in the body: zeros([B, 4])
            if isinstance(d, Sym) and len(d.factors) == 1 and d.coeff == 1:
                self.frame.env.setdefault(d.factors[0], d)

    def model_output(self, stmt: ast.OutputStmt) -> None:
        if any(name == stmt.name for name, _ in self.frame.graph.outputs):
            raise NameResolutionError(f"output '{stmt.name}' is declared twice", stmt.span)
        self.set_stmt(stmt.name)
        value = self.eval(stmt.value) if stmt.value is not None else self.lookup(stmt.name, stmt.span)
        if not isinstance(value, Tensor):
            raise SpecTypeError(f"an output must be a tensor, got {describe(value)}", stmt.span)
        self.frame.graph.outputs.append((stmt.name, value.port))
        self.bind(stmt.name, value, stmt.span)

    def repeat(self, stmt: ast.Repeat) -> None:
        count = self.eval(stmt.count)
        if isinstance(count, bool) or not isinstance(count, int):
            raise SpecTypeError(f"repeat needs a static int count, got {describe(count)}", stmt.count.span)
        if count < 0:
            raise SpecTypeError(f"repeat count is negative ({count})", stmt.count.span)
        scope = stmt.scope or (stmt.count.id if isinstance(stmt.count, ast.Name) else "repeat")
        scope = self.unique(self.frame.path, scope)
        outer = self.frame.path
        for i in range(count):
            self.tick(stmt.span)
            self.frame.path = f"{outer}{scope}.{i}."
            if stmt.index:
                self.frame.env[stmt.index] = i
            self.run_body(stmt.body)
        self.frame.path = outer

    # ---------------------------------------------------------- expressions
    def static_bool(self, expr: ast.Expr, what: str) -> bool:
        value = self.eval(expr)
        if not isinstance(value, bool):
            raise SpecTypeError(f"{what} must be a static bool, got {describe(value)}", expr.span,
                                help="conditions are decided when the model is built, from parameters")
        return value

    def static_int(self, expr: ast.Expr, what: str) -> int:
        value = self.eval(expr)
        return self.as_int(value, expr.span, what)

    def as_int(self, value: Any, span: Span, what: str) -> int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            hint = "use // for integer division" if isinstance(value, float) else None
            raise SpecTypeError(f"{what} must be a static int, got {describe(value)}", span, help=hint)
        return value

    def lookup(self, name: str, span: Span) -> Any:
        env = self.frame.env
        if name in env:
            return env[name]
        if name in self.program.definitions:
            return self.program.definitions[name]
        if name in self.builtins:
            return _builtin_value(name)
        import difflib

        known = list(env) + list(self.program.definitions) + list(self.builtins)
        close = difflib.get_close_matches(name, known, n=1)
        raise NameResolutionError(f"unknown name '{name}'", span,
                                  help=f"did you mean '{close[0]}'?" if close else None)

    def eval(self, expr: ast.Expr) -> Any:
        kind = type(expr)  # the AST's expression classes are leaves: one lookup instead of a chain of isinstance
        if kind is ast.Name:
            return self.lookup(expr.id, expr.span)
        method = _EVAL.get(kind)
        if method is None:  # pragma: no cover - the grammar has no other expressions
            raise SpecError(f"unsupported expression {kind.__name__}", expr.span)
        return method(self, expr)

    def number(self, expr: ast.Number) -> int | float:
        if isinstance(expr.value, int) and expr.value.bit_length() > MAX_INT_BITS:
            raise LimitError(f"the integer {_short(expr.value)} is too large", expr.span,
                             help=f"static integers have at most {MAX_INT_BITS} bits")
        if isinstance(expr.value, float) and not math.isfinite(expr.value):
            raise LimitError("a number overflows to infinity", expr.span)
        return expr.value

    def unary(self, expr: ast.UnaryOp) -> Any:
        value = self.eval(expr.operand)
        if expr.op == "not":
            if isinstance(value, bool):
                return not value
            if isinstance(value, Tensor):
                return self.add("unary", {"fn": "not"}, [value], expr.span)[0]
            raise SpecTypeError(f"`not` needs a bool, got {describe(value)}", expr.span)
        if isinstance(value, Tensor):
            if expr.op == "+":
                return value
            return self.add("unary", {"fn": "neg"}, [value], expr.span)[0]
        if isinstance(value, Sym):
            return dim_mul(value, -1 if expr.op == "-" else 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecTypeError(f"unary {expr.op} needs a number or tensor, got {describe(value)}", expr.span)
        return -value if expr.op == "-" else value

    def binop(self, expr: ast.BinOp) -> Any:
        if expr.op in ("and", "or"):
            left = self.eval(expr.left)
            if isinstance(left, bool):  # short-circuit, as Python does, so guards like `a > 0 and d % a == 0` work
                if (expr.op == "and" and not left) or (expr.op == "or" and left):
                    return left
                right = self.eval(expr.right)
                if isinstance(right, bool):
                    return right
                raise SpecTypeError(f"`{expr.op}` needs bools, got {describe(right)}", expr.right.span)
            right = self.eval(expr.right)
            if isinstance(left, Tensor) and isinstance(right, Tensor):
                return self.add("binary", {"fn": expr.op}, [left, right], expr.span)[0]
            raise SpecTypeError(f"`{expr.op}` needs two bools or two tensors, got {describe(left)} and {describe(right)}",
                                expr.span)
        left = self.eval(expr.left)
        right = self.eval(expr.right)
        if isinstance(left, Tensor) or isinstance(right, Tensor):
            return self.tensor_binop(expr, left, right)
        from gatedsl.ir.static_math import static_binop

        return static_binop(expr.op, left, right, expr.span)

    def tensor_binop(self, expr: ast.BinOp, left: Any, right: Any) -> Tensor:
        fn = _BINOP_FN[expr.op]
        if fn == "matmul":
            if not (isinstance(left, Tensor) and isinstance(right, Tensor)):
                raise SpecTypeError("@ multiplies two tensors", expr.span)
            return self.add("matmul", {}, [left, right], expr.span)[0]
        attrs: dict[str, Any] = {"fn": fn}
        inputs = []
        for side, value, sub in (("left", left, expr.left), ("right", right, expr.right)):
            if isinstance(value, Tensor):
                inputs.append(value)
            elif isinstance(value, (int, float)):  # bool is an int too
                attrs[f"{side}_scalar"] = value
            else:
                raise SpecTypeError(f"cannot combine a tensor with {describe(value)} by {expr.op}", sub.span)
        return self.add("binary", attrs, inputs, expr.span)[0]

    def index(self, expr: ast.Index) -> Any:
        value = self.eval(expr.value)
        if isinstance(value, (list, tuple)):
            if len(expr.items) != 1 or isinstance(expr.items[0], (ast.Slice, ast.Ellipsis_)):
                raise SpecTypeError("a list takes one integer index", expr.span)
            i = self.static_int(expr.items[0], "a list index")
            if not -len(value) <= i < len(value):
                raise SpecTypeError(f"index {i} is out of range for a list of {len(value)}", expr.span)
            return value[i]
        if not isinstance(value, Tensor):
            raise SpecTypeError(f"cannot index {describe(value)}", expr.value.span)
        items = []
        for item in expr.items:
            if isinstance(item, ast.Ellipsis_):
                items.append(("ellipsis",))
            elif isinstance(item, ast.Slice):
                parts = [None if p is None else self.static_int(p, "a slice bound") for p in (item.start, item.stop, item.step)]
                items.append(("slice", *parts))
            else:
                v = self.eval(item)
                if isinstance(v, Tensor):
                    raise SpecTypeError("index with static ints and slices; use gather() with a tensor of indices",
                                        item.span)
                items.append(("int", self.as_int(v, item.span, "an index")))
        return self.add("index", {"items": tuple(items)}, [value], expr.span)[0]

    # ------------------------------------------------------------------ calls
    def call(self, expr: ast.Call) -> Any:
        callee = self.eval(expr.func)
        if isinstance(callee, Builtin):
            value = self.builtins[callee.name](self, expr)
            if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
                raise LimitError(f"{callee.name} gives {_short(value)}, which is too large", expr.span,
                                 help=f"static integers have at most {MAX_INT_BITS} bits")
            return value
        if isinstance(callee, ast.Definition):
            if callee.kind == "model":
                raise SpecTypeError(f"model {callee.name} cannot be called; use a block", expr.span)
            name = expr.func.id if isinstance(expr.func, ast.Name) else callee.name
            args = [self.eval(a) for a in expr.args]
            kwargs = {k.name: (self.eval(k.value), k.span) for k in expr.kwargs}
            return self.invoke(callee, args, kwargs, expr, name)
        raise SpecTypeError(f"{describe(callee)} is not callable", expr.func.span)

    def invoke(self, definition: ast.Definition, args, kwargs, call: ast.Expr, name: str) -> Any:
        """Inline a block (or one step of a cell) at the call site."""
        self._enter_check(definition, call.span)
        path = self.frame.path + self.unique(self.frame.path, name) + "."
        return self.memoised(("call", id(call)), definition, args, kwargs, path,
                             lambda: self._invoke(definition, args, kwargs, call, path))

    def _invoke(self, definition: ast.Definition, args, kwargs, call: ast.Expr, path: str) -> Any:
        frame = Frame(definition, self.frame.graph, path, {})
        bind_signature(self, definition, frame, args, kwargs, call, step_axis=None)
        if definition.kind == "cell":
            # One step of a cell: states not given start at zero.
            frame.env.update(self._zero_states(definition, frame, call.span))
        self.stack.append(frame)
        try:
            self.run_body(definition.body)
        finally:
            self.stack.pop()
        if definition.kind == "cell":
            return self._cell_result(definition, frame)[0]
        if frame.returns is None:
            raise SpecError(f"block {definition.name} has no `return`", definition.span)
        return frame.returns[0] if len(frame.returns) == 1 else tuple(frame.returns)

    def memoised(self, site: tuple, callee: ast.Definition, args: list, kwargs: dict, path: str,
                 elaborate: Callable[[], Any]) -> Any:
        """`elaborate()`, the call of `callee` at `site` with these arguments, made at instance `path` in the
        current frame: replayed from the memo where the same call was elaborated with the same arguments and
        in the same place before, else elaborated (and recorded)."""
        memo = self.memo
        key, ports = memo.key(self, site, callee, args, kwargs) if memo is not None else (None, None)
        if key is None:
            return elaborate()
        found, template = memo.get(key, self._calls)
        if template is not None:
            replayed = template.replay(self, path, ports)
            if replayed is not _OVER_LIMIT:
                return replayed[0]
            # Over a limit: elaborate, so that the error names the op or tensor where the limit is crossed.
        elif found:  # known not to be memoisable
            return elaborate()
        recording = _Recording(self)
        self._recordings.append(recording)
        try:
            value = elaborate()
        finally:
            self._recordings.pop()
        memo.put(key, recording.template(self, path, ports, value), self._calls)
        return value

    def _touch(self, node: int) -> None:
        """A node is about to be renamed or marked: a body being recorded must not change one it did not add."""
        graph = self.frame.graph
        for recording in self._recordings:
            if graph is recording.graph and node < recording.start:
                recording.memoisable = False

    def _enter_check(self, definition: ast.Definition, span: Span) -> None:
        for f in self.stack:
            if f.definition is definition:
                raise SpecError(f"{definition.kind} {definition.name} calls itself", span,
                                notes=[Note("defined here", definition.span)],
                                help="use `repeat` for a fixed depth; recursion has no static bound")
        if len(self.stack) >= MAX_DEPTH:
            raise LimitError(f"blocks nest more than {MAX_DEPTH} deep", span)

    def _zero_states(self, definition: ast.Definition, frame: Frame, span: Span) -> dict[str, Tensor]:
        out = {}
        for p in definition.params:
            if p.state and p.name not in frame.env:
                ttype = frame.env[f"\0type:{p.name}"]
                self.stack.append(frame)
                try:
                    (t,) = self.add("fill", {"value": 0.0, "shape": ttype.shape, "dtype": ttype.dtype}, [], span,
                                    label=f"{p.name}0")
                finally:
                    self.stack.pop()
                out[p.name] = Tensor(t.port, t.type, p.span, p.name)
        return out

    def _cell_result(self, definition: ast.Definition, frame: Frame) -> tuple[Tensor, list[Tensor]]:
        states = []
        for p in definition.params:
            if not p.state:
                continue
            value = frame.env[p.name]
            declared: TensorType = frame.env[f"\0type:{p.name}"]
            if not isinstance(value, Tensor):
                raise SpecTypeError(f"state {p.name} must stay a tensor, got {describe(value)}", p.span)
            if value.type != declared:
                raise ShapeError(
                    f"state {p.name} changes from {declared} to {value.type} in one step",
                    value.origin,
                    notes=[Note(f"{p.name} is declared {declared}", p.span)],
                    help="a carried state must keep its shape and dtype",
                )
            states.append(value)
        if not states:
            raise SpecError(f"cell {definition.name} has no `state` parameter", definition.span,
                            help="declare the carried state: `state h: [*, H]`")
        if frame.returns is not None:
            if len(frame.returns) != 1 or not isinstance(frame.returns[0], Tensor):
                raise SpecTypeError(f"cell {definition.name} must return one tensor", definition.span)
            emitted = frame.returns[0]
        else:
            emitted = states[0]
        return emitted, states

    # ------------------------------------------------------------------ scan
    def scan(self, expr: ast.Scan, want_all: bool) -> Any:
        cell = self.lookup(expr.cell.id, expr.cell.span)
        if not isinstance(cell, ast.Definition) or cell.kind != "cell":
            raise SpecTypeError(f"scan runs a cell, and {describe(cell)} is not one", expr.cell.span)
        self._enter_check(cell, expr.span)
        args = [self.eval(a) for a in expr.args]
        kwargs = {k.name: (self.eval(k.value), k.span) for k in expr.kwargs}
        path = self.frame.path + self.unique(self.frame.path, expr.cell.id) + "."
        # `over T` inside a block means the block's T (bound by its signature to the caller's size, say S).
        axis = expr.axis
        if isinstance(axis, str) and isinstance(self.frame.env.get(axis), Sym):
            axis = self.frame.env[axis]
        label = self.frame.stmt.rsplit(".", 1)[-1]
        return self.memoised(("scan", id(expr), want_all, axis, label), cell, args, kwargs, path,
                             lambda: self._scan(expr, want_all, cell, args, kwargs, path, axis, label))

    def _scan(self, expr: ast.Scan, want_all: bool, cell: ast.Definition, args: list, kwargs: dict, path: str,
              axis: str | int | Sym, label: str) -> Any:
        body = Graph(cell.name)
        frame = Frame(cell, body, path, {})
        # Bind the signature against one step: sequences lose the scanned axis.
        outer = bind_signature(self, cell, frame, args, kwargs, expr, step_axis=(axis, expr.axis_span))
        # Placeholders of the body: one per cell parameter, in signature order.
        self.stack.append(frame)
        try:
            roles, axes, outer_inputs = [], [], []
            for p in cell.params:
                if p.tensor is None:
                    continue
                step_type: TensorType = frame.env[f"\0type:{p.name}"]
                role, axis, value = outer[p.name]
                if role == "state" and value is None:
                    self.stack.pop()
                    try:
                        (value,) = self.add("fill", {"value": 0.0, "shape": step_type.shape,
                                                     "dtype": step_type.dtype}, [], expr.span, label=f"{p.name}0")
                    finally:
                        self.stack.append(frame)
                (ph,) = self.add("input", {"name": self.argument_name(p.name), "type": step_type}, [], p.span,
                                 label=p.name)
                body.inputs.append((p.name, ph.port[0]))
                frame.env[p.name] = Tensor(ph.port, ph.type, p.span, p.name)
                roles.append(role)
                if role == "seq":
                    axes.append(axis)
                outer_inputs.append(value)
            self.run_body(cell.body)
            emitted, states = self._cell_result(cell, frame)
        finally:
            self.stack.pop()
        body.outputs = [("out", emitted.port)] + [(p.name, s.port) for p, s in
                                                 zip([p for p in cell.params if p.state], states)]
        results = self.add(
            "scan",
            {"cell": cell.name, "path": path.rstrip("."), "body": body, "axes": tuple(axes), "roles": tuple(roles),
             "n_states": len(states), "reverse": expr.reverse, "last": expr.last},
            outer_inputs,
            expr.span,
            label=label,
        )
        return tuple(results) if want_all else results[0]

    # --------------------------------------------------------------- cascade
    def cascade(self, expr: ast.Cascade, n_targets: int) -> Any:
        """Early exit (GATES.md §7): elaborate each stage into its own graph, all held by one `cascade` op.

        The stages read outer tensors by name: one assigned in the body is carried from stage
        to stage (and, after the cascade, is its value at each sample's exit); the others are
        read only. Gives (y, exit_at, ys, gs), as many as there are targets.
        """
        if n_targets > 4:
            raise SpecTypeError(f"a cascade gives 4 values (y, exit_at, ys, gs), not {n_targets}", expr.span)
        count = self.eval(expr.count)
        if isinstance(count, bool) or not isinstance(count, int):
            raise SpecTypeError(f"a cascade needs a static int count of stages, got {describe(count)}", expr.count.span)
        if count < 1:
            raise SpecTypeError(f"a cascade needs at least one stage, got {count}", expr.count.span)
        outer = self.frame
        read, assigned = _cascade_names(expr.body)
        captured: dict[str, Tensor] = {}  # the outer tensors the stages read, in order of first use
        for name, span in [(n.id, n.span) for n in read] + [(n, expr.span) for n in assigned]:
            value = outer.env.get(name)
            if isinstance(value, Tensor):
                captured.setdefault(name, value)
            elif name not in assigned and _holds_tensor(value):
                raise SpecTypeError(f"a cascade stage reads tensors by name, and '{name}' is {describe(value)}", span,
                                    help=f"name the one it needs before the cascade: `a = {name}[0]`")
        carried = [name for name in captured if name in assigned]
        named = expr.count.id if isinstance(expr.count, ast.Name) else "cascade"
        scope = self.unique(outer.path, expr.scope or named)
        stages = [self.cascade_stage(expr, f"{outer.path}{scope}.{index}.", index, captured, carried)
                  for index in range(count)]
        for index, (_, head, gate, _) in enumerate(stages[1:], 1):
            for what, now, first in (("exit head", head, stages[0][1]), ("exit gate", gate, stages[0][2])):
                if now.type != first.type:
                    raise ShapeError(f"every stage's {what} must have one shape, to be stacked: stage {index} "
                                     f"gives {now.type}, stage 0 {first.type}", now.origin,
                                     notes=[Note(f"stage 0's {what} is {first.type}", first.origin)])
        samples = stages[0][2].type.shape[0]
        roles = []
        for name, value in captured.items():
            per_sample = value.type.rank >= 1 and value.type.shape[0] == samples
            if name in carried and not per_sample:
                raise ShapeError(f"{name} is carried from stage to stage, so it must have one row per sample "
                                 f"({samples}) first; it is {value.type}", value.origin)
            roles.append("carry" if name in carried else "rows" if per_sample else "whole")
        if "carry" not in roles and "rows" not in roles:
            raise ShapeError(f"no tensor the cascade reads has the samples ({samples}) as its first dim, so it cannot "
                             "run a stage on the samples still in", expr.span)
        results = self.add(
            "cascade",
            {"path": f"{outer.path}{scope}", "body": self.cascade_stack(expr, scope, captured, roles, stages),
             "roles": tuple(roles), "thresholds": tuple(t for *_, t in stages)},
            list(captured.values()),
            expr.span,
            label=outer.stmt.rsplit(".", 1)[-1],
        )
        for name, value in zip(carried, results[4:]):
            self.bind(name, value, expr.span)  # its value at each sample's exit stage
        return tuple(results[:n_targets]) if n_targets > 1 else results[0]

    def cascade_stage(self, expr: ast.Cascade, path: str, index: int, captured: dict[str, Tensor],
                      carried: list[str]) -> tuple[Graph, Tensor, Tensor, float]:
        """One stage as a graph from the captured tensors to (exit head, exit gate, *carried values)."""
        self.tick(expr.span)
        outer = self.frame
        graph = Graph(path.rstrip(".").replace(".", "_"))  # the class of its sub-module: stages_0
        frame = Frame(outer.definition, graph, path, {k: v for k, v in outer.env.items() if not _holds_tensor(v)})
        frame.env["\0exit"] = None  # set by the stage's `exit`
        if expr.index:
            frame.env[expr.index] = index
        self.stack.append(frame)
        try:
            for name, value in captured.items():
                (ph,) = self.add("input", {"name": self.argument_name(name), "type": value.type}, [], value.origin,
                                 label=name)
                graph.inputs.append((name, ph.port[0]))
                frame.env[name] = Tensor(ph.port, ph.type, value.origin, name)
            self.run_body(expr.body)
        finally:
            self.stack.pop()
        if frame.env["\0exit"] is None:
            raise SpecError("a cascade stage must end in `exit HEAD when GATE > THRESHOLD`", expr.span)
        head, gate, threshold, _ = frame.env["\0exit"]
        for name in carried:
            value = frame.env[name]
            if not isinstance(value, Tensor) or value.type != captured[name].type:
                raise ShapeError(
                    f"{name} is carried from stage to stage, so it must stay {captured[name].type}; "
                    f"stage {index} makes it {_show(value)}", value.origin if isinstance(value, Tensor) else expr.span,
                    notes=[Note(f"{name} is {captured[name].type} before the cascade", captured[name].origin)])
        graph.outputs = [("exit", head.port), ("gate", gate.port)] + [(n, frame.env[n].port) for n in carried]
        return graph, head, gate, threshold

    def cascade_stack(self, expr: ast.Cascade, scope: str, captured: dict[str, Tensor], roles: list[str],
                      stages: list[tuple[Graph, Tensor, Tensor, float]]) -> Graph:
        """The stack as a graph: the captured tensors, then one cascade_stage node per stage, chained by the carried
        values (what training runs; it holds the stages for every pass that walks the IR)."""
        outer = self.frame
        stack = Graph(scope)
        self.stack.append(Frame(outer.definition, stack, outer.path, {}))
        try:
            inputs = []
            for name, value in captured.items():
                (ph,) = self.add("input", {"name": self.argument_name(name), "type": value.type}, [], value.origin,
                                 label=name)
                stack.inputs.append((name, ph.port[0]))
                inputs.append(ph)
            values = list(inputs)
            for index, (graph, *_) in enumerate(stages):
                outs = self.add("cascade_stage", {"path": f"{outer.path}{scope}.{index}", "body": graph}, values,
                                expr.span, label=f"{scope}_{index}")
                stack.outputs += [(f"exit.{index}", outs[0].port), (f"gate.{index}", outs[1].port)]
                new = iter(outs[2:])
                values = [next(new) if role == "carry" else ph for role, ph in zip(roles, inputs)]
        finally:
            self.stack.pop()
        return stack

    def exit_stage(self, stmt: ast.ExitStmt) -> None:
        """`exit HEAD when GATE > THRESHOLD`: record the stage's exit head, its gate and the threshold."""
        env = self.frame.env
        if "\0exit" not in env:
            raise SpecError("`exit` ends a stage of a cascade, and this is not in one", stmt.span,
                            help="y, exit_at, ys, gs = cascade l in stages { ...; exit HEAD when GATE > THRESHOLD }")
        if env["\0exit"] is not None:
            raise SpecError("a second `exit` in the same cascade stage", stmt.span,
                            notes=[Note("the first is here", env["\0exit"][3])])
        self.set_stmt("exit")
        head = self.eval(stmt.head)
        if not isinstance(head, Tensor) or head.type.dtype != "float" or head.type.rank == 0:
            raise SpecTypeError(f"an exit head gives a float tensor with one row per sample, got {describe(head)}",
                                stmt.head.span)
        gate = self.eval(stmt.gate)
        if not isinstance(gate, Tensor) or self.frame.graph.node(gate.port[0])["gate"] is None:
            raise SpecTypeError(f"an exit fires on a gate declared with `gate` (so it is reported), got "
                                f"{describe(gate) if not isinstance(gate, Tensor) else 'a tensor that is not one'}",
                                stmt.gate.span, help="gate g = sigmoid(linear(h, 1)), then `exit ... when g > tau`")
        if not (gate.type.rank == 1 or (gate.type.rank == 2 and gate.type.shape[1] == 1)):
            raise ShapeError(f"an exit gate has one value per sample, [B] or [B, 1]; got {gate.type}", stmt.gate.span)
        if head.type.shape[0] != gate.type.shape[0]:
            raise ShapeError(f"the exit head {head.type} and its gate {gate.type} must have the samples first",
                             stmt.span, notes=[Note(f"the head is {head.type}", stmt.head.span),
                                               Note(f"the gate is {gate.type}", stmt.gate.span)])
        threshold = self.eval(stmt.threshold)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise SpecTypeError(f"an exit threshold is a static number, got {describe(threshold)}",
                                stmt.threshold.span)
        env["\0exit"] = (head, gate, float(threshold), stmt.span)

    # ------------------------------------------------------------------ types
    def eval_tensor_type(self, ttype: ast.TensorType, free_symbols: bool) -> TensorType:
        dims: list[Dim] = []
        for i, d in enumerate(ttype.dims):
            if isinstance(d, ast.StarDim):
                raise SpecTypeError("a model input has a definite rank: name each dim (B, T, ...)", d.span)
            if isinstance(d, ast.Name) and free_symbols and d.id not in self.frame.env and d.id not in self.builtins \
                    and d.id not in self.program.definitions:
                dims.append(Sym.named(d.id))
                continue
            value = self.eval(d)
            dims.append(self.as_dim(value, d.span))
        return TensorType(tuple(dims), ttype.dtype)

    def as_dim(self, value: Any, span: Span) -> Dim:
        if isinstance(value, Sym):
            if value.coeff <= 0:
                raise SpecTypeError(f"a dimension must be positive, got {value}", span)
            return value
        size = self.as_int(value, span, "a dimension")
        if size <= 0:
            raise SpecTypeError(f"a dimension must be positive, got {size}", span)
        if size.bit_length() > 48:
            raise LimitError(f"the dimension {size} is too large", span)
        return size


# How each kind of expression evaluates (names are looked up first, in Elaborator.eval).
_EVAL: dict[type, Callable[[Elaborator, Any], Any]] = {
    ast.Call: Elaborator.call,
    ast.BinOp: Elaborator.binop,
    ast.Number: Elaborator.number,
    ast.UnaryOp: Elaborator.unary,
    ast.Index: Elaborator.index,
    ast.String: lambda el, expr: expr.value,
    ast.Bool: lambda el, expr: expr.value,
    ast.ListExpr: lambda el, expr: [el.eval(item) for item in expr.items],
    ast.Scan: lambda el, expr: el.scan(expr, want_all=False),
}


@functools.lru_cache(maxsize=None)
def _builtin_value(name: str) -> Builtin:
    return Builtin(name)  # one per name: Builtin is frozen, and a name is looked up at every call


# The statement forms of binary operators, as IR fns.
_BINOP_FN = {
    "+": "add", "-": "sub", "*": "mul", "/": "div", "//": "floordiv", "%": "mod", "**": "pow", "@": "matmul",
    "==": "eq", "!=": "ne", "<": "lt", "<=": "le", ">": "gt", ">=": "ge",
}


def _gate_kind(node: dict) -> str | None:
    op, attrs = node["op"], node["attrs"]
    if op == "unary" and attrs.fn in GATE_KINDS:
        return attrs.fn
    if op == "softmax" and not attrs.log:
        return "softmax"
    if op == "topk" and attrs.mode != "values_indices":
        return "topk"
    if op == "binary_gate":
        return "binary"
    if op == "param":
        return "learned"
    return None


FLOAT32_MAX = 3.4028234663852886e38
INT64_MAX = 2**63 - 1


def _check_constants(op: str, values, span: Span) -> None:
    """Static numbers that become tensor constants must fit a float32 (or int64) tensor: torch raises otherwise."""
    for v in values:
        kind = type(v)
        if kind is str or v is None:  # most attributes: names and paths
            continue
        if kind is InitSpec:
            for arg in v.args:  # floats, as InitSpec holds them
                if abs(arg) > FLOAT32_MAX:
                    raise LimitError(f"{op}: the constant {arg:g} does not fit in a float32 tensor", span)
        elif isinstance(v, float) and abs(v) > FLOAT32_MAX:
            raise LimitError(f"{op}: the constant {v:g} does not fit in a float32 tensor", span)
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT64_MAX:
            raise LimitError(f"{op}: the constant {v} does not fit in an int64 tensor", span)


def _short(n: int) -> str:
    text = str(n)
    return text if len(text) <= 30 else f"{text[:12]}…{text[-6:]} ({len(text)} digits)"


def _describe_operand(t: Tensor) -> str:
    if t.label:
        return t.label
    span = t.origin
    line = SourceCache.line(span.file, span.line)
    if line is not None and span.end_line == span.line and span.end_column:
        text = line[span.column - 1:span.end_column - 1].strip()
        if 0 < len(text) <= 40:
            return f"`{text}`"
    return "this operand"


_NOT_IN_STAGE = {ast.Return: "`return`", ast.InputStmt: "`input`", ast.OutputStmt: "`output`",
                  ast.AuxStmt: "`aux`", ast.Cascade: "a cascade"}


def _cascade_names(body: list[ast.Stmt]) -> tuple[list[ast.Name], list[str]]:
    """The names a cascade's stage body reads (each use, in order) and assigns; refuses what a stage cannot hold."""
    read: list[ast.Name] = []
    assigned: list[str] = []

    def walk(node: ast.Node) -> None:
        what = next((w for kind, w in _NOT_IN_STAGE.items() if isinstance(node, kind)), None)
        if what is not None:
            raise SpecError(f"{what} cannot stand inside a cascade stage", node.span,
                            help="a stage's results leave through its `exit` and the names it carries; "
                                 "use them after the cascade")
        if isinstance(node, ast.Name):
            read.append(node)
        elif isinstance(node, ast.Assign):
            assigned.extend(node.targets)
        elif isinstance(node, ast.GateStmt):
            assigned.append(node.name)
        for value in vars(node).values():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, ast.Node):
                    walk(item)

    for stmt in body:
        walk(stmt)
    return read, list(dict.fromkeys(assigned))


def _budget_named_calls(expr: ast.Node) -> list[ast.Call]:
    """The calls in `expr` of a function named param_count or flop_count, outermost first."""
    from gatedsl.ir.builtins import BUDGETS

    found = []
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in BUDGETS:
        found.append(expr)
    for value in vars(expr).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, ast.Node):
                found += _budget_named_calls(item)
    return found


def _holds_tensor(value: Any) -> bool:
    return isinstance(value, Tensor) or (isinstance(value, (list, tuple)) and any(_holds_tensor(v) for v in value))


def _names_in(expr: ast.Expr):
    if isinstance(expr, ast.Name):
        yield expr
    for value in vars(expr).values():
        if isinstance(value, ast.Expr):
            yield from _names_in(value)
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, ast.Expr):
                    yield from _names_in(v)


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return str(value.type)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, ast.Definition):
        return value.name
    return str(value)


# ------------------------------------------------------------- signatures
def bind_signature(
    el: Elaborator,
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


def _signature_dims(definition: ast.Definition) -> set[str]:
    names = set()
    for p in definition.params:
        if p.tensor is not None:
            for d in p.tensor.dims:
                if isinstance(d, ast.Expr):
                    names |= {n.id for n in _names_in(d)}
    return names


def _find_axis(ttype: TensorType, axis: str | int | Sym) -> int | None:
    """Where a scan's axis is in an argument: the one dim with that size name, or, for an integer axis,
    that position in every argument of a high enough rank (so an integer axis leaves no constants)."""
    if isinstance(axis, int):
        rank = ttype.rank
        return axis % rank if -rank <= axis < rank else None
    matches = [i for i, d in enumerate(ttype.shape) if d == (axis if isinstance(axis, Sym) else Sym.named(axis))]
    return matches[0] if len(matches) == 1 else None


def unify(el: Elaborator, definition: ast.Definition, p: ast.Param, actual: TensorType, env: dict, star: list,
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
            bound = ", ".join(f"{n.id} = {_show(env[n.id])}" for n in _names_in(d) if n.id in env)
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


def _declared_type(el: Elaborator, definition: ast.Definition, p: ast.Param, env: dict,
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


def check_value_param(el: Elaborator, p: ast.Param, value: Any, span: Span) -> Any:
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
            raise LimitError(f"'{p.name}' = {_short(value)} is too large for a float", span) from None
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
            shown = ", ".join(_show(c) for c in choices)
            raise SpecTypeError(f"'{p.name}' must be one of {{{shown}}}, got {_show(value)}", span,
                                notes=[Note("declared here", p.span)])
    if vt.kind in ("int", "float") and vt.low is not None:
        low, high = el.eval(vt.low), el.eval(vt.high)
        for bound, node in ((low, vt.low), (high, vt.high)):
            if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                raise SpecTypeError(f"the domain of '{p.name}' needs static numbers as bounds, got {describe(bound)}",
                                    node.span)
        if low > high:
            raise SpecTypeError(f"the domain {_show(low)}..{_show(high)} of '{p.name}' is empty", vt.span)
        if vt.log and low <= 0:
            raise SpecTypeError(f"a log domain needs a positive lower bound, got {_show(low)}", vt.low.span)
        if not (low <= value <= high):
            shown = _short(value) if isinstance(value, int) else _show(value)
            raise SpecTypeError(f"'{p.name}' = {shown} is outside its domain {_show(low)}..{_show(high)}", span,
                                notes=[Note("declared here", p.span)])
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


# ------------------------------------------------------------- call memo
# Attribute fields that hold instance paths, per op: a call replayed at another path gets these re-pathed. A
# recorded node with any other string under the call's path, or holding a graph other than a scan's body (a
# cascade's stage graphs are named after their path), leaves the call un-memoisable.
_PATH_FIELDS = {"param": ("path",), "linear": ("weight", "bias"), "norm": ("weight", "bias"),
                "conv": ("weight", "bias"), "embedding": ("weight",), "dropout": ("module",),
                "noise": ("module",), "scan": ("path",)}
_OVER_LIMIT = object()  # a replay that would cross max_nodes or max_params
_UNBOUND = object()  # a name a callee's parameter domain reads that the caller has not bound


class _NotMemoisable(Exception):
    """The call reads or leaves something a replay would not reproduce: it is elaborated afresh each time."""


class CallMemo:
    """Calls of blocks and cells (and scans of cells) elaborated once and replayed: the nodes, learned tensors and
    names a call added, keyed by everything its elaboration reads (the call site, the callee, the arguments'
    values, and the tensors' types, origins and aliasing, the calling stack and statement), re-pathed to the
    instance it is replayed at.

    Screening many candidates of one spec (gatedsl.search.Space) elaborates the same cell or block with the same
    arguments at every layer and in many candidates. A replay adds the nodes, learned tensors, shapes and names
    that elaborating the call would add, in the same order; a call whose elaboration fails is never recorded, so
    errors are raised by elaborating.

    A call's record serves the rest of the elaboration that made it (the model's other layers); the memo keeps
    it for later elaborations only if the call was seen in an earlier one too: a record kept is an object the
    garbage collector walks at every full collection from then on, which costs about what replaying it once
    saves (BENCHMARKS.md). The least recently used records go beyond `max_entries` (a forecaster layer's scan
    or attention block takes about 30 kB).
    """

    def __init__(self, program: Program, max_entries: int = 2048, max_seen: int = 1 << 16):
        self.program = program
        self.max_entries = max_entries
        self.max_seen = max_seen
        self._templates: dict[tuple, _Template | None] = {}  # None: the call is not memoisable
        self._seen: set[int] = set()  # hashes of the keys of the calls recorded and not kept
        self._domain_names: dict[int, tuple[str, ...]] = {}
        self.hits = 0  # calls replayed
        self.misses = 0  # calls elaborated (and recorded, where they can be)

    def __contains__(self, key: tuple) -> bool:
        return key in self._templates

    def __len__(self) -> int:
        return len(self._templates)

    def key(self, el: Elaborator, site: tuple, callee: ast.Definition, args: list,
            kwargs: dict[str, tuple[Any, Span]]) -> tuple[tuple | None, list[Port] | None]:
        """The call as a memo key, and the ports of the tensors among its arguments, in key order."""
        frame = el.frame
        slots: dict[Port, int] = {}
        # A scanned cell reads placeholders of its arguments' types (their origins and names only ever reach an
        # error message); a block reads the argument tensors themselves, and may return them.
        whole = site[0] != "scan"
        try:
            bound = (_key_of(args, slots, whole),
                     tuple((name, _key_of(value, slots, whole)) for name, (value, _) in kwargs.items()))
            # bind_signature checks an explicit argument against its parameter's domain evaluated where the call
            # stands: the names that domain reads are read from the caller.
            caller = tuple((name, _key_of(frame.env.get(name, _UNBOUND), slots, True))
                           for name in self._names_in_domains(callee))
        except _NotMemoisable:
            return None, None
        stack = tuple(id(f.definition) for f in el.stack)
        return (site, id(callee), stack, frame.graph is el.stack[0].graph, caller, bound), list(slots)

    def _names_in_domains(self, callee: ast.Definition) -> tuple[str, ...]:
        names = self._domain_names.get(id(callee))  # the memo holds the program: ids stay their definitions'
        if names is None:
            found: set[str] = set()
            for p in callee.params:
                vt = p.value_type
                if vt is not None:
                    for expr in [vt.low, vt.high] + list(vt.choices or []):
                        if expr is not None:
                            found |= {n.id for n in _names_in(expr)}
            names = self._domain_names[id(callee)] = tuple(sorted(found))
        return names

    def get(self, key: tuple, calls: dict[tuple, _Template | None]) -> tuple[bool, _Template | None]:
        """(whether the call is known, its record: None where it is not memoisable), from `calls`, the records of
        the current elaboration, or the memo's."""
        if key in calls:
            found, template = True, calls[key]
        else:
            found, template = key in self._templates, self._templates.get(key)
            if found:
                self._templates[key] = self._templates.pop(key)  # most recently used last
        if template is not None:
            self.hits += 1
        else:
            self.misses += 1
        return found, template

    def put(self, key: tuple, template: _Template | None, calls: dict[tuple, _Template | None]) -> None:
        """Record a call for the current elaboration (`calls`), and keep it if it was seen in an earlier one."""
        calls[key] = template
        seen = hash(key)
        if seen not in self._seen:
            if len(self._seen) >= self.max_seen:
                self._seen.clear()
            self._seen.add(seen)
            return
        self._seen.discard(seen)
        self._templates.pop(key, None)
        if len(self._templates) >= self.max_entries:
            del self._templates[next(iter(self._templates))]
        self._templates[key] = template


def _key_of(value: Any, slots: dict[Port, int], whole: bool) -> Any:
    """A bound value as part of a memo key: statics by type and value, tensors by their slot (one per port, so
    that aliasing counts), type, and where `whole`, origin and label; anything else is not memoisable."""
    kind = type(value)
    if kind is Tensor:
        slot = slots.setdefault(value.port, len(slots))
        # Plain tuples, not the dataclasses: a key is hashed at every lookup, and theirs hash in Python.
        ttype = (_shape_key(value.type.shape), value.type.dtype)
        if not whole:
            return Tensor, slot, ttype
        origin = value.origin
        return (Tensor, slot, ttype, value.label,
                (origin.file, origin.line, origin.column, origin.end_line, origin.end_column))
    if kind is float:
        return float, value.hex()  # 0.0 and -0.0 apart, and 1.0 apart from 1 and true
    if kind is Sym:
        return kind, value.factors, value.coeff
    if kind is TensorType:
        return kind, _shape_key(value.shape), value.dtype
    if kind in (int, bool, str, Builtin) or value is None or value is _UNBOUND:
        return kind, value
    if kind is ast.Definition:
        return kind, id(value)  # the memo holds the program, so the id stays its own
    if kind in (list, tuple):
        return kind, tuple(_key_of(v, slots, whole) for v in value)
    raise _NotMemoisable


def _shape_key(shape: tuple[Dim, ...]) -> tuple:
    return tuple(d if type(d) is int else (d.factors, d.coeff) for d in shape)


class _Recording:
    """Where the state stood when a memoised call started: what it adds is read off after it, as the template."""

    def __init__(self, el: Elaborator):
        frame = el.frame
        self.graph = frame.graph
        self.start = frame.graph._next
        self.memoisable = True
        top = el.stack[0].graph
        self.counts = (el.budget, el.param_total, len(el.declared_params), len(frame.graph.params),
                       len(frame.graph.modules), len(top.aux), len(el.shapes), len(el.used_names),
                       len(frame.graph.inputs), len(frame.graph.outputs))

    def template(self, el: Elaborator, path: str, ports: list[Port], result: Any) -> _Template | None:
        graph, top = self.graph, el.stack[0].graph
        budget, param_total, declared, params, modules, aux, shapes, used, inputs, outputs = self.counts
        if not self.memoisable or (len(graph.inputs), len(graph.outputs)) != (inputs, outputs) \
                or (len(top.aux) != aux and graph is not top):
            return None
        base = path[:-1]  # every path the call makes is this one, or under it
        start = self.start
        slot = {port: i for i, port in enumerate(ports)}

        def ref(port: Port) -> tuple[bool, int, int]:
            if port[0] >= start:
                return True, port[0] - start, port[1]
            if port not in slot:
                raise _NotMemoisable  # a tensor that reached the call by another way than its arguments
            return False, slot[port], 0

        try:
            nodes = [_node_template(graph.node(n), start, slot, base) for n in range(start, graph._next)]
            new_params = graph.params[params:]
            recorded = {id(p) for p in new_params}
            for node in nodes:
                recorded |= node.param_ids()
            new_declared = el.declared_params[declared:]
            if any(id(p) not in recorded for p in new_declared):
                return None
            return _Template(
                ticks=el.budget - budget, numel=el.param_total - param_total, nodes=nodes,
                params=[_param_template(p, base) for p in new_params],
                modules=[_module_template(m, base) for m in graph.modules[modules:]],
                aux=[(_relative(name, base), ref(port)) for name, port in top.aux[aux:]],
                declared=[id(p) for p in new_declared],
                shapes=tuple(zip(*[(_relative(k, base), v)
                                   for k, v in _tail(el.shapes, len(el.shapes) - shapes)])) or ((), ()),
                used_names=tuple((_relative(k, base), tuple(v))
                                 for k, v in _tail(el.used_names, len(el.used_names) - used)),
                result=_pack(result, ref))
        except _NotMemoisable:
            return None


class _NodeTemplate:
    """One recorded node: its inputs as (made by the call, node offset or argument's slot, output index), its
    attributes (or, where they hold paths or a body, their class and other fields), its paths made relative, a
    scan's body as a graph template."""

    __slots__ = ("op", "attrs", "paths", "body", "inputs", "types", "span", "name", "gate", "extras")

    def __init__(self, op, attrs, paths, body, inputs, types, span, name, gate, extras):
        self.op, self.attrs, self.paths, self.body, self.inputs = op, attrs, paths, body, inputs
        self.types, self.span, self.name, self.gate, self.extras = types, span, name, gate, extras

    def param_ids(self) -> set[int]:
        return set() if self.body is None else self.body.param_ids()


def _node_template(data: dict[str, Any], start: int, slot: dict[Port, int], base: str) -> _NodeTemplate:
    """Node `data` as made by a call at path `base` whose nodes start at `start` and whose tensor arguments are
    the ports in `slot`."""
    op, attrs = data["op"], data["attrs"]
    path_fields = _PATH_FIELDS.get(op, ())
    paths, body = None, None
    for field_name, value in attrs.__dict__.items():
        kind = type(value)
        if field_name in path_fields:
            paths = paths or {}
            paths[field_name] = None if value is None else _relative(value, base)
        elif kind is str or kind is tuple:
            if _mentions(value, base):
                raise _NotMemoisable
        elif kind is Graph:
            if op != "scan" or field_name != "body":
                raise _NotMemoisable
            body = _GraphTemplate(value, base)
    if op == "scan" and attrs.weights:
        raise _NotMemoisable  # set by native_rnn, after elaboration
    if paths is not None or body is not None:
        # Its class and other fields: replays build it anew (and the recorded body graph may go).
        attrs = (type(attrs), {k: v for k, v in attrs.__dict__.items() if k not in path_fields and k != "body"})
    try:
        inputs = tuple((True, n - start, i) if n >= start else (False, slot[(n, i)], 0) for n, i in data["inputs"])
    except KeyError:
        raise _NotMemoisable from None  # a tensor that reached the call by another way than its arguments
    gate = data["gate"]
    if gate is not None:
        gate = (gate.kind, _relative(gate.name, base), gate.line, gate.file)
    extras = None
    if len(data) > len(NODE_KEYS):
        # Copied: the caller may yet rename the node (`a, b = ...` sets out_names after the call).
        extras = {k: dict(v) if type(v) is dict else v for k, v in data.items() if k not in NODE_KEYS}
        if any(not isinstance(v, (dict, str, int)) for v in extras.values()):
            raise _NotMemoisable
    return _NodeTemplate(op, attrs, paths, body, inputs, tuple(data["types"]), data["span"], data["name"], gate,
                         extras)


class _GraphTemplate:
    """A whole graph a recorded call made (a scan's body), relative to the call's path."""

    def __init__(self, graph: Graph, base: str):
        if graph.order() != list(range(graph._next)):  # elaboration never removes a node: ids 0, 1, ...
            raise _NotMemoisable
        self.name = graph.name
        self.nodes = [_node_template(graph.node(n), 0, {}, base) for n in range(graph._next)]
        self.params = [_param_template(p, base) for p in graph.params]
        self.modules = [_module_template(m, base) for m in graph.modules]
        self.inputs, self.outputs = list(graph.inputs), list(graph.outputs)
        self.aux = [(_relative(name, base), port) for name, port in graph.aux]

    def param_ids(self) -> set[int]:
        ids = {t[0] for t in self.params}
        for node in self.nodes:
            ids |= node.param_ids()
        return ids

    def build(self, base: str, specs: dict[int, ParamSpec]) -> Graph:
        graph = Graph(self.name)
        _add_nodes(graph, self.nodes, 0, (), base, specs)
        graph.params = [_new_param(t, base, specs) for t in self.params]
        graph.modules = [ModuleSpec(base + rel, kind, dict(args)) for rel, kind, args in self.modules]
        graph.inputs, graph.outputs = list(self.inputs), list(self.outputs)
        graph.aux = [(base + rel, port) for rel, port in self.aux]
        return graph


class _Template:
    """What a call added, relative to its instance path; `replay` adds it again at another one."""

    def __init__(self, *, ticks, numel, nodes, params, modules, aux, declared, shapes, used_names, result):
        self.ticks, self.numel, self.nodes = ticks, numel, nodes
        self.params, self.modules, self.aux, self.declared = params, modules, aux, declared
        self.shapes, self.used_names, self.result = shapes, used_names, result

    def replay(self, el: Elaborator, path: str, ports: list[Port]) -> tuple[Any] | object:
        """Add the call at instance `path` of the current frame, reading its tensor arguments at `ports`: (the
        call's value,), or _OVER_LIMIT where elaborating it would stop at a limit (the counts only grow)."""
        if el.budget + self.ticks > el.limits.max_nodes or el.param_total + self.numel > el.limits.max_params:
            return _OVER_LIMIT
        graph, base = el.frame.graph, path[:-1]
        start = graph._next
        specs: dict[int, ParamSpec] = {}
        _add_nodes(graph, self.nodes, start, ports, base, specs)
        graph.params.extend(_new_param(t, base, specs) for t in self.params)
        graph.modules.extend(ModuleSpec(base + rel, kind, dict(args)) for rel, kind, args in self.modules)
        el.stack[0].graph.aux.extend((base + rel, _port(ref, start, ports)) for rel, ref in self.aux)
        el.budget += self.ticks
        el.param_total += self.numel
        el.declared_params.extend(specs[i] for i in self.declared)
        shapes, used_names = el.shapes, el.used_names
        for rel, ttype in zip(*self.shapes):
            shapes[base + rel] = ttype
        for rel, names in self.used_names:
            used_names[base + rel] = set(names)
        return (_unpack(self.result, start, ports),)


def _port(ref: tuple[bool, int, int], start: int, ports: list[Port] | tuple) -> Port:
    made, n, i = ref
    return (start + n, i) if made else ports[n]


def _add_nodes(graph: Graph, nodes: list[_NodeTemplate], start: int, ports: list[Port] | tuple, base: str,
               specs: dict[int, ParamSpec]) -> None:
    for t in nodes:
        attrs = t.attrs
        if t.paths is not None or t.body is not None:
            cls, fields = attrs
            fields = {**fields, **{k: None if rel is None else base + rel for k, rel in (t.paths or {}).items()}}
            if t.body is not None:
                fields["body"] = t.body.build(base, specs)
            attrs = cls(**fields)  # validated anew: as fast as a pydantic model_copy
        gate = None if t.gate is None else GateMark(kind=t.gate[0], name=base + t.gate[1], line=t.gate[2],
                                                    file=t.gate[3])
        inputs = [(start + n, i) if made else ports[n] for made, n, i in t.inputs]
        node = graph.add(t.op, attrs, inputs, t.types, t.span, t.name, gate)
        if t.extras:
            data = graph.node(node)
            for k, v in t.extras.items():
                data[k] = dict(v) if isinstance(v, dict) else v


def _param_template(p: ParamSpec, base: str) -> tuple:
    return id(p), _relative(p.path, base), p.shape, p.init, p.span, _relative(p.block, base)


def _new_param(t: tuple, base: str, specs: dict[int, ParamSpec]) -> ParamSpec:
    old, rel, shape, init, span, block = t
    spec = specs[old] = ParamSpec(base + rel, shape, init, span, base + block)
    return spec


def _module_template(m: ModuleSpec, base: str) -> tuple:
    if any(_mentions(v, base) for v in m.args.values()):
        raise _NotMemoisable
    return _relative(m.path, base), m.kind, dict(m.args)


def _relative(name: str, base: str) -> str:
    """`name`, the call's path `base` or a path under it, without that prefix."""
    if name.startswith(base) and (len(name) == len(base) or name[len(base)] == "."):
        return name[len(base):]
    raise _NotMemoisable


def _mentions(value: Any, base: str) -> bool:
    kind = type(value)
    if kind is str:
        return value.startswith(base) and (len(value) == len(base) or value[len(base)] == ".")
    if kind is tuple or kind is list:
        return any(_mentions(v, base) for v in value)
    return False


def _tail(d: dict, n: int) -> list[tuple[Any, Any]]:
    """The last n items of a dict, in insertion order."""
    return list(itertools.islice(reversed(d.items()), n))[::-1]


def _pack(value: Any, ref: Callable[[Port], tuple]) -> Any:
    if type(value) is Tensor:
        return Tensor, ref(value.port), value.type, value.origin, value.label
    if isinstance(value, (list, tuple)):
        return type(value), [_pack(v, ref) for v in value]
    if isinstance(value, (int, float, str, Sym, TensorType, Builtin, ast.Definition)) or value is None:
        return None, value
    raise _NotMemoisable


def _unpack(packed: tuple, start: int, ports: list[Port]) -> Any:
    kind = packed[0]
    if kind is Tensor:
        _, ref, ttype, origin, label = packed
        return Tensor(_port(ref, start, ports), ttype, origin, label)
    if kind is None:
        return packed[1]
    return kind([_unpack(v, start, ports) for v in packed[1]])


def elaborate(unit: ModelIR, memo: CallMemo | None = None) -> ModelIR:
    """The pass: fill `unit.graph`, `unit.parameters` and `unit.shapes` from the model's AST (replaying the
    bodies `memo` holds, which gives the same unit)."""
    el = Elaborator(unit.program, unit.limits, memo)
    try:
        unit.graph, unit.parameters = el.elaborate_model(unit.model, unit.overrides)
    except RecursionError:  # outside any statement: a parameter default
        raise LimitError("the spec nests too deeply to elaborate", unit.model.span) from None
    unit.shapes = el.shapes
    unit.budget_requires = el.budget_requires
    return unit
