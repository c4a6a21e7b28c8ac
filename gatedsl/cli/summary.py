"""The human summary `gatedsl compile` prints: inputs and outputs, parameters per block, FLOPs and gates."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from gatedsl.api import Report


def _shape(shape: list) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def print_summary(rep: Report, console: Console | None = None) -> None:
    console = console or Console(highlight=False, soft_wrap=True)
    params = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in rep.parameters.items())
    console.print(f"[bold]model {rep.model}[/bold] ({rep.file})" + (f"  {params}" if params else ""))

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
    blocks.add_row("[bold]total[/bold]", f"[bold]{rep.params:,}[/bold]")
    console.print(blocks)

    console.print(f"FLOPs per forward: {rep.flops_expr}  (= {rep.flops:,} with the given sizes, 1 elsewhere)")

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
    """`--explain`: for every fused op and scan, the kernel chosen for the target, why, and each candidate."""
    console = console or Console(highlight=False, soft_wrap=True)
    if not rep.kernels:
        console.print("kernels: no fused ops or scans in this model")
        return
    target = rep.kernels[0]["target"]
    mode = "training" if target["training"] else "inference"
    table = Table(title=f"kernels (for {target['device']}, {target['dtype']}, {mode}; "
                        f"the module re-chooses for each call's tensors)", title_justify="left", show_edge=False)
    table.add_column("op")
    table.add_column("kernel")
    table.add_column("why")
    table.add_column("candidates")
    for choice in rep.kernels:
        others = "; ".join(f"{c['kernel']}: {c['why']}" if c["applies"] else f"{c['kernel']}: no, {c['why']}"
                           for c in choice["candidates"])
        table.add_row(f"{choice['node']}\n[dim]{choice['op']}[/dim]", f"[bold]{choice['kernel']}[/bold]",
                      choice["reason"], others)
    console.print(table)
