"""The interpreter: evaluate a model's AST statement by statement, inlining calls of blocks and cells, into the graph IR with every shape inferred."""

from __future__ import annotations

import functools
import math
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
from gatedsl.ir.builtins import BUDGETS, BUILTINS
from gatedsl.ir.elaboration import Frame, Names
from gatedsl.ir.graph import GATE_KINDS, GateMark, Graph, InitSpec, ParamSpec
from gatedsl.ir.model import Limits, ModelIR
from gatedsl.ir.ops import REGISTRY
from gatedsl.ir.types import Dim, Sym, TensorType, dim_mul
from gatedsl.ir.values import Builtin, Tensor, describe, show, show_int
from gatedsl.ir.reserved_names import safe_argument_name, safe_attribute_name
from gatedsl.passes.elaborate.memo import OVER_LIMIT, CallMemo, Recording, Template
from gatedsl.passes.elaborate.parameters import bind_model_parameters
from gatedsl.passes.elaborate.signature import bind_signature, names_in, signature_dims

MAX_DEPTH = 64  # nested block calls
MAX_INT_BITS = 64  # static integers beyond this are surely a mistake
MAX_SYM_FACTORS = 16  # a symbolic size B*T*... with more factors is surely a runaway product


class Elaborator:
    """One elaboration: the frames being evaluated, what they have built so far and the names they have taken
    (ir/elaboration.py's Elaborating is what the code it calls sees of it)."""

    def __init__(self, program: Program, limits: Limits, memo: CallMemo | None = None):
        self.program = program
        self.limits = limits
        # Calls elaborated before, replayed at a new instance path (screening many candidates of one spec).
        self.memo = memo if memo is not None and memo.program is program else None
        self._recordings: list[Recording] = []  # the memoised calls being elaborated, innermost last
        self._calls: dict[tuple, Template | None] = {}  # the calls this elaboration recorded (see CallMemo)
        self._signature_dims: dict[int, set[str]] = {}
        self._calls_by_name: dict[int, list[ast.Call]] = {}  # per expression, its calls of param_count/flop_count
        self.budget = 0
        self.param_total = 0  # learned elements declared so far
        self.declared_params: list[ParamSpec] = []  # every learned tensor so far, for the over-the-limit diagnostic
        self.stack: list[Frame] = []
        self.used_names: dict[str, Names] = {}  # per path prefix, names already taken
        self.shapes: dict[str, TensorType] = {}
        # Model-level `require`s that read param_count()/flop_count(), with the names bound where they stand:
        # passes/check_budgets.py checks them once the counts exist (then `counted` is the counted unit).
        self.budget_requires: list[tuple[ast.Require, dict[str, Any]]] = []
        self.counted: ModelIR | None = None
        self.builtins = BUILTINS

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
                help="a repeat count or a nesting is larger than intended (--max-ops, or max_ops= in Python, raises the "
                     "limit)",
            )

    def unique(self, prefix: str, base: str) -> str:
        """A name not yet taken under instance-path prefix `prefix`: `base`, else base_1, base_2, ..."""
        names = self.used_names.get(prefix)
        if names is None:
            names = self.used_names[prefix] = Names()
        # Instance paths become torch module attributes and Python names in generated code: keywords,
        # nn.Module / GraphModule attributes (training, forward, state_dict, ...) and _private names get a "_".
        return names.fresh(safe_attribute_name(base))

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
            found = self._signature_dims[id(definition)] = signature_dims(definition)
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
                sizes = ", ".join(f"{kw.name}={show(self.eval(kw.value))}" for kw in call.kwargs)
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
        names = sorted({n.id for n in names_in(expr) if n.id in self.frame.env})
        shown = [f"{n} = {show(self.frame.env[n])}" for n in names]
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
            raise LimitError(f"the integer {show_int(expr.value)} is too large", expr.span,
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
                raise LimitError(f"{callee.name} gives {show_int(value)}, which is too large", expr.span,
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
        return self.run_call(("call", id(call)), definition, call, args, kwargs, path,
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

    def run_call(self, site: tuple, callee: ast.Definition, call: ast.Expr, args: list, kwargs: dict, path: str,
                 elaborate: Callable[[], Any]) -> Any:
        """`elaborate()`, the call (or scan) `call` of `callee` at `site` with these arguments, made at instance
        `path` in the current frame: replayed from the memo where the same call was elaborated with the same
        arguments and in the same place before, else elaborated (and recorded). An error from inside the callee
        leaves with a note at `call` (see _note_call)."""
        try:
            memo = self.memo
            key, ports = memo.key(self, site, callee, args, kwargs) if memo is not None else (None, None)
            if key is None:
                return elaborate()
            found, template = memo.get(key, self._calls)
            if template is not None:
                replayed = template.replay(self, path, ports)
                if replayed is not OVER_LIMIT:
                    return replayed[0]
                # Over a limit: elaborate, so that the error names the op or tensor where the limit is crossed.
            elif found:  # known not to be memoisable
                return elaborate()
            recording = Recording(self)
            self._recordings.append(recording)
            try:
                value = elaborate()
            finally:
                self._recordings.pop()
            memo.put(key, recording.template(self, path, ports, value), self._calls)
            return value
        except SpecError as err:
            _note_call(err, callee, call)
            raise

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
        return self.run_call(("scan", id(expr), want_all, axis, label), cell, expr, args, kwargs, path,
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
                    f"stage {index} makes it {show(value)}", value.origin if isinstance(value, Tensor) else expr.span,
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


class CallNote(Note):
    """A note at a call an error happened inside of: with its callers' notes, a chain down from the user's spec."""


def _note_call(err: SpecError, callee: ast.Definition, call: ast.Expr) -> None:
    """Add a note at `call` to an error that lies inside `callee` (or that a note at a call in it already leads
    to), before the notes at the calls inside: the chain then reads from the user's call site down to the
    error, as rustc shows macro expansions. An error at the call itself (an argument that does not fit) lies in
    the caller, and gets its note, if any, from the caller's call."""
    first = next((i for i, note in enumerate(err.notes) if type(note) is CallNote), None)
    if first is None and not _inside(err.span, callee.span):
        return
    if isinstance(call, ast.Scan):
        name, how = call.cell.id, "scan of"
    else:
        name, how = (call.func.id if isinstance(call.func, ast.Name) else callee.name), "call to"
    shown = name if name == callee.name else f"{name} ({callee.kind} {callee.name})"
    err.insert_note(len(err.notes) if first is None else first, CallNote(f"in this {how} {shown}", call.span))


def _inside(span: Span, region: Span) -> bool:
    return span.file == region.file and region.end_line is not None and \
        (region.line, region.column) <= (span.line, span.column) <= (region.end_line, region.end_column or 0)


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
