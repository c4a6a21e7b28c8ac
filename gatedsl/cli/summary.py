"""The human summary `gatedsl compile` prints: inputs and outputs, parameters per block, FLOPs and gates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from gatedsl.api import Report

MAX_VALUE = 40  # characters of a parameter's value shown in the summary (a string default may be megabytes)


def _shape(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _console() -> Console:
    # No markup: names, shapes ([batch, 4]) and string values ("[/x]") are the spec's text, shown as written.
    return Console(highlight=False, soft_wrap=True, markup=False)


def _value(v: Any) -> str:
    text = str(v).lower() if isinstance(v, bool) else str(v)
    return text if len(text) <= MAX_VALUE else f"{text[:MAX_VALUE - 10]}… ({len(text):,} characters)"


def count(n: int) -> str:
    """A count for people: 729,600, and past a million also its size in units, 2,123,456,789 (2.12 G)."""
    if abs(n) < 10**6:
        return f"{n:,}"
    for unit, scale in (("E", 10**18), ("P", 10**15), ("T", 10**12), ("G", 10**9), ("M", 10**6)):
        short = f"{n / scale:.3g}"  # the unit is chosen after rounding: 999,999,999 is 1 G, not 1e+03 M
        if abs(float(short)) >= 1:
            return f"{n:,} ({short if 'e' not in short else f'{n / scale:,.0f}'} {unit})"
    return f"{n:,}"


def flops_line(rep: Report, given: dict[str, int]) -> str:
    """The FLOP count as a polynomial in the model's sizes and its value, saying at which sizes and how to set them."""
    if not rep.sizes:
        return f"FLOPs per forward: {count(rep.flops)}"
    at = ", ".join(f"{name}={size}" for name, size in rep.sizes.items())
    line = f"FLOPs per forward: {rep.flops_expr} = {count(rep.flops)} at {at}"
    missing = [name for name in rep.sizes if name not in given]
    if len(missing) == len(rep.sizes):
        line += f" (no size was given, so each is 1: give them with -d, e.g. -d {missing[-1]}=1024)"
    elif missing:
        line += f" ({', '.join(missing)} not given, so 1: e.g. -d {missing[-1]}=1024)"
    return line


def print_summary(rep: Report, console: Console | None = None, given: dict[str, int] | None = None) -> None:
    """The summary of `rep`; `given` are the sizes the user gave (-d), to say which of rep.sizes defaulted to 1."""
    console = console or _console()
    params = ", ".join(f"{k}={_value(v)}" for k, v in rep.parameters.items())
    console.print(Text.assemble((f"model {rep.model}", "bold"), f" ({rep.file})" + (f"  {params}" if params else "")))

    io = Table(title="inputs and outputs", title_justify="left", show_edge=False)
    io.add_column("name")
    io.add_column("kind")
    io.add_column("shape")
    for name, shape in rep.inputs.items():
        dtype = rep.input_dtypes.get(name, "float")
        io.add_row(name, "input", (dtype if dtype != "float" else "") + _shape(shape))
    for name, shape in rep.outputs.items():
        io.add_row(name, "output", _shape(shape))
    console.print(io)

    blocks = Table(title="parameters", title_justify="left", show_edge=False)
    blocks.add_column("block")
    blocks.add_column("parameters", justify="right")
    for block, count in sorted(rep.params_by_block.items()):
        blocks.add_row(block, f"{count:,}")
    blocks.add_row(Text("total", style="bold"), Text(f"{rep.params:,}", style="bold"))
    console.print(blocks)

    console.print(flops_line(rep, given or {}))

    gates = Table(title=f"gates ({len(rep.gates)})", title_justify="left", show_edge=False)
    gates.add_column("gate")
    gates.add_column("kind")
    gates.add_column("line", justify="right")
    for g in rep.gates:
        where = str(g.line) if g.file == rep.file else f"{Path(g.file).name}:{g.line}"
        gates.add_row(g.name, g.kind, where)
    console.print(gates)

    if rep.aux:  # `aux NAME = ...`: recorded at each call, read with model.aux
        aux = Table(title=f"aux values ({len(rep.aux)})", title_justify="left", show_edge=False)
        aux.add_column("aux")
        aux.add_column("shape")
        for name, shape in rep.aux.items():
            aux.add_row(name, _shape(shape))
        console.print(aux)


def print_kernels(rep: Report, console: Console | None = None) -> None:
    """`--explain`: for every fused op and scan, the kernel chosen for the target, why, and each candidate (+ applies,
    - does not), then for an op along a sequence the kernel of one-token calls (decoding) and why, wrapped to the
    terminal's width; a kernel's name is never broken."""
    console = console or Console(highlight=False, markup=False)
    if not rep.kernels:
        console.print("kernels: no fused ops or scans in this model")
        return
    target = rep.kernels[0]["target"]
    mode = "training" if target["training"] else "inference"
    console.print(Text(f"kernels (for {target['device']}, {target['dtype']}, {mode}; the module re-chooses for each "
                       f"call's tensors)", style="bold"))
    for choice in rep.kernels:
        console.print(Text.assemble("\n", choice["node"], (f" {choice['op']}", "dim"), ": ",
                                    (choice["kernel"], "bold"), f", {choice['reason']}"))
        # Two columns: each candidate's name whole, and why, wrapped beside it to the width left.
        candidates = Table.grid(padding=(0, 2, 0, 0))
        candidates.add_column(no_wrap=True)
        candidates.add_column()
        for c in choice["candidates"]:
            name = Text.assemble("+ " if c["applies"] else "- ", (c["kernel"], "bold" if c["applies"] else ""))
            candidates.add_row(name, c["why"] if c["applies"] else f"does not apply: {c['why']}")
        console.print(Padding(candidates, (0, 0, 0, 2), expand=False))
        decoding = choice.get("decoding")
        if decoding:  # an op along a sequence: what a decoder's one-token calls run
            console.print(Padding(Text.assemble("one-token calls (decoding): ", (decoding["kernel"], "bold"),
                                                f", {decoding['reason']}"), (0, 0, 0, 2), expand=False))
