"""Parse .gate text into the AST, turning every Lark error into a located ParseError."""

from __future__ import annotations

import functools

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from gatedsl.errors import LimitError, ParseError, SourceCache, Span, SpecError, clip
from gatedsl.frontend import ast
from gatedsl.resources import grammar_path

_OPENERS = {"(": ")", "[": "]"}
_CLOSERS = {")", "]"}


class _NewlinePostLexer:
    """Drops newlines that cannot end a statement: inside brackets, after '{', and repeated ones.

    It never holds a token back: Lark's contextual lexer reads the parser's state as
    each token is produced, so a buffering post-lexer would lex in the wrong state.
    """

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        previous = "{"  # the last token passed on ("_NL" for a newline); the file starts like a body
        for tok in stream:
            if tok.type == "_NL":
                if depth == 0 and previous not in ("{", "_NL"):
                    previous = "_NL"
                    yield tok
                continue
            value = tok.value if tok.type != "STRING" else "STRING"
            if value in _OPENERS:
                depth += 1
            elif value in _CLOSERS and depth > 0:
                depth -= 1
            previous = value
            yield tok


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(
        grammar_path().read_text(encoding="utf-8"),
        parser="lalr",
        strict=True,
        propagate_positions=True,
        maybe_placeholders=True,
        postlex=_NewlinePostLexer(),
        cache=True,  # Lark keeps the LALR tables in a temp file: a fresh process starts faster
    )


def _span(file: str, meta) -> Span:
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(file: str, tok: Token) -> Span:
    return Span(file, tok.line, tok.column, tok.end_line, tok.end_column)


MAX_INT_DIGITS = 100  # far beyond the 64-bit static ints elaboration accepts; Python refuses > 4300 digits
MAX_NESTING = 200  # levels of the parse tree: deeper specs would exhaust the stack of the recursive passes


def _number(text: str, span: Span) -> int | float:
    text = text.replace("_", "")
    if any(c in text for c in ".eE"):
        return float(text)  # a float too large is infinity, which elaboration reports where it is used
    if len(text) > MAX_INT_DIGITS:
        raise LimitError(f"an integer literal of {len(text)} digits is too large", span,
                         help="static integers have at most 64 bits")
    return int(text)


