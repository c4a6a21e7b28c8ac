"""What every command shares: its exit statuses, the usage-error type, and parsing of NAME=VALUE options."""

from __future__ import annotations

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
    sizes = {}
    for name, value in pairs(items, "-d").items():
        try:
            sizes[name] = int(value)
        except ValueError:
            raise UsageError(f"-d {name}= needs an integer size, got {value!r}") from None
    return sizes
