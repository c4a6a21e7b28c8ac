"""The package's layers hold: no module imports one of a higher layer, and no chain of imports leads back to
where it started; every import counts, at the top of a file, inside a function, or under TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path


import gatedsl

PACKAGE = Path(gatedsl.__file__).resolve().parent

# Each layer may import its own and the lower ones (README: frontend → ir → passes → backend, with kernels,
# search and cli beside). kernels sits beside ir: a kernel reads the attributes of the op it runs, and an op's
# attributes may be a kernel's torch-free program (a gate chain's).
LAYERS = [
    ("base", ("gatedsl.errors", "gatedsl.resources", "gatedsl.fileio")),
    ("frontend", ("gatedsl.frontend",)),
    ("ir", ("gatedsl.ir", "gatedsl.kernels")),
    ("passes", ("gatedsl.passes",)),
    ("backend", ("gatedsl.backend",)),
    ("api", ("gatedsl.api", "gatedsl.interop", "gatedsl.decoding", "gatedsl.generation")),
    ("search", ("gatedsl.search",)),
    ("cli", ("gatedsl", "gatedsl.__main__", "gatedsl.cli", "gatedsl.bench")),
]

Edge = tuple[str, str, int]  # importer, imported, line


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py), with its file
    relative to the package's parent."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        file = path.relative_to(package.parent)
        parts = list(file.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = file
    return modules


def imports(source: str, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """The package's modules that `source` imports anywhere in it, with the line of each import: `from P import M`
    names module P.M where there is one, and P otherwise."""
    here = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):  # every node: function bodies and `if TYPE_CHECKING:` blocks too
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: len(here.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                found.append((submodule if submodule in known else origin, node.lineno))
    return [(name, line) for name, line in found if name in known and name != module]


def import_edges(package: Path = PACKAGE) -> tuple[dict[str, Path], list[Edge]]:
    modules = module_files(package)
    edges = []
    for name, file in modules.items():
        source = (package.parent / file).read_text(encoding="utf-8")
        for imported, line in imports(source, name, file.name == "__init__.py", set(modules)):
            edges.append((name, imported, line))
    return modules, edges


def layer_of(module: str) -> int:
    """The index in LAYERS of the layer `module` belongs to: its longest matching prefix's."""
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank is None:
        raise LookupError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return rank


def upward_imports(modules: dict[str, Path], edges: list[Edge]) -> list[str]:
    problems = []
    for importer, imported, line in edges:
        low, high = layer_of(importer), layer_of(imported)
        if high > low:
            problems.append(f"{_where(modules, importer, line)}: {importer} ({LAYERS[low][0]}) imports {imported} "
                            f"({LAYERS[high][0]}), a higher layer")
    return problems


def cycles(modules: dict[str, Path], edges: list[Edge]) -> list[str]:
    """One chain per cycle found, each import shown with its file and line (a cycle's modules are then left out,
    so that one tangle is reported once)."""
    graph: dict[str, list[tuple[str, int]]] = {m: [] for m in modules}
    for importer, imported, line in edges:
        graph[importer].append((imported, line))
    found, done = [], set()
    for start in sorted(graph):
        chain = _cycle_from(start, graph, done)
        if chain is not None:
            found.append("import cycle:\n" + "\n".join(
                f"  {_where(modules, a, line)}: {a} imports {b}" for a, b, line in chain))
            done |= {a for a, _, _ in chain}
    return found


def _cycle_from(start: str, graph: dict[str, list[tuple[str, int]]], skip: set[str]) -> list[Edge] | None:
    """A chain of imports from `start` back to it, by depth-first search (iterative: chains can be long)."""
    if start in skip:
        return None
    path: list[Edge] = []
    seen = {start}
    stack = [iter(graph[start])]
    current = start
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            if path:
                current = path.pop()[0]
            continue
        target, line = step
        if target == start:
            return path + [(current, target, line)]
        if target in seen or target in skip:
            continue
        seen.add(target)
        path.append((current, target, line))
        current = target
        stack.append(iter(graph[target]))
    return None


def _where(modules: dict[str, Path], module: str, line: int) -> str:
    return f"{modules[module]}:{line}"


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(*import_edges())
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    problems = cycles(*import_edges())
    assert not problems, "\n".join(problems)


def test_imports_inside_functions_and_type_checking_count():
    source = """
from typing import TYPE_CHECKING
from gatedsl.ir import values
from . import graph
if TYPE_CHECKING:
    from gatedsl.passes.elaborate import Elaborator
def f():
    import gatedsl.cli.main
    from gatedsl.search.space import Space
"""
    known = {"gatedsl.ir", "gatedsl.ir.values", "gatedsl.ir.graph", "gatedsl.ir.types", "gatedsl.passes.elaborate",
             "gatedsl.cli.main", "gatedsl.search.space"}
    assert imports(source, "gatedsl.ir.types", False, known) == [
        ("gatedsl.ir.values", 3), ("gatedsl.ir.graph", 4), ("gatedsl.passes.elaborate", 6),
        ("gatedsl.cli.main", 8), ("gatedsl.search.space", 9)]


def test_a_cycle_and_an_upward_import_are_reported_with_their_chain(tmp_path):
    package = tmp_path / "gatedsl"
    for name, text in {"__init__.py": "", "ir/__init__.py": "", "passes/__init__.py": "",
                       "ir/ops.py": "def f():\n    from gatedsl.passes.count import g\n",
                       "passes/count.py": "from gatedsl.ir.ops import f\n"}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    modules, edges = import_edges(package)
    assert upward_imports(modules, edges) == [
        "gatedsl/ir/ops.py:2: gatedsl.ir.ops (ir) imports gatedsl.passes.count (passes), a higher layer"]
    assert cycles(modules, edges) == ["import cycle:\n"
                                      "  gatedsl/ir/ops.py:2: gatedsl.ir.ops imports gatedsl.passes.count\n"
                                      "  gatedsl/passes/count.py:1: gatedsl.passes.count imports gatedsl.ir.ops"]
