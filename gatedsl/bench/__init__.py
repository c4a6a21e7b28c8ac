"""`gatedsl bench`: compiled specs against the PyTorch a user would otherwise write.

Each case builds a gatedsl model and its baselines (gatedsl/bench/baselines.py, torch's fused
layers, torch.compile of the eager module) with the same weights, then times them in one
process, interleaved: after warm-up, every repetition runs each implementation once, in an
order rotated by one each repetition, so that drift in the machine's speed (turbo, other
load) falls on all of them alike. Reported: the median of each, and the ratio
gatedsl / baseline (below 1: gatedsl is faster). Forward runs under `torch.no_grad()`;
forward+backward runs the forward, sums the (first) output and backpropagates to the weights.

Everything it needs ships in the package: the baselines beside this file, and the specs it
compiles (specs/ and benchmarks/specs/ of a checkout) under gatedsl/_data/bench/ of a wheel.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from gatedsl.resources import bench_spec

# Sizes from issue 4's targets, and tiny ones for --quick (the tests, a smoke run).
FULL = {
    "rnn": dict(B=32, T=128, D=256, H=256),
    "gla": dict(B=1, T=2048, D=256, heads=4),       # key_dim = D: dk = dv = 64 per head
    "swiglu": dict(tokens=2048, D=1024, hidden=2816),
    "moe": dict(tokens=4096, D=256, experts=8, k=2, hidden=1024),
}
QUICK = {
    "rnn": dict(B=2, T=5, D=8, H=8),
    "gla": dict(B=2, T=9, D=16, heads=4),
    "swiglu": dict(tokens=8, D=16, hidden=40),
    "moe": dict(tokens=32, D=8, experts=8, k=2, hidden=16),
}

# Targets from issue 4 (ratio gatedsl / baseline at most this); compile: torch.compile's first
# call must take at least this many times gatedsl.compile.
TARGETS = {"torch": 1.05, "eager_cell": 0.7, "torch.compile": 1.1, "gla": 0.1, "swiglu": 0.95, "moe": 0.8}
COMPILE_SPEEDUP = 50.0


def opt_level_supported() -> bool:
    import gatedsl

    return "opt_level" in inspect.signature(gatedsl.compile).parameters


def default_opt_level() -> int | None:
    """Full optimisation (2) where gatedsl.compile takes an opt_level, else None (plain gatedsl.compile)."""
    return 2 if opt_level_supported() else None


def compile_spec(path: Path, params: dict[str, Any], opt_level: int | None):
    """gatedsl.compile at `opt_level` (None: without the argument); returns (module, seconds)."""
    import gatedsl

    kwargs = {} if opt_level is None else {"opt_level": opt_level}
    start = time.perf_counter()
    module = gatedsl.compile(path, params=params, **kwargs)
    return module, time.perf_counter() - start


@dataclass
class Built:
    """One case, ready to time: the gatedsl model, its eager baselines (same weights) and the inputs."""

    gatedsl: Any
    baselines: dict[str, Any]           # label -> module computing what `gatedsl` computes
    inputs: tuple
    target: dict[str, float]            # baseline label -> target ratio
    compile_s: float                    # gatedsl.compile's wall time
    torch_compile: str | None = None    # label of the eager baseline to also time under torch.compile
    eval_mode: bool = False
    sizes: dict[str, int] = field(default_factory=dict)


def _standard(kind: str, sizes: dict, seed: int, opt_level: int | None) -> Built:
    import torch

    import gatedsl

    torch.manual_seed(seed)
    B, T, D, H = sizes["B"], sizes["T"], sizes["D"], sizes["H"]
    ref = getattr(torch.nn, kind)(D, H, batch_first=True)
    model, secs = compile_spec(bench_spec(f"specs/{kind.lower()}.gate"), dict(input_size=D, hidden=H), opt_level)
    gatedsl.load_torch_rnn(model, ref)
    label = f"torch.nn.{kind}"
    return Built(model, {label: ref}, (torch.randn(B, T, D),), {label: TARGETS["torch"]}, secs, sizes=sizes)


def _cell(spec: str, baseline: str, extra: dict) -> Callable[[dict, int, int | None], Built]:
    def build(sizes: dict, seed: int, opt_level: int | None) -> Built:
        import torch

        from gatedsl.bench import baselines  # torch is imported only when a case is built

        torch.manual_seed(seed)
        B, T, D, H = sizes["B"], sizes["T"], sizes["D"], sizes["H"]
        model, secs = compile_spec(bench_spec(f"benchmarks/specs/{spec}"), dict(d=D, hidden=H, **extra), opt_level)
        eager = getattr(baselines, baseline)(D, H, **extra)
        eager.load_gatedsl(model.state_dict())
        return Built(model, {"eager": eager}, (torch.randn(B, T, D),),
                     {"eager": TARGETS["eager_cell"], "torch.compile": TARGETS["torch.compile"]}, secs,
                     torch_compile="eager", sizes=sizes)

    return build


def _gla(sizes: dict, seed: int, opt_level: int | None) -> Built:
    import torch

    from gatedsl.bench import baselines  # torch is imported only when a case is built

    torch.manual_seed(seed)
    D, heads = sizes["D"], sizes["heads"]
    model, secs = compile_spec(bench_spec("benchmarks/specs/gla.gate"), dict(d=D, heads=heads), opt_level)
    eager = baselines.EagerGLA(D, heads, key_dim=D)
    eager.load_gatedsl(model.state_dict())
    return Built(model, {"eager step loop": eager}, (torch.randn(sizes["B"], sizes["T"], D),),
                 {"eager step loop": TARGETS["gla"]}, secs, sizes=sizes)


def _swiglu(sizes: dict, seed: int, opt_level: int | None) -> Built:
    import torch

    from gatedsl.bench import baselines  # torch is imported only when a case is built

    torch.manual_seed(seed)
    D, hidden = sizes["D"], sizes["hidden"]
    model, secs = compile_spec(bench_spec("specs/swiglu.gate"), dict(d=D, hidden=hidden), opt_level)
    eager = baselines.EagerSwiGLU(D, hidden)
    eager.load_gatedsl(model.state_dict())
    # 2048 tokens as [1, 2048, d]: the spec takes [B, T, d].
    return Built(model, {"eager": eager}, (torch.randn(1, sizes["tokens"], D),), {"eager": TARGETS["swiglu"]}, secs,
                 sizes=sizes)


def _moe(sizes: dict, seed: int, opt_level: int | None) -> Built:
    import torch

    from gatedsl.bench import baselines  # torch is imported only when a case is built

    torch.manual_seed(seed)
    D, E, k, hidden = sizes["D"], sizes["experts"], sizes["k"], sizes["hidden"]
    model, secs = compile_spec(bench_spec("benchmarks/specs/moe.gate"), dict(d=D, experts=E, k=k, hidden=hidden),
                               opt_level)
    with torch.no_grad():  # the router starts at zeros (Shazeer et al.): give it random weights to route by
        model.get_parameter("NoisyTopKMoE.clean.x_proj.weight").normal_(0.0, D ** -0.5)
    eager = baselines.EagerTopKMoE(D, E, k, hidden)
    eager.load_gatedsl(model.state_dict())
    label = "eager loop over experts"
    return Built(model, {label: eager}, (torch.randn(sizes["tokens"], D),), {label: TARGETS["moe"]}, secs,
                 eval_mode=True, sizes=sizes)


CASES: dict[str, tuple[str, Callable[[dict, int, int | None], Built]]] = {
    "gru": ("rnn", lambda s, seed, o: _standard("GRU", s, seed, o)),
    "lstm": ("rnn", lambda s, seed, o: _standard("LSTM", s, seed, o)),
    "mgu": ("rnn", _cell("mgu.gate", "EagerMGU", {})),
    "rhn2": ("rnn", _cell("rhn.gate", "EagerRHN", {"depth": 2})),
    "gru_extra_gate": ("rnn", _cell("gru_extra_gate.gate", "EagerGatedGRU", {})),
    "gla": ("gla", _gla),
    "swiglu": ("swiglu", _swiglu),
    "moe_top2_of_8": ("moe", _moe),
}
VARIANTS = ("fwd", "fwd+bwd")


def build_case(name: str, quick: bool = False, seed: int = 0, opt_level: int | None = None) -> Built:
    """Case `name` at full or --quick sizes, compiled at `opt_level` (None: default_opt_level())."""
    size_key, build = CASES[name]
    sizes = (QUICK if quick else FULL)[size_key]
    built = build(sizes, seed, default_opt_level() if opt_level is None else opt_level)
    if built.eval_mode:
        built.gatedsl.eval()
        for module in built.baselines.values():
            module.eval()
    return built


def first(out):
    """The first output: torch.nn.GRU/LSTM and multi-output specs return tuples."""
    return out[0] if isinstance(out, (tuple, list)) else out


def runner(module, inputs: tuple, variant: str) -> Callable[[], None]:
    """One timed call: the forward under no_grad ("fwd"), or forward and backward of the first output's sum."""
    import torch

    params = [p for p in module.parameters()]

    if variant == "fwd":
        def run() -> None:
            with torch.no_grad():
                module(*inputs)
    else:
        def run() -> None:
            for p in params:
                p.grad = None
            first(module(*inputs)).sum().backward()
    return run