def _check_nesting(tree: Tree, file: str) -> None:
    """Reject a tree nested deeper than MAX_NESTING, iteratively, before anything recurses over it."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            meta = node.meta
            span = Span(file, getattr(meta, "line", 1) or 1, getattr(meta, "column", 1) or 1,
                        getattr(meta, "end_line", None), getattr(meta, "end_column", None))
            raise LimitError(f"the spec nests more than {MAX_NESTING} levels deep here", span,
                             help="split the expression into named steps (a long chain of operators nests too)")
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))


@v_args(meta=True)
class _ToAst(Transformer):
    """One method per grammar rule, building the AST node of the same name."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, meta) -> Span:
        return _span(self.file, meta)

    # --- file level
    def start(self, meta, items):
        imports = [i for i in items if isinstance(i, ast.Import)]
        defs = [d for d in items if isinstance(d, ast.Definition)]
        span = Span(self.file, 1, 1)
        return ast.Module(span, self.file, imports, defs)

    def import_def(self, meta, children):
        (target,) = children
        if isinstance(target, Token):  # quoted path
            return ast.Import(self._s(meta), target.value[1:-1], True)
        return ast.Import(self._s(meta), target, False)

    def module_path(self, meta, names):
        return ".".join(str(n) for n in names)

    def _definition(self, kind, meta, children):
        name, params, body = children
        return ast.Definition(self._s(meta), kind, str(name), params, body, self.file)

    def block_def(self, meta, children):
        return self._definition("block", meta, children)

    def cell_def(self, meta, children):
        return self._definition("cell", meta, children)

    def model_def(self, meta, children):
        return self._definition("model", meta, children)

    def signature(self, meta, params):
        return [p for p in params if p is not None]

    def tensor_param(self, meta, children):
        name, tensor = children
        return ast.Param(self._s(meta), str(name), tensor=tensor)

    def state_param(self, meta, children):
        name, tensor = children
        return ast.Param(self._s(meta), str(name), tensor=tensor, state=True)

    def value_param(self, meta, children):
        name, vtype, default = children
        return ast.Param(self._s(meta), str(name), value_type=vtype, default=default)

    def tensor_type(self, meta, children):
        dtype, *dims = children
        dims = [d for d in dims if d is not None]
        return ast.TensorType(self._s(meta), dtype or "float", dims)

    def star_dim(self, meta, _):
        return ast.StarDim(self._s(meta))

    def scalar_type(self, meta, children):
        return str(children[0])

    def value_type(self, meta, children):
        kind, domain = children
        if domain is None:
            return ast.ValueType(self._s(meta), kind)
        low, high, log = domain
        return ast.ValueType(self._s(meta), kind, low=low, high=high, log=log)

    def domain(self, meta, children):
        low, high, log = children
        return (low, high, log is not None)

    def str_type(self, meta, _):
        return ast.ValueType(self._s(meta), "str")

    def block_type(self, meta, _):
        return ast.ValueType(self._s(meta), "block")

    def choice_type(self, meta, children):
        return ast.ValueType(self._s(meta), "choice", choices=[c for c in children if c is not None])

    def body(self, meta, stmts):
        return [s for s in stmts if s is not None]

    # --- statements
    def assign(self, meta, children):
        *targets, value = children
        return ast.Assign(self._s(meta), [str(t) for t in targets], value)

    def gate_stmt(self, meta, children):
        first, second, value = children
        if second is None:
            return ast.GateStmt(self._s(meta), str(first), None, value)
        return ast.GateStmt(self._s(meta), str(second), str(first), value)

    def input_stmt(self, meta, children):
        name, tensor = children
        return ast.InputStmt(self._s(meta), str(name), tensor)

    def output_stmt(self, meta, children):
        name, value = children
        return ast.OutputStmt(self._s(meta), str(name), value)

    def return_stmt(self, meta, values):
        return ast.Return(self._s(meta), list(values))

    def repeat_stmt(self, meta, children):
        index, count, scope, body = children
        return ast.Repeat(
            self._s(meta), str(index) if index else None, count, str(scope) if scope else None, body
        )

    def if_stmt(self, meta, children):
        cond, then, *rest = children
        orelse = rest[0] if rest else None
        if orelse is None:
            orelse = []
        elif isinstance(orelse, ast.If):
            orelse = [orelse]
        return ast.If(self._s(meta), cond, then, orelse)

    def require_stmt(self, meta, children):
        cond, message = children
        return ast.Require(self._s(meta), cond, message.value[1:-1] if message else None)

    def aux_stmt(self, meta, children):
        name, value = children
        return ast.AuxStmt(self._s(meta), str(name), value)

    def exit_stmt(self, meta, children):
        head, gate, threshold = children
        return ast.ExitStmt(self._s(meta), head, gate, threshold)

    def cascade(self, meta, children):
        index, count, scope, body = children
        return ast.Cascade(self._s(meta), str(index) if index else None, count, str(scope) if scope else None, body)

    # --- expressions
    def scan_expr(self, meta, children):
        cell, *rest = children
        args, kwargs = [], []
        flags = []
        axis = None
        for item in rest:
            if isinstance(item, ast.Keyword):
                kwargs.append(item)
            elif isinstance(item, tuple) and item[0] == "axis":
                axis = item
            elif isinstance(item, str) and item in ("reverse", "last"):
                flags.append(item)
            elif item is not None:
                args.append(item)
        _, axis_value, axis_span = axis
        return ast.Scan(
            self._s(meta),
            ast.Name(_tok_span(self.file, cell), str(cell)),
            args,
            kwargs,
            axis_value,
            axis_span,
            "reverse" in flags,
            "last" in flags,
        )

    def axis(self, meta, children):
        (tok,) = children
        value = _number(tok, self._s(meta)) if tok.type == "INT" else str(tok)
        return ("axis", value, self._s(meta))

    def negative_axis(self, meta, children):
        (tok,) = children
        return ("axis", -_number(tok, self._s(meta)), self._s(meta))

    def scan_flag(self, meta, children):
        return str(children[0])

    def _bin(op):
        def method(self, meta, children):
            left, right = children
            return ast.BinOp(self._s(meta), op, left, right)

        return method

    or_op = _bin("or")
    and_op = _bin("and")
    eq = _bin("==")
    ne = _bin("!=")
    lt = _bin("<")
    le = _bin("<=")
    gt = _bin(">")
    ge = _bin(">=")
    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")
    floordiv = _bin("//")
    mod = _bin("%")
    matmul = _bin("@")
    pow = _bin("**")
    del _bin

    def not_op(self, meta, children):
        return ast.UnaryOp(self._s(meta), "not", children[0])

    def neg(self, meta, children):
        return ast.UnaryOp(self._s(meta), "-", children[0])

    def pos(self, meta, children):
        return ast.UnaryOp(self._s(meta), "+", children[0])

    def call(self, meta, children):
        func, *rest = children
        args = [a for a in rest if a is not None and not isinstance(a, ast.Keyword)]
        kwargs = [a for a in rest if isinstance(a, ast.Keyword)]
        return ast.Call(self._s(meta), func, args, kwargs)

    def kwarg(self, meta, children):
        name, value = children
        return ast.Keyword(self._s(meta), str(name), value)

    def index(self, meta, children):
        value, *items = children
        return ast.Index(self._s(meta), value, [i for i in items if i is not None])

    def slice(self, meta, children):
        start, stop, step = children
        return ast.Slice(self._s(meta), start, stop, step)

    def ellipsis(self, meta, _):
        return ast.Ellipsis_(self._s(meta))

    def name(self, meta, children):
        return ast.Name(self._s(meta), str(children[0]))

    def int(self, meta, children):
        return ast.Number(self._s(meta), _number(children[0], self._s(meta)))

    def float(self, meta, children):
        return ast.Number(self._s(meta), _number(children[0], self._s(meta)))

    def string(self, meta, children):
        return ast.String(self._s(meta), children[0][1:-1])

    def true(self, meta, _):
        return ast.Bool(self._s(meta), True)

    def false(self, meta, _):
        return ast.Bool(self._s(meta), False)

    def list(self, meta, children):
        return ast.ListExpr(self._s(meta), [c for c in children if c is not None])


