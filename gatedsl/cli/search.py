"""`gatedsl search`: an Optuna search over a spec's space, with a progress bar, a leaderboard and a Pareto plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gatedsl.cli.options import positive_int

if TYPE_CHECKING:  # the parser is built for every command; optuna and torch load only when a search runs
    from gatedsl.search.engine import SearchResult

SAMPLERS = ("random", "grid", "tpe", "nsga2")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="the .gate file whose model parameters with domains are searched")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--task", metavar="TASK", help="a built-in task: lorenz96, mqar or parity")
    how.add_argument("--objective", metavar="MODULE:FUNCTION",
                     help="a function of the compiled module (or of the DNA, if its parameter is named dna) "
                          "returning a value to minimise, or a tuple of them; MODULE may be a path.py")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="trials the study should hold: a resumed study runs only the rest")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="Optuna's sampler (default tpe)")
    p.add_argument("--objectives", default="metric", metavar="NAME,...",
                   help="what to minimise: metric, params, flops, latency (several: a Pareto search), "
                        "or names for the values of a tuple-returning --objective (default metric)")
    p.add_argument("--storage", metavar="URL",
                   help="a SQLite file or URL, a postgresql:// URL, or memory (default ./gatedsl-search.db)")
    p.add_argument("--study", metavar="NAME", help="the study's name (default: derived from the spec and task)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes evaluating trials at once, sharing the storage")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="fix a model parameter: it leaves the search space (repeatable)")
    p.add_argument("--model", help="the model to search when the file defines several")
    p.add_argument("-d", "--dim", action="append", default=[], metavar="SYM=SIZE",
                   help="a size for a symbolic dim when counting FLOPs (default 1)")
    p.add_argument("--max-params", type=int, default=None, metavar="N",
                   help="screen out candidates with more learned elements than this")
    p.add_argument("--max-flops", type=int, default=None, metavar="N",
                   help="screen out candidates with more FLOPs than this (with the -d sizes)")
    p.add_argument("--max-file-size", type=positive_int, default=None, metavar="BYTES",
                   help="refuse spec files (and imports) larger than this, before reading them (default 4 MiB)")
    p.add_argument("--steps", type=int, default=None, metavar="N", help="training steps per candidate (the task's default)")
    p.add_argument("--task-option", action="append", default=[], metavar="NAME=VALUE",
                   help="an option of the task, e.g. batch=16 or window=24 (repeatable)")
    p.add_argument("-O", dest="opt_level", type=int, choices=(0, 1, 2), default=2, metavar="LEVEL",
                   help="optimisation level the candidates are compiled at (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of a task's training runs")
    p.add_argument("--top", type=int, default=10, metavar="K", help="leaderboard rows (default 10)")
    p.add_argument("--json", action="store_true",
                   help="print {trials, complete, best: {dna, values}} (best is the Pareto list for several objectives)")
    p.add_argument("--export-best", metavar="FILE.gate", help="write the best candidate's spec, every parameter fixed")
    p.add_argument("--plot", metavar="FILE.png",
                   help="write the Pareto front (several objectives; default STUDY-pareto.png) or the history (one)")


def run(args: argparse.Namespace) -> int:
    from gatedsl.cli.options import EXIT_OK, EXIT_SPEC, UsageError, dims, pairs, spec_file

    spec_file(args.spec)
    if args.export_best and Path(args.export_best).suffix != ".gate":
        raise UsageError(f"--export-best writes a spec: give a path ending in .gate, got {args.export_best}")
    if args.plot and Path(args.plot).suffix != ".png":
        raise UsageError(f"--plot writes a PNG: give a path ending in .png, got {args.plot}")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    objectives = tuple(name.strip() for name in args.objectives.split(","))

    from gatedsl.fileio import atomic_write, check_writable
    from gatedsl.search.engine import MEMORY, SearchError, SearchInterrupted, prepare_search, run_search

    try:
        plan = prepare_search(args.spec, task=args.task, objective=args.objective, trials=args.trials,
                              sampler=args.sampler, storage=args.storage, study=args.study, workers=args.workers,
                              objectives=objectives, seed=args.seed, model=args.model,
                              fixed=pairs(args.param, "-p"), dims=dims(args.dim), max_params=args.max_params,
                              max_flops=args.max_flops, steps=args.steps,
                              task_options=pairs(args.task_option, "--task-option"), opt_level=args.opt_level,
                              max_file_size=args.max_file_size)
    except SearchError as error:
        raise UsageError(str(error)) from None
    plot = args.plot or (f"{plan.study}-pareto.png" if len(plan.objectives) > 1 else None)
    for output in (args.export_best, plot):  # before the search has run, not after
        if output:
            check_writable(output)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = err if args.json else Console(highlight=False, soft_wrap=True)
    columns = (TextColumn("search"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    try:
        with Progress(*columns, console=err, transient=True) as bar:
            shown = bar.add_task("", total=args.trials)

            def progress(tally, total: int) -> None:
                best = f"best {tally.best:.4g}" if tally.best is not None else ""
                bar.update(shown, completed=tally.decided, total=total, description=best)

            result = run_search(plan, progress=progress)
    except SearchError as error:
        raise UsageError(str(error)) from None
    except SearchInterrupted as stop:
        where = ("the study was in memory, so its results are gone" if stop.storage == MEMORY else
                 f"the same command resumes study {stop.study} in {stop.storage}")
        err.print(f"interrupted: {stop.decided} of {stop.trials} trials done ({stop.complete} complete); {where}")
        raise  # the command's exit status for Ctrl-C

    if args.json:
        print(json.dumps(result.summary()))
    else:
        print_leaderboard(result, out, args.top)
    for message, count in result.errors.items():
        err.print(f"note: {count} trial{'s' if count != 1 else ''} failed: {message}")
    if result.stopped:
        err.print(f"note: {result.stopped}")

    failed = False
    if plot and result.leaderboard:
        failed |= not _write(plot, lambda: write_plot(result, Path(plot)), out)
    if args.export_best:
        if not result.best:
            print(f"gatedsl: error: no candidate completed, so there is no best to export to {args.export_best}",
                  file=sys.stderr)
            return EXIT_SPEC
        text = result.bind()
        failed |= not _write(args.export_best, lambda: atomic_write(Path(args.export_best),
                                                                    lambda f: f.write(text.encode("utf-8"))), out)
    if failed:
        kept = ("it was in memory, so run it again with --storage FILE.db to keep it" if result.storage == MEMORY
                else f"study {result.study} is saved in {result.storage}, and the same command writes the files "
                     f"again without training")
        print(f"note: the search itself finished; {kept}", file=sys.stderr)
        return EXIT_SPEC
    return EXIT_OK


def _write(path: str, write, console) -> bool:
    """Write one output after the search; False, with the error printed, if it could not be written."""
    from gatedsl.fileio import CannotWrite

    try:
        write()
    except CannotWrite as error:  # the disk filled, or the directory changed, while the search ran
        print(f"gatedsl: error: {error}", file=sys.stderr)
        return False
    console.print(f"wrote {path}")
    return True


def _value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _dna(dna: dict) -> str:
    return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in dna.items())


def print_leaderboard(result: SearchResult, console, top: int) -> None:
    from rich.table import Table

    counts = (f"{result.trials} trials: {result.complete} complete, {result.pruned} pruned, "
              f"{result.screened_out} screened out, {result.failed} failed; {result.reused} more repeated a "
              f"candidate and reused its result")
    kept = "in memory, gone when the command ends" if result.storage == "memory" else \
        f"in {result.storage} (the same command resumes it)"
    console.print(f"study [bold]{result.study}[/bold] {kept}")
    console.print(counts)
    if not result.leaderboard:
        console.print("no candidate completed")
        return
    several = len(result.objectives) > 1
    title = "Pareto set first" if several else "best first"
    table = Table(title=f"leaderboard ({title})", title_justify="left", show_edge=False)
    table.add_column("rank", justify="right", no_wrap=True)
    table.add_column("trial", justify="right", no_wrap=True)
    if several:
        table.add_column("pareto", justify="center")
    for name in result.objectives:
        table.add_column("latency s" if name == "latency" else name, justify="right", no_wrap=True)
    extra = [("metric", "metric"), ("params", "params"), ("flops", "FLOPs"), ("latency_s", "latency s")]
    extra = [(attr, label) for attr, label in extra
             if attr.removesuffix("_s") not in result.objectives and any(getattr(c, attr) is not None
                                                                          for c in result.leaderboard)]
    if all(c.metric == c.values[0] for c in result.leaderboard):  # the metric is the first objective's column
        extra = [(attr, label) for attr, label in extra if attr != "metric"]
    for _, label in extra:
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("candidate", min_width=24, overflow="fold")  # wraps between choices, never cuts one off
    pareto = {c.hash for c in result.best}
    for rank, c in enumerate(result.leaderboard[:top], 1):
        row = [str(rank), str(c.number)] + (["*" if c.hash in pareto else ""] if several else [])
        row += [_value(v) for v in c.values] + [_value(getattr(c, attr)) for attr, _ in extra] + [_dna(c.dna)]
        table.add_row(*row)
    console.print(table)


def write_plot(result: SearchResult, path: Path) -> None:
    """The Pareto front of the first two objectives (several), or each candidate's value by trial (one), as a PNG."""
    from matplotlib.figure import Figure  # the object API needs no pyplot state, so no backend is switched

    from gatedsl.fileio import atomic_write

    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    board = result.leaderboard
    if len(result.objectives) > 1:
        x_name, y_name = result.objectives[:2]
        ax.scatter([c.values[0] for c in board], [c.values[1] for c in board], s=18, color="0.6",
                   label="candidates")
        front = sorted(result.best, key=lambda c: (c.values[0], c.values[1]))
        ax.step([c.values[0] for c in front], [c.values[1] for c in front], where="post", color="C3", lw=1)
        ax.scatter([c.values[0] for c in front], [c.values[1] for c in front], s=30, color="C3",
                   label="Pareto set")
        ax.set_xlabel("latency (s)" if x_name == "latency" else x_name)
        ax.set_ylabel("latency (s)" if y_name == "latency" else y_name)
        more = f" (first two of {len(result.objectives)} objectives)" if len(result.objectives) > 2 else ""
        ax.set_title(f"{result.study}: Pareto front{more}")
    else:
        ordered = sorted(board, key=lambda c: c.number)
        ax.scatter([c.number for c in ordered], [c.values[0] for c in ordered], s=18, color="0.6",
                   label="candidates")
        best, running = [], float("inf")
        for c in ordered:
            running = min(running, c.values[0])
            best.append(running)
        ax.step([c.number for c in ordered], best, where="post", color="C3", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(result.objectives[0])
        ax.set_title(f"{result.study}: history")
    ax.legend()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
