"""Compiler latency on a 48-layer gated transformer: `check` (no weights) and `compile` (to a GraphModule).

Run:  python benchmarks/compiler_latency.py [--repeats 7] [--reassignments 1000,5000,20000,40000] [--json OUT]

Reports medians over repeated runs in one process (after one warm-up that builds the
parser), plus the wall time of the `gatedsl check` command as a fresh process, which
includes Python start-up and imports. Targets from the issue: check within 0.2 s,
compile within 1 s.

Then how `check` grows with a spec's length: a model reassigning one name N times
(`h = h + 1`), timed once per N, with the time per statement, which stays about the same
when the growth is linear (naming each statement searched from the bare name before, and
took 5.3 s at N = 5,000 and 89 s at 20,000).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gatedsl

SPEC = Path(__file__).with_name("specs") / "deep48.gate"
TARGETS = {"check": 0.2, "compile": 1.0}


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reassignments(n: int) -> str:
    """A model that reassigns one name n times."""
    return "model M() {\n  input x: [B, 4]\n  h = x\n" + "  h = h + 1\n" * n + "  output y = h\n}\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--reassignments", default="1000,5000,20000,40000", metavar="N,N,...",
                        help="the spec lengths to time check at (empty: none)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)

    report = gatedsl.check(SPEC)  # warm-up: builds and caches the parser
    gatedsl.compile(SPEC)  # warm-up: imports torch
    rows = [
        {"name": "check (in process)", "seconds": _median_time(lambda: gatedsl.check(SPEC), args.repeats),
         "target_s": TARGETS["check"]},
        {"name": "compile (in process)", "seconds": _median_time(lambda: gatedsl.compile(SPEC), args.repeats),
         "target_s": TARGETS["compile"]},
        {"name": "gatedsl check (new process)",
         "seconds": _median_time(lambda: subprocess.run([sys.executable, "-m", "gatedsl", "check", str(SPEC)],
                                                         check=True, capture_output=True), max(3, args.repeats // 2)),
         "target_s": None},
    ]
    print(f"model {report.model}: 48 layers, {report.params:,} parameters, {len(report.gates)} gates")
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"torch {__import__('torch').__version__}")
    print(f"{'case':32} {'median s':>10} {'target s':>10}  verdict")
    for row in rows:
        target = row["target_s"]
        verdict = "" if target is None else ("met" if row["seconds"] <= target else "MISSED")
        print(f"{row['name']:32} {row['seconds']:10.3f} {target if target else '':>10}  {verdict}")
    lengths = [int(n) for n in args.reassignments.split(",") if n]
    if lengths:
        print(f"\n{'check, N reassignments':32} {'s':>10} {'µs / stmt':>10}")
    for n in lengths:
        seconds = _median_time(lambda: gatedsl.check(reassignments(n)), 1)
        rows.append({"name": f"check, {n} reassignments", "seconds": seconds, "target_s": None})
        print(f"{n:32,} {seconds:10.2f} {seconds / n * 1e6:10.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
