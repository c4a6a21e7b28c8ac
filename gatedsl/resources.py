"""Where the grammar, the standard library and the specs `gatedsl bench` compiles live, in a source checkout and in an
installed wheel."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent


def grammar_path() -> Path:
    # A wheel carries the grammar inside the package; a checkout keeps it at the top level.
    shipped = _PACKAGE / "_data" / "gate.lark"
    return shipped if shipped.exists() else _CHECKOUT / "grammars" / "gate.lark"


def stdlib_dir() -> Path:
    shipped = _PACKAGE / "_data" / "std"
    return shipped if shipped.is_dir() else _CHECKOUT / "specs" / "std"


def bench_spec(relative: str) -> Path:
    """A spec `gatedsl bench` compiles, by its path in a checkout ("specs/gru.gate", "benchmarks/specs/mgu.gate"):
    a wheel carries each at the same path under _data/bench/."""
    shipped = _PACKAGE / "_data" / "bench" / relative
    return shipped if shipped.exists() else _CHECKOUT / relative
