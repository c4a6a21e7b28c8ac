"""The `gatedsl` command: check, compile, graph, bench, search and generate; exit 0 ok, 1 spec errors, 2 usage errors, 3 internal errors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gatedsl import __version__
from gatedsl.cli.options import (EXIT_INTERNAL, EXIT_OK, EXIT_SPEC, EXIT_USAGE, UsageError, dims, model_options, pairs,
                                 spec_file)
from gatedsl.errors import OverrideError, SizeError, SpecError
from gatedsl.fileio import CannotWrite

if TYPE_CHECKING:  # `gatedsl --help` imports nothing of the compiler
    from gatedsl.frontend.loader import Program

REPORT_URL = "https://github.com/gatedsl/gatedsl/issues"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gatedsl", description="Check, compile and draw .gate specs.")
    parser.add_argument("--version", action="version", version=f"gatedsl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="validate specs without allocating weights")
    p.add_argument("files", nargs="+", metavar="FILE")
    model_options(p)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("compile", help="compile a spec and print its summary")
    p.add_argument("file", metavar="FILE")
    model_options(p)
    p.add_argument("-o", "--output", metavar="OUT.py", help="write a standalone PyTorch module and its weights")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--explain", action="store_true",
                   help="show the kernel chosen for every fused op and scan, the candidates, and why")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="the device the kernel choices are made for (default cpu; the module re-chooses per call)")
    p.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
                   help="the dtype the kernel choices are made for (default float32)")
    p.add_argument("--inference", action="store_true", help="make the kernel choices for inference (no gradients)")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("graph", help="draw the IR with shapes on the edges and gates highlighted")
    p.add_argument("file", metavar="FILE")
    model_options(p)
    p.add_argument("-o", "--output", required=True, metavar="OUT.dot|.svg|.png")
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("bench", help="time compiled specs against hand-written PyTorch")
    from gatedsl.bench import add_arguments as bench_arguments  # argparse only; torch is imported when it runs

    bench_arguments(p)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("search", help="search a spec's parameter space with Optuna: leaderboard, Pareto plot")
    from gatedsl.cli.search import add_arguments as search_arguments  # argparse only; optuna loads when it runs

    search_arguments(p)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    p = sub.add_parser("generate", help="new tokens from a spec's language model after prompts of token ids")
    from gatedsl.cli.generate import add_arguments as generate_arguments  # argparse only; torch loads when it runs

    generate_arguments(p)
    p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors, 0 for --help/--version
        return int(exit_.code or 0)
    try:
        return _COMMANDS[args.command](args)
    except UsageError as err:
        print(f"gatedsl: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OverrideError as err:  # a -p naming no parameter or giving a value its declaration refuses
        print(f"gatedsl: error: -p {err.option}: {err.reason}\n{err.render_as_note(err.declared)}", file=sys.stderr)
        return EXIT_USAGE
    except SizeError as err:  # a -d that is not a positive integer or names no symbolic size of the model
        print(f"gatedsl: error: -d {err}", file=sys.stderr)
        return EXIT_USAGE
    except SpecError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_SPEC
    except CannotWrite as err:  # a read-only directory, a directory in the way, a full disk: the user's to fix
        print(f"gatedsl: error: {err}", file=sys.stderr)
        return EXIT_SPEC
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug in gatedsl, never the user's fault
        if debug:
            import traceback

            traceback.print_exc()
        print(f"gatedsl: internal error ({type(err).__name__}: {err}); this is a bug in gatedsl, please report it "
              f"with the spec at {REPORT_URL} (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _check(args) -> int:
    from gatedsl.api import check, check_dims, load

    params = pairs(args.param, "-p")
    sizes = dims(args.dim)
    failed = 0
    for file in args.files:
        path = spec_file(file)
        try:
            program = load(path, max_file_size=args.max_file_size)  # read and parsed once, for both uses
            library = _library_summary(program) if args.model is None else None
            if library is not None:
                print(f"{file}: ok: {library}")
                continue
            rep = check(program, params, model=args.model, max_params=args.max_params, dims=sizes,
                        opt_level=args.opt_level, max_file_size=args.max_file_size, max_ops=args.max_ops)
            check_dims(sizes, list(rep.sizes), rep.model)
        except OverrideError:  # the command line's mistake, not this file's: a usage error
            raise
        except SpecError as err:
            print(err.render(), file=sys.stderr)
            failed += 1
            continue
        print(f"{file}: ok: model {rep.model}, {rep.params:,} parameters, {len(rep.gates)} gate{'' if len(rep.gates) == 1 else 's'}, "
              f"{rep.flops_expr} FLOPs")
    return EXIT_SPEC if failed else EXIT_OK


def _library_summary(program: Program) -> str | None:
    """For a file with no model (a library of blocks and cells): what it defines, once it parses and resolves."""
    if any(d.kind == "model" for d in program.main.definitions):
        return None
    kinds = [d.kind for d in program.main.definitions]
    counts = ", ".join(f"{kinds.count(k)} {k}{'s' if kinds.count(k) != 1 else ''}" for k in ("block", "cell")
                       if k in kinds) or "no definitions"
    return f"library with {counts} (each is checked where a model uses it)"


def _compile(args) -> int:
    from gatedsl.api import analyse, check_dims, report

    path = spec_file(args.file)
    if args.output and Path(args.output).suffix != ".py":
        raise UsageError(f"-o writes a Python module: give a path ending in .py, got {args.output}")
    from gatedsl.ir.model import Target

    target = Target(device=args.device, dtype=args.dtype, training=not args.inference)
    # An export must run with torch alone, so it is compiled without the passes whose fused ops
    # need gatedsl's kernels; the summary (and --explain) then describe what was exported.
    sizes = dims(args.dim)
    unit = analyse(path, pairs(args.param, "-p"), model=args.model, max_params=args.max_params,
                   opt_level=args.opt_level, target=target, standalone=bool(args.output),
                   max_file_size=args.max_file_size, max_ops=args.max_ops)
    rep = report(unit, sizes)
    check_dims(sizes, list(rep.sizes), rep.model)
    from gatedsl.backend.fx_emit import emit

    gm = emit(unit)
    written = None
    if args.output:
        from gatedsl.backend.export import export_standalone

        written = export_standalone(gm, Path(args.output), source=args.file)
    if args.json:
        summary: dict[str, Any] = rep.model_dump()
        summary["gates"] = [{"name": g.name, "kind": g.kind, "file": g.file, "line": g.line} for g in rep.gates]
        if written:
            summary["written"] = [str(p) for p in written]
        print(json.dumps(summary))
    else:
        from gatedsl.cli.summary import print_kernels, print_summary

        print_summary(rep, given=sizes)
        if args.explain:
            print_kernels(rep)
        if written:
            print(f"wrote {written[0]} and its weights {written[1]}")
    return EXIT_OK


def _graph(args) -> int:
    from gatedsl.api import analyse, check_dims, symbolic_sizes
    from gatedsl.cli.draw import write_graph

    path = spec_file(args.file)
    out = Path(args.output)
    if out.suffix not in (".dot", ".svg", ".png"):
        raise UsageError(f"graph writes .dot, .svg or .png, got {out.name}")
    sizes = dims(args.dim)
    unit = analyse(path, pairs(args.param, "-p"), model=args.model, max_params=args.max_params,
                   opt_level=args.opt_level, max_file_size=args.max_file_size, max_ops=args.max_ops)
    check_dims(sizes, symbolic_sizes(unit), unit.model.name)  # the drawing has no use for them, but a typo is one
    try:
        write_graph(unit, out)
    except FileNotFoundError as err:  # Graphviz's `dot` is needed for .svg and .png
        raise UsageError(f"rendering {out.suffix} needs Graphviz's `dot` program ({err}); "
                         f"install graphviz, or write .dot") from None
    print(f"wrote {out}")
    return EXIT_OK


def _bench(args) -> int:
    from gatedsl import bench

    try:
        bench.run(args)
    except ValueError as err:  # --repeats 0, an unsupported --opt-level
        raise UsageError(str(err)) from None
    if args.json:
        print(f"wrote {args.json}")
    return EXIT_OK


def _search(args) -> int:
    from gatedsl.cli.search import run

    return run(args)


def _generate(args) -> int:
    from gatedsl.cli.generate import run

    return run(args)


_COMMANDS = {"check": _check, "compile": _compile, "graph": _graph, "bench": _bench, "search": _search,
             "generate": _generate}


if __name__ == "__main__":
    sys.exit(main())
