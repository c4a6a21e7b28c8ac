"""The zoo's models (specs/zoo/) at -O2 against -O0: the optimiser must never make a real architecture slower.

Run:  python benchmarks/zoo_opt_levels.py [--B 4] [--T 256] [--repeats 5] [--threads 2] [--json OUT]

One process: each model at its spec's small default sizes but for a wider hidden size (MODELS below, in its
config's names), compiled at -O2 and -O0 with the same weights; the forward (no_grad) and the forward+backward of
the logits' sum on random tokens, called in turn (the order rotated each round) after a warm-up; medians and the
ratio -O2 / -O0. `--json` writes gatedsl bench's rows: {name, gatedsl_s, baseline, baseline_s, ratio}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

import gatedsl
from gatedsl.bench import runner, time_interleaved

ZOO = Path(__file__).resolve().parents[1] / "specs" / "zoo"

VOCAB = 64
# A size per model that keeps each in the tens of milliseconds here, named as its config names it.
MODELS = {
    "mamba": {"hidden_size": 64},
    "gla": {"hidden_size": 64},
    "mixtral": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2},
    "qwen3_next": {"hidden_size": 64},
}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"B={args.B} T={args.T}, float32, {args.threads} threads on {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = []
    for name, params in MODELS.items():
        torch.manual_seed(0)
        params = {"vocab_size": VOCAB, **params}
        fast = gatedsl.compile(ZOO / f"{name}.gate", params, opt_level=2)
        plain = gatedsl.compile(ZOO / f"{name}.gate", params, opt_level=0)
        plain.load_state_dict(fast.state_dict())
        ids = torch.randint(0, VOCAB, (args.B, args.T), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            gap = (fast(ids) - plain(ids)).abs().max().item()
        for variant in ("fwd", "fwd+bwd"):
            fns = {"-O2": runner(fast, (ids,), variant), "-O0": runner(plain, (ids,), variant)}
            times = time_interleaved(fns, repeats=args.repeats)
            ratio = times["-O2"] / times["-O0"]
            row = f"{name} {variant}"
            rows.append({"name": row, "gatedsl_s": times["-O2"], "baseline": "-O0", "baseline_s": times["-O0"],
                         "ratio": ratio})
            print(f"{row:22s} -O2 {times['-O2'] * 1e3:9.1f} ms   -O0 {times['-O0'] * 1e3:9.1f} ms   ratio {ratio:.3f}"
                  f"   (max |-O2 - -O0| {gap:.1e})")
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
