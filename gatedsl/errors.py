"""Every problem in a spec is a SpecError that knows where it is and renders like a compiler diagnostic (and a bad
size for FLOP counting, which is not the spec's, a SizeError)."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

MAX_MESSAGE = 2_000  # characters of one message, note or help line (a value quoted in it may be huge)
QUOTE_WIDTH = 100  # characters of a source line quoted around the caret; a longer line is cut with '…'


@dataclass(frozen=True)
class Span:
    """A region of one source file; lines and columns count from 1."""

    file: str
    line: int
    column: int
    end_line: int | None = None
    end_column: int | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass
class Note:
    message: str
    span: Span | None = None


class SourceCache:
    """Holds the text of every spec parsed in this process so diagnostics can quote it.

    Only text that was read as a spec is ever quoted: a file that was not parsed (one too large, not UTF-8, or
    not a .gate file at all) is never read from disk to be shown.
    """

    _texts: dict[str, str] = {}
    _lines: dict[str, list[str]] = {}

    @classmethod
    def put(cls, file: str, text: str) -> None:
        cls._texts[file] = text
        cls._lines.pop(file, None)

    @classmethod
    def line(cls, file: str, line: int) -> str | None:
        lines = cls._lines.get(file)
        if lines is None:
            text = cls._texts.get(file)
            if text is None:
                return None
            lines = cls._lines[file] = source_lines(text)
        if 1 <= line <= len(lines):
            return lines[line - 1]
        return None


def source_lines(text: str) -> list[str]:
    """The lines of a spec as the lexer numbers them: only '\\n' ends a line (str.splitlines also splits on
    '\\f', '\\v', '\\r', '\\x1c'-'\\x1e', '\\x85', U+2028 and U+2029, which a comment may hold)."""
    return text.split("\n")


class SpecError(Exception):
    """A problem in a spec, located at FILE:LINE:COL, with optional notes and a fix hint."""

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        notes: list[Note] | None = None,
        help: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span or Span("<unknown>", 1, 1)
        self.notes: list[Note] = list(notes or [])
        self.help = help
        # Quote the source as it is now: a later spec given as text may reuse the same name.
        self._lines = {(sp.file, sp.line): SourceCache.line(sp.file, sp.line)
                       for sp in [self.span] + [n.span for n in self.notes if n.span is not None]}

    def insert_note(self, index: int, note: Note) -> None:
        """Add a note at `index` among the notes, its source quoted as it is now (as the constructor's are)."""
        self.notes.insert(index, note)
        if note.span is not None:
            self._lines.setdefault((note.span.file, note.span.line), SourceCache.line(note.span.file, note.span.line))

    @property
    def file(self) -> str:
        return self.span.file

    @property
    def line(self) -> int:
        return self.span.line

    @property
    def column(self) -> int:
        return self.span.column

    def __str__(self) -> str:
        return f"{self.span}: error: {self.message}"

    def _source(self, span: Span) -> str | None:
        key = (span.file, span.line)
        return self._lines[key] if key in self._lines else SourceCache.line(span.file, span.line)

    def render(self) -> str:
        """The full diagnostic: location, message, quoted source with a caret, notes and help."""
        out = [f"{self.span}: error: {clip(self.message, MAX_MESSAGE)}"]
        out += _quote(self.span, self._source(self.span))
        for note in self.notes:
            if note.span is not None:
                out.append(f"{note.span}: note: {clip(note.message, MAX_MESSAGE)}")
                out += _quote(note.span, self._source(note.span))
            else:
                out.append(f"note: {clip(note.message, MAX_MESSAGE)}")
        if self.help:
            out.append(f"help: {clip(self.help, MAX_MESSAGE)}")
        return "\n".join(out)

    def render_as_note(self, message: str) -> str:
        """This error's location and quoted source as a `note:`, under a diagnostic printed another way."""
        header = f"{self.span}: note: {clip(message, MAX_MESSAGE)}"
        return "\n".join([header, *_quote(self.span, self._source(self.span))])


def clip(text: str, limit: int) -> str:
    """`text`, or its start and end around a '…' that says how much was left out, at most about `limit` long."""
    if len(text) <= limit:
        return text
    keep = max(limit - 40, 2)
    return f"{text[:keep * 2 // 3]}…({len(text) - keep:,} characters)…{text[len(text) - keep // 3:]}"


def _quote(span: Span, source: str | None) -> list[str]:
    if source is None:
        return []
    text = source.rstrip()
    start = min(max(span.column - 1, 0), len(text))
    if span.end_line == span.line and span.end_column and span.end_column > span.column:
        width = span.end_column - span.column
    else:
        width = max(len(text) - start, 1)
    # A window of QUOTE_WIDTH characters that starts a little before the caret; '…' marks each cut side.
    low, high = 0, len(text)
    if len(text) > QUOTE_WIDTH:
        low = max(0, min(start - QUOTE_WIDTH // 4, len(text) - QUOTE_WIDTH))
        high = low + QUOTE_WIDTH
    shown = ("…" if low else "") + _visible(text[low:high]) + ("…" if high < len(text) else "")
    column = start - low + (1 if low else 0)
    width = max(min(width, high - start), 1)
    gutter = f"{span.line:>4} | "
    caret = " " * len(gutter.rstrip("| ")) + " | " + _indent_like(shown, column) + "^" + "~" * (width - 1)
    return [gutter + shown, caret.rstrip()]


def _visible(text: str) -> str:
    """The text with every control, format or separator character but the tab (which would move the terminal's
    cursor, or not show) as one visible character, so that the caret stays under the column it points at."""
    if all(ch == "\t" or ch.isprintable() for ch in text):
        return text
    return "".join(ch if ch == "\t" or ch.isprintable() else _picture(ch) for ch in text)


def _picture(ch: str) -> str:
    code = ord(ch)
    if code < 0x20:
        return chr(0x2400 + code)  # the Unicode control pictures: ␌ for \f, ␋ for \v, ␍ for \r
    if code == 0x7F:
        return "\u2421"  # ␡
    category = unicodedata.category(ch)
    if category in ("Zl", "Zp") or code == 0x85:
        return "\u2424"  # ␤, a newline that is not one to the lexer
    return " " if category == "Zs" else "\ufffd"  # a space of another width; a control or an invisible format


def _indent_like(source: str, column: int) -> str:
    # Keep tabs as tabs so the caret lines up with the quoted line in any terminal.
    return "".join(ch if ch == "\t" else " " for ch in source[:column])


class ParseError(SpecError):
    """The text does not follow the grammar."""


class NameResolutionError(SpecError):
    """A name is unknown, defined twice, or used as the wrong kind of thing."""


class ShapeError(SpecError):
    """Tensor shapes do not agree."""


class SpecTypeError(SpecError):
    """A value has the wrong type for where it is used."""


class LimitError(SpecError):
    """The model or its expansion exceeds a configured limit."""


class SpecImportError(SpecError):
    """An import cannot be resolved or forms a cycle."""


class OverrideError(SpecError):
    """A parameter override (`-p NAME=VALUE`, `params=`) that names no parameter of the model, or gives one a value
    its declaration does not allow: the caller's mistake, located at the declaration (the CLI's usage error)."""

    def __init__(self, message: str, span: Span, *, name: str, value: object, reason: str, declared: str) -> None:
        super().__init__(message, span)
        self.name = name
        self.value = value
        self.reason = reason  # the mistake, told without the spec's location: "d is an int in 32..512, got 1.5"
        self.declared = declared  # what the span shows: "'d' is declared here"

    @property
    def option(self) -> str:
        """The override as `NAME=VALUE` (the value as given: a CLI string verbatim, anything else as its repr)."""
        shown = self.value if isinstance(self.value, str) else repr(self.value)
        return f"{self.name}={clip(shown, 60)}"


class SizeError(ValueError):
    """A size given for FLOP counting (`dims=`, `-d NAME=SIZE`) that is not a positive int or names no symbolic size
    of the model: the caller's mistake, not the spec's; the message starts with `NAME=SIZE:` for the CLI's option."""
