"""The spec AST: plain dataclasses, each carrying the source span it was parsed from."""

from __future__ import annotations

from dataclasses import dataclass, field

from gatedsl.errors import Span


@dataclass
class Node:
    span: Span


# ------------------------------------------------------------------ expressions
@dataclass
class Expr(Node):
    pass


@dataclass
class Name(Expr):
    id: str


@dataclass
class Number(Expr):
    value: int | float


@dataclass
class String(Expr):
    value: str


@dataclass
class Bool(Expr):
    value: bool


@dataclass
class ListExpr(Expr):
    items: list[Expr]


@dataclass
class BinOp(Expr):
    op: str  # "+", "-", "*", "/", "//", "%", "@", "**", "==", "!=", "<", "<=", ">", ">=", "and", "or"
    left: Expr
    right: Expr


@dataclass
class UnaryOp(Expr):
    op: str  # "-", "+", "not"
    operand: Expr


@dataclass
class Keyword(Node):
    name: str
    value: Expr


@dataclass
class Call(Expr):
    func: Expr
    args: list[Expr]
    kwargs: list[Keyword]


@dataclass
class Slice(Node):
    start: Expr | None
    stop: Expr | None
    step: Expr | None


@dataclass
class Ellipsis_(Node):
    pass


@dataclass
class Index(Expr):
    value: Expr
    items: list[Expr | Slice | Ellipsis_]


@dataclass
class Scan(Expr):
    cell: Name
    args: list[Expr]
    kwargs: list[Keyword]
    axis: str | int
    axis_span: Span
    reverse: bool
    last: bool


@dataclass
class Cascade(Expr):
    """`cascade [index in] count [as scope] { body }`: early-exit stages, only on the right of an assignment."""

    index: str | None
    count: Expr
    scope: str | None
    body: list[Stmt]


# ------------------------------------------------------------------------ types
@dataclass
class StarDim(Node):
    pass


@dataclass
class TensorType(Node):
    dtype: str  # "float", "int", "bool"
    dims: list[Expr | StarDim]


@dataclass
class ValueType(Node):
    kind: str  # "int", "float", "bool", "str", "block", "choice"
    low: Expr | None = None
    high: Expr | None = None
    log: bool = False
    choices: list[Expr] = field(default_factory=list)


@dataclass
class Param(Node):
    name: str
    # Exactly one of tensor / value_type describes it; a value param may have neither (untyped).
    tensor: TensorType | None = None
    state: bool = False
    value_type: ValueType | None = None
    default: Expr | None = None


# ------------------------------------------------------------------- statements
@dataclass
class Stmt(Node):
    pass


@dataclass
class Assign(Stmt):
    targets: list[str]
    value: Expr


@dataclass
class GateStmt(Stmt):
    name: str
    kind: str | None
    value: Expr


@dataclass
class InputStmt(Stmt):
    name: str
    type: TensorType


@dataclass
class OutputStmt(Stmt):
    name: str
    value: Expr | None


@dataclass
class Return(Stmt):
    values: list[Expr]


@dataclass
class Repeat(Stmt):
    index: str | None
    count: Expr
    scope: str | None
    body: list[Stmt]


@dataclass
class If(Stmt):
    cond: Expr
    then: list[Stmt]
    orelse: list[Stmt]


@dataclass
class Require(Stmt):
    cond: Expr
    message: str | None


@dataclass
class AuxStmt(Stmt):
    """`aux NAME = expr`: an auxiliary output (a loss), recorded under its instance path."""

    name: str
    value: Expr


@dataclass
class ExitStmt(Stmt):
    """`exit HEAD when GATE > THRESHOLD`, the end of a cascade stage."""

    head: Expr
    gate: Expr
    threshold: Expr


# ------------------------------------------------------------------ definitions
@dataclass
class Definition(Node):
    kind: str  # "block", "cell", "model"
    name: str
    params: list[Param]
    body: list[Stmt]
    file: str = ""


@dataclass
class Import(Node):
    module: str  # dotted name, or a path when quoted
    quoted: bool


@dataclass
class Module(Node):
    file: str
    imports: list[Import]
    definitions: list[Definition]
    text: str = field(default="", repr=False, compare=False)  # as parsed: what spans' lines and columns count in