_TOKEN_WORDS = {
    "_NL": "end of line",
    "$END": "end of file",
    "NAME": "a name",
    "INT": "an integer",
    "FLOAT": "a number",
    "STRING": "a string",
}


def _describe(expected: set[str]) -> str:
    words = []
    parser = _parser()
    for name in sorted(expected):
        if name in _TOKEN_WORDS:
            words.append(_TOKEN_WORDS[name])
            continue
        try:
            pattern = parser.get_terminal(name).pattern
            words.append(f"'{pattern.value}'" if pattern.type == "str" else name.lower())
        except KeyError:
            words.append(name.lower())
    words = sorted(set(words))
    if len(words) > 8:
        return ", ".join(words[:8]) + ", …"
    return ", ".join(words)


def parse(text: str, file: str = "<string>") -> ast.Module:
    """Parse one file's text; raises ParseError located at the offending token."""
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark, as some editors write one: not part of the spec
        text = text[1:]
    SourceCache.put(file, text)
    try:
        tree = _parser().parse(text if text.endswith("\n") else text + "\n")
    except UnexpectedInput as err:
        raise _parse_error(err, file) from None
    _check_nesting(tree, file)
    try:
        module = _ToAst(file).transform(tree)
    except VisitError as err:  # a transformer method raised: report the original
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise
    module.text = text
    return module


def _parse_error(err: UnexpectedInput, file: str) -> ParseError:
    line = getattr(err, "line", 1) or 1
    column = getattr(err, "column", 1) or 1
    if isinstance(err, UnexpectedToken):
        tok = err.token
        if tok.type == "$END":
            return ParseError("unexpected end of file", Span(file, line, column),
                              help="a '}' or ')' may be missing")
        shown = "end of line" if tok.type == "_NL" else f"'{clip(tok.value, 60)}'"
        span = Span(file, tok.line, tok.column, tok.end_line, tok.end_column)
        return ParseError(
            f"unexpected {shown}",
            span,
            help=f"expected {_describe(set(err.expected))}" if err.expected else None,
        )
    if isinstance(err, UnexpectedCharacters):
        char = err.char
        return ParseError(f"unexpected character {char!r}", Span(file, line, column, line, column + 1),
                          help=f"expected {_describe(set(err.allowed))}" if err.allowed else None)
    if isinstance(err, UnexpectedEOF):
        return ParseError("unexpected end of file", Span(file, line, column),
                          help="a '}' or ')' may be missing")
    return ParseError(str(err).splitlines()[0], Span(file, line, column))