def time_interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of each function: `warmup` untimed calls each, then `repeats` rounds that call every
    function once, the order rotated by one each round; `clock` wall time, or e.g. time.process_time for CPU time."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return {n: statistics.median(ts) for n, ts in times.items()}


def run_case(name: str, repeats: int, quick: bool = False, compile_backend: str = "inductor",
             opt_level: int | None = None, log: Callable[[str], None] = print) -> list[dict]:
    """Time one case, forward and forward+backward; one row per (variant, baseline)."""
    import torch

    built = build_case(name, quick, opt_level=opt_level)
    rows = []
    for variant in VARIANTS:
        fns = {"gatedsl": runner(built.gatedsl, built.inputs, variant)}
        for label, module in built.baselines.items():
            fns[label] = runner(module, built.inputs, variant)
        compile_first_s = None
        if built.torch_compile:
            torch._dynamo.reset()
            compiled = torch.compile(copy.deepcopy(built.baselines[built.torch_compile]), backend=compile_backend)
            fns["torch.compile"] = runner(compiled, built.inputs, variant)
            # The first call compiles; inductor's on-disk caches are off so that it is a cold compile
            # every run (a warm cache would serve an earlier run's kernels).
            import torch._inductor.config as inductor_config

            with inductor_config.patch(force_disable_caches=True), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*force_disable_caches")
                start = time.perf_counter()
                fns["torch.compile"]()
                compile_first_s = time.perf_counter() - start
        medians = time_interleaved(fns, repeats)
        for label in fns:
            if label == "gatedsl":
                continue
            target = built.target[label]
            ratio = medians["gatedsl"] / medians[label]
            row = {"name": f"{name}/{variant}", "gatedsl_s": medians["gatedsl"], "baseline": label,
                   "baseline_s": medians[label], "ratio": ratio, "target": target, "met": ratio <= target}
            if label == "torch.compile":
                row["baseline"] = f"torch.compile({built.torch_compile}, backend={compile_backend})"
                row["gatedsl_compile_s"] = built.compile_s
                row["baseline_compile_s"] = compile_first_s
                row["compile_speedup"] = compile_first_s / built.compile_s
                row["met"] = ratio <= target and row["compile_speedup"] >= COMPILE_SPEEDUP
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(row: dict) -> str:
    text = (f"{row['name']:24} {row['baseline']:40} {row['gatedsl_s']:9.4f} {row['baseline_s']:9.4f} "
            f"{row['ratio']:7.3f} {'<= ' + str(row['target']):>8}  {'met' if row['met'] else 'MISSED'}")
    if "compile_speedup" in row:
        text += (f"  (compile: gatedsl {row['gatedsl_compile_s']:.3f} s, torch.compile first call "
                 f"{row['baseline_compile_s']:.2f} s, {row['compile_speedup']:.0f}x, target >= {COMPILE_SPEEDUP:.0f}x)")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="OUT", help="write the rows as a JSON list of "
                                                 "{name, gatedsl_s, baseline, baseline_s, ratio, ...}")
    p.add_argument("--case", action="append", default=[], metavar="NAME", choices=list(CASES),
                   help=f"run only this case (repeatable): {', '.join(CASES)}")
    p.add_argument("--repeats", type=int, default=7, metavar="N", help="timed repetitions per implementation")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and torch.compile's eager backend: checks the harness, not the speed")
    p.add_argument("--opt-level", type=int, default=None, metavar="N",
                   help="gatedsl.compile's opt_level (default: the highest, 2, where compile takes one)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch threads (default: torch's)")


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict]:
    import torch

    if args.repeats < 1:
        raise ValueError("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = "eager" if args.quick else "inductor"
    opt_level = default_opt_level() if args.opt_level is None else args.opt_level
    if opt_level is not None and not opt_level_supported():
        raise ValueError("this gatedsl.compile takes no opt_level: leave out --opt-level")
    how = f"gatedsl.compile(..., opt_level={opt_level})" if opt_level is not None else \
        "gatedsl.compile (it has no opt_level yet)"
    log(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads; {how}; "
        f"{'quick sizes' if args.quick else 'full sizes'}, median of {args.repeats}; {_load()}")
    log(f"{'case':24} {'baseline':40} {'gatedsl s':>9} {'base s':>9} {'ratio':>7} {'target':>8}  verdict")
    rows = []
    for name in args.case or list(CASES):
        rows += run_case(name, args.repeats, quick=args.quick, compile_backend=backend, opt_level=opt_level, log=log)
    log(f"at the end: {_load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _load() -> str:
    """The load average: timings are only comparable on an otherwise idle machine, and this says whether it was."""
    try:
        one, five, _ = os.getloadavg()
    except OSError:  # not every platform has one
        return "load average unknown"
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
