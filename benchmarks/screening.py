"""Static screening throughput: candidates of specs/forecaster.gate screened per second by gatedsl.Space.screen.

Run:  python benchmarks/screening.py [--candidates 1000] [--rounds 7] [--json OUT]

Samples distinct candidates from the forecaster's search space (seeded), then times, round after
round and interleaved, `Space.screen` (shapes, parameter count, FLOPs and every `require`, nothing
allocated; the spec is parsed once per Space and elaborated per candidate) over all of them and over
the valid ones only (a full elaboration each), each time by a new Space: a first screening, where
only the calls a candidate repeats (its layers) or shares with one screened before it in the round
are replayed from the Space's memo. Then the valid ones again by the Space that has just screened
them (every call replayed), and `gatedsl.check` of a few (parsing and the whole pipeline per
candidate, for contrast). Reports the median of the rounds' rates, per second of wall time and per
second of the process's CPU time. Target from the issue: at least 1,000 candidates per second, on
first screening.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import gatedsl
from gatedsl.search import Space

SPEC = Path(__file__).resolve().parent.parent / "specs" / "forecaster.gate"
TARGET = 1000  # candidates per second


def _distinct(space: Space, count: int) -> list[dict]:
    seen: dict[str, dict] = {}
    seed = 0
    while len(seen) < count:
        dna = space.sample(seed)
        seen.setdefault(space.hash(dna), dna)
        seed += 1
    return list(seen.values())


def _rates(fn, items: list) -> tuple[float, float]:
    """Items per second of wall time, and per second of this process's CPU time (what other work on a
    shared machine does not inflate as much)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for item in items:
        fn(item)
    return len(items) / (time.perf_counter() - wall), len(items) / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)

    space = Space(SPEC)
    candidates = _distinct(space, args.candidates)
    verdicts = [space.screen(dna) for dna in candidates]  # warm-up, and which are valid
    valid = [dna for dna, v in zip(candidates, verdicts) if v.ok]
    few = valid[: max(10, len(valid) // 20)]
    screened = Space(SPEC)  # screens the valid candidates once per round before the "again" case
    cases = {  # name -> (the function to time, made before the clock starts; the candidates)
        "Space.screen, sampled candidates": (lambda: Space(SPEC).screen, candidates),
        "Space.screen, valid candidates only": (lambda: Space(SPEC).screen, valid),
        "Space.screen, valid candidates, screened again": (lambda: screened.screen, valid),
        "gatedsl.check per candidate (parses each)": (
            lambda: lambda dna: gatedsl.check(SPEC, params=space.params(dna)), few),
    }
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    order = random.Random(0)
    for _ in range(args.rounds):
        for name, (make, items) in cases.items():  # interleaved: a busy spell hits every case alike
            items = list(items)
            order.shuffle(items)
            rates[name].append(_rates(make(), items))
            if name == "Space.screen, valid candidates only":
                for dna in items:  # what the next case screens again
                    screened.screen(dna)
    rows = [{"name": name, "candidates": len(items),
             "per_second": statistics.median(wall for wall, _ in rates[name]),
             "per_cpu_second": statistics.median(cpu for _, cpu in rates[name]),
             "target_per_second": TARGET if name.startswith("Space.screen") and "again" not in name else None}
            for name, (_, items) in cases.items()]

    rejected = len(candidates) - len(valid)
    print(f"space: {SPEC.name}, {len(space.dimensions)} dimensions, {space.size:,} candidates; "
          f"{len(candidates)} sampled (seeded), {rejected} rejected statically "
          f"({', '.join(sorted({v.reason for v in verdicts if not v.ok}))})")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'case':48} {'candidates':>10} {'median /s':>10} {'/ CPU s':>10} {'target /s':>10}  verdict")
    for row in rows:
        target = row["target_per_second"]
        verdict = "" if target is None else ("met" if row["per_second"] >= target else "MISSED")
        print(f"{row['name']:48} {row['candidates']:10} {row['per_second']:10.0f} {row['per_cpu_second']:10.0f} "
              f"{target or '':>10}  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
