"""Resolve a spec's imports into one Program: every definition by name, with cycles and duplicates reported."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from gatedsl.errors import NameResolutionError, Note, Span, SpecImportError
from gatedsl.frontend import ast
from gatedsl.frontend.parser import parse
from gatedsl.resources import stdlib_dir


@dataclass
class Program:
    main: ast.Module
    definitions: dict[str, ast.Definition] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def load_text(text: str, file: str = "<string>") -> Program:
    """Parse `text` as the main file and load everything it imports."""
    module = parse(text, file)
    program = Program(module)
    _Loader(program).add(module, stack=[_key(file)])
    return program


def load_path(path: str | Path) -> Program:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SpecImportError(f"cannot read {path}: {err.strerror if isinstance(err, OSError) else 'not UTF-8 text'}",
                              Span(str(path), 1, 1)) from None
    return load_text(text, str(path))


def _key(file: str) -> str:
    try:
        return str(Path(file).resolve())
    except OSError:
        return file


class _Loader:
    def __init__(self, program: Program):
        self.program = program
        self.loaded: set[str] = set()

    def add(self, module: ast.Module, stack: list[str]) -> None:
        self.loaded.add(stack[-1])
        self.program.files.append(module.file)
        for imp in module.imports:
            path = resolve_import(imp, module.file)
            key = _key(str(path))
            if key in stack:
                chain = " -> ".join(Path(k).name for k in stack[stack.index(key):] + [key])
                raise SpecImportError(f"import cycle: {chain}", imp.span,
                                      help="move the shared definitions into a file both can import")
            if key in self.loaded:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                raise SpecImportError(f"cannot read imported file {path}", imp.span) from None
            self.add(parse(text, str(path)), stack + [key])
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
