"""Resolve a spec's imports into one Program: every definition by name, with cycles and duplicates reported."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from gatedsl.errors import LimitError, NameResolutionError, Note, Span, SpecImportError
from gatedsl.frontend import ast
from gatedsl.frontend.parser import parse
from gatedsl.resources import stdlib_dir


@dataclass
class Program:
    main: ast.Module
    definitions: dict[str, ast.Definition] = field(default_factory=dict)
    modules: list[ast.Module] = field(default_factory=list)  # every file read, the main one first


MAX_FILE_SIZE = 4 * 2**20  # bytes in one spec file (specs are kilobytes): larger ones are refused before reading


def load_text(text: str, file: str = "<string>", *, max_file_size: int = MAX_FILE_SIZE) -> Program:
    """Parse `text` as the main file and load everything it imports (each at most `max_file_size` bytes)."""
    _check_limit(max_file_size)
    # Characters first: a text within the limit in characters is encoded only to count its bytes.
    if len(text) > max_file_size or len(text.encode("utf-8", "surrogatepass")) > max_file_size:
        raise LimitError(f"the spec text is larger than {max_file_size:,} bytes, the limit for a spec", Span(file, 1, 1),
                         help=_RAISE_LIMIT)
    module = parse(text, file)
    program = Program(module)
    _Loader(program, max_file_size).add(module, stack=[_key(file)])
    return program


def load_path(path: str | Path, *, max_file_size: int = MAX_FILE_SIZE) -> Program:
    """Parse the spec file at `path` (a .gate file of at most `max_file_size` bytes) and everything it imports."""
    _check_limit(max_file_size)
    path = Path(path)
    return load_text(read_spec(path, max_file_size, Span(str(path), 1, 1)), str(path), max_file_size=max_file_size)


_RAISE_LIMIT = "a spec is a few kilobytes; if this one is meant to be larger, raise the limit with --max-file-size " \
               "(max_file_size= in Python)"


def _check_limit(max_file_size: int) -> None:
    if isinstance(max_file_size, bool) or not isinstance(max_file_size, int) or max_file_size < 1:
        raise ValueError(f"max_file_size must be a positive int (bytes), got {max_file_size!r}")


def read_spec(path: Path, max_file_size: int, span: Span) -> str:
    """The text of the spec file `path`, or a SpecError at `span` (where it is named): a file that is not named
    .gate is never opened, and one larger than `max_file_size` bytes is refused without holding more than
    max_file_size + 1 bytes of it, however it grows while it is read."""
    if path.suffix != ".gate":
        raise SpecImportError(f"{path} is not a spec: a spec is a .gate file", span)
    try:
        # O_NONBLOCK: opening a FIFO (or a device) must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise SpecImportError(f"cannot read {path}: {err.strerror}", span) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SpecImportError(f"cannot read {path}: not a regular file", span)
        if info.st_size > max_file_size:
            raise LimitError(f"{path} is {info.st_size:,} bytes, more than {max_file_size:,}, the limit for a spec file",
                             span, help=_RAISE_LIMIT)
        try:
            data = f.read(max_file_size + 1)
        except OSError as err:
            raise SpecImportError(f"cannot read {path}: {err.strerror}", span) from None
    if len(data) > max_file_size:
        raise LimitError(f"{path} is more than {max_file_size:,} bytes, the limit for a spec file", span,
                         help=_RAISE_LIMIT)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecImportError(f"cannot read {path}: not UTF-8 text", span) from None


def _key(file: str) -> str:
    try:
        return str(Path(file).resolve())
    except OSError:
        return file


class _Loader:
    def __init__(self, program: Program, max_file_size: int):
        self.program = program
        self.max_file_size = max_file_size
        self.loaded: set[str] = set()

    def add(self, module: ast.Module, stack: list[str]) -> None:
        self.loaded.add(stack[-1])
        self.program.modules.append(module)
        for imp in module.imports:
            path = resolve_import(imp, module.file)
            key = _key(str(path))
            if key in stack:
                chain = " -> ".join(Path(k).name for k in stack[stack.index(key):] + [key])
                raise SpecImportError(f"import cycle: {chain}", imp.span,
                                      help="move the shared definitions into a file both can import")
            if key in self.loaded:
                continue
            self.add(parse(read_spec(path, self.max_file_size, imp.span), str(path)), stack + [key])
        for definition in module.definitions:
            previous = self.program.definitions.get(definition.name)
            if previous is not None:
                raise NameResolutionError(
                    f"'{definition.name}' is defined twice",
                    definition.span,
                    notes=[Note("the first definition is here", previous.span)],
                    help="rename one of them",
                )
            self.program.definitions[definition.name] = definition


def resolve_import(imp: ast.Import, importer: str) -> Path:
    """The file an import names, beside the importing file (or the working directory for text)."""
    if imp.quoted:
        if Path(imp.module).suffix != ".gate":  # refused before anything is opened: only specs are read
            raise SpecImportError(f"an import names a .gate file, got \"{imp.module}\"", imp.span)
        base = Path(importer).parent if not importer.startswith("<") else Path.cwd()
        path = base / imp.module
    else:
        parts = imp.module.split(".")
        if parts[0] == "std":
            path = stdlib_dir().joinpath(*parts[1:]).with_suffix(".gate")
        else:
            base = Path(importer).parent if not importer.startswith("<") else Path.cwd()
            path = base.joinpath(*parts).with_suffix(".gate")
    if not path.is_file():
        hint = None
        if not imp.quoted and imp.module.startswith("std"):
            names = sorted(p.stem for p in stdlib_dir().glob("*.gate"))
            hint = "the standard library has: " + ", ".join(f"std.{n}" for n in names)
        raise SpecImportError(f"cannot find '{imp.module}' (looked for {path})", imp.span, help=hint)
    return path
