"""What every command shares: its exit statuses, the usage-error type, and reading of its arguments (spec files,
NAME=VALUE options, sizes)."""

from __future__ import annotations

import argparse
from pathlib import Path

EXIT_OK, EXIT_SPEC, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(Exception):
    """A command-line mistake that argparse cannot see (a malformed -p, an unknown output format)."""


def pairs(items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{what} must look like NAME=VALUE, got {item!r}")
        out[name.strip()] = value
    return out


def dims(items: list[str]) -> dict[str, int]:
    """`-d NAME=SIZE` options as {NAME: SIZE}; gatedsl.api.check_dims then checks each against the model's sizes
    (SizeError, which cli/main turns into a usage error naming -d)."""
    sizes = {}
    for name, value in pairs(items, "-d").items():
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UsageError(f"-d {name}={value}: a size must be a positive integer") from None
    return sizes


def spec_file(name: str) -> Path:
    """A FILE argument: an existing .gate file (anything else is never opened, so never quoted in an error)."""
    path = Path(name)
    if path.suffix != ".gate":
        raise UsageError(f"{name} is not a spec: gatedsl reads .gate files")
    if not path.is_file():
        raise UsageError(f"no such file: {name}")
    return path


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs a positive integer, got {text!r}")
    return value


def model_options(p: argparse.ArgumentParser, sizes: bool = True) -> None:
    """The options that pick and bound a spec's model (and, where `sizes`, -d for counting FLOPs), and -O."""
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a model parameter (repeatable)")
    p.add_argument("--model", help="the model to use when the file defines several")
    p.add_argument("--max-params", type=int, default=None, metavar="N",
                   help="reject models with more learned elements than this (default 2**31)")
    p.add_argument("--max-ops", type=positive_int, default=None, metavar="N",
                   help="reject models that expand to more operations than this (default 200,000)")
    p.add_argument("--max-file-size", type=positive_int, default=None, metavar="BYTES",
                   help="refuse spec files (and imports) larger than this, before reading them (default 4 MiB)")
    if sizes:
        p.add_argument("-d", "--dim", action="append", default=[], metavar="SYM=SIZE",
                       help="a size for a symbolic dim of the model when counting FLOPs (default 1)")
    p.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=2, metavar="LEVEL",
                   help="optimisation level: -O0 none, -O1 recurrence lowering, -O2 all (the default)")
