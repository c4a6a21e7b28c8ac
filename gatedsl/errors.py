"""Every problem in a spec is a SpecError that knows where it is and renders like a compiler diagnostic."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    """Holds the text of every file read in this process so diagnostics can quote it."""

    _texts: dict[str, str] = {}

    @classmethod
    def put(cls, file: str, text: str) -> None:
        cls._texts[file] = text

    @classmethod
    def line(cls, file: str, line: int) -> str | None:
        text = cls._texts.get(file)
        if text is None:
            try:
                text = Path(file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                return None
            cls._texts[file] = text
        lines = text.splitlines()
        if 1 <= line <= len(lines):
            return lines[line - 1]
        return None


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
        out = [f"{self.span}: error: {self.message}"]
        out += _quote(self.span, self._source(self.span))
        for note in self.notes:
            if note.span is not None:
                out.append(f"{note.span}: note: {note.message}")
                out += _quote(note.span, self._source(note.span))
            else:
                out.append(f"note: {note.message}")
        if self.help:
            out.append(f"help: {self.help}")
        return "\n".join(out)


def _quote(span: Span, source: str | None) -> list[str]:
    if source is None:
        return []
    gutter = f"{span.line:>4} | "
    start = max(span.column - 1, 0)
    if span.end_line == span.line and span.end_column and span.end_column > span.column:
        width = span.end_column - span.column
    else:
        width = max(len(source.rstrip()) - start, 1)
    caret = " " * len(gutter.rstrip("| ")) + " | " + _indent_like(source, start) + "^" + "~" * (width - 1)
    return [gutter + source.rstrip(), caret.rstrip()]


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
