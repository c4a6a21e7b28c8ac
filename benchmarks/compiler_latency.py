"""Compiler latency on a 48-layer gated transformer: `check` (no weights) and `compile` (to a GraphModule).

Run:  python benchmarks/compiler_latency.py [--repeats 7] [--json OUT]

Reports medians over repeated runs in one process (after one warm-up that builds the
parser), plus the wall time of the `gatedsl check` command as a fresh process, which
includes Python start-up and imports. Targets from the issue: check within 0.2 s,
compile within 1 s.
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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
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
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
