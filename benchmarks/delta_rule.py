"""The gated delta rule chunked (-O2, passes/chunk_delta_rule.py) against its step-by-step loop (-O0): std GatedDeltaNet.

Run:  python benchmarks/delta_rule.py [--B 2] [--T 2048] [--heads 4] [--head-size 64] [--repeats 5] [--threads 2]
                                      [--json OUT]

One process: the block compiled at -O2 (its scan a delta_rule_scan, chunked at this length) and at
-O0 (the cell stepped T times), the same weights; forward (no_grad) and forward+backward, called
in turn (the order rotated each round) after a warm-up; medians and the ratio -O2 / -O0. `--json`
writes gatedsl bench's rows: {name, gatedsl_s, baseline, baseline_s, ratio}.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import gatedsl
from gatedsl.bench import runner, time_interleaved

SPEC = """
import std.linear_rnn
model M(d: int = 256, heads: int = 4) {
  input x: [B, T, d]
  output y = GatedDeltaNet(x, heads=heads, head_dim=d // heads, v_head_dim=d // heads)
}
"""


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    params = {"d": args.heads * args.head_size, "heads": args.heads}
    torch.manual_seed(0)
    chunked = gatedsl.compile(SPEC, params, opt_level=2)
    loop = gatedsl.compile(SPEC, params, opt_level=0)
    loop.load_state_dict(chunked.state_dict())
    (choice,) = [c for c in chunked.meta["gatedsl_report"].kernels if c["op"] == "delta_rule_scan"]
    x = torch.randn(args.B, args.T, params["d"])
    with torch.no_grad():
        gap = (chunked(x) - loop(x)).abs().max().item()
    print(f"GatedDeltaNet B={args.B} T={args.T} heads={args.heads}x{args.head_size}, float32, "
          f"{args.threads} threads on {platform.processor() or platform.machine()}; "
          f"-O2 runs {choice['node']} as delta_rule_scan ({choice['kernel']} for T symbolic; per call at T={args.T}); "
          f"max |-O2 - -O0| = {gap:.2e}")
    rows = []
    for variant in ("fwd", "fwd+bwd"):
        fns = {"-O2": runner(chunked, (x,), variant), "-O0": runner(loop, (x,), variant)}
        times = time_interleaved(fns, repeats=args.repeats)
        ratio = times["-O2"] / times["-O0"]
        name = f"gated_delta_net T={args.T} {variant}"
        rows.append({"name": name, "gatedsl_s": times["-O2"], "baseline": "-O0 step loop",
                     "baseline_s": times["-O0"], "ratio": ratio})
        print(f"{name:34s} -O2 {times['-O2'] * 1e3:9.1f} ms   -O0 step loop {times['-O0'] * 1e3:9.1f} ms   "
              f"ratio {ratio:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
