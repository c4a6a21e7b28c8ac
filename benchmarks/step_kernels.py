"""Per-token time of the kernels a decoder's one-token calls (T = 1) can run: one_step (the registry's choice there)
against the chunked form and the step loop, for GLA's linear_scan and the gated delta rule.

Run:  python benchmarks/step_kernels.py [--tokens 64] [--repeats 15] [--threads 1] [--json OUT]

One process. Each shape's op gets its inputs in the layout the std blocks hand it (GLA: a decay per key
dim as its log, kᵀ v read out as q S; Gated DeltaNet: log α and β), float32, under no_grad. A timed call
decodes `--tokens` tokens, one kernel call per token with the state carried from call to call, as a
decoder runs it; the kernels are called in turn (the order rotated each round) after a warm-up; medians
per token, and the ratios one_step / chunked and one_step / step loop. `--json` writes gatedsl bench's
rows: {name, gatedsl_s, baseline, baseline_s, ratio}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from gatedsl.bench import runner, time_interleaved
from gatedsl.ir.graph import Graph
from gatedsl.ir.ops import DeltaRuleScanAttrs, LinearScanAttrs
from gatedsl.kernels import registry

# (name, op, batch, heads, key dim, value dim per head)
SHAPES = [
    ("GLA", "linear_scan", 1, 4, 64, 128),
    ("GLA", "linear_scan", 8, 4, 64, 128),
    ("gated delta rule", "delta_rule_scan", 1, 4, 64, 64),
    ("gated delta rule", "delta_rule_scan", 8, 16, 128, 128),
]
KERNELS = {"linear_scan": ("one_step", "chunked", "step"), "delta_rule_scan": ("one_step", "chunked", "loop")}
LOOP = {"linear_scan": "step", "delta_rule_scan": "loop"}


def op_call(op: str, B: int, H: int, K: int, V: int, tokens: int):
    """The op's config, each token's per-step inputs, and the initial state."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    if op == "linear_scan":
        config = LinearScanAttrs(cell="GLAStep", path="GLA.GLAStep", body=Graph("GLAStep"), log_decay=True,
                                 drive="outer", readout="einsum", equation="...kv,...k->...v", key_readout=True)
        per_token = [[torch.nn.functional.logsigmoid(randn(1, B, H, K, 1)) / 16, randn(1, B, H, K),
                      randn(1, B, H, V), randn(1, B, H, K) * K ** -0.5] for _ in range(tokens)]
        return config, per_token, randn(B, H, K, V)
    config = DeltaRuleScanAttrs(cell="GatedDeltaStep", path="GatedDeltaNet.GatedDeltaStep",
                                body=Graph("GatedDeltaStep"), gate="log", beta=True)
    per_token = [[randn(B, H, 1, K) * K ** -0.5, torch.nn.functional.normalize(randn(B, H, 1, K), dim=-1),
                  randn(B, H, 1, V), -torch.rand(B, H, 1, generator=gen), torch.rand(B, H, 1, generator=gen)]
                 for _ in range(tokens)]
    return config, per_token, randn(B, H, V, K)


class Decode(torch.nn.Module):
    """One kernel decoding tokens: a call per token, the state carried from call to call."""

    def __init__(self, kernel, config):
        super().__init__()
        self.kernel, self.config = kernel, config

    def forward(self, state, *per_token):
        for inputs in per_token:
            _, state = self.kernel(self.config, *inputs, state)
        return state


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"float32, no_grad, {args.tokens} tokens a timed call, {args.threads} thread(s) on "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}")
    rows = []
    for name, op, B, H, K, V in SHAPES:
        config, per_token, state = op_call(op, B, H, K, V, args.tokens)
        fused = registry.fused_ops()[op]
        first = [*per_token[0], state]
        ctx = registry.runtime_context(first, fused.sizes(config, [tuple(t.shape) for t in first]))
        chosen = registry.choose(op, registry.Context(ctx.device, ctx.dtype, False, ctx.sizes)).kernel
        kernels = {k.name: registry.load(k) for k in registry.kernels_for(op) if k.name in KERNELS[op]}
        with torch.no_grad():  # every kernel decodes to the same state
            final = {n: Decode(fn, config)(state, *per_token) for n, fn in kernels.items()}
        gap = max((final[n] - final["one_step"]).abs().max().item() for n in kernels)
        fns = {n: runner(Decode(fn, config), (state, *per_token), "fwd") for n, fn in kernels.items()}
        times = {n: t / args.tokens for n, t in time_interleaved(fns, repeats=args.repeats).items()}
        label = f"{name} B={B} H={H} K={K} V={V}"
        print(f"{label:38s} registry at T=1: {chosen:9s} per token: " +
              "   ".join(f"{n} {times[n] * 1e6:8.1f} µs" for n in KERNELS[op]) +
              f"   one_step/chunked {times['one_step'] / times['chunked']:.3f}"
              f"   one_step/{LOOP[op]} {times['one_step'] / times[LOOP[op]]:.3f}   max |Δ state| {gap:.1e}")
        for baseline in ("chunked", LOOP[op]):
            rows.append({"name": f"{label} one token", "gatedsl_s": times["one_step"], "baseline": baseline,
                         "baseline_s": times[baseline], "ratio": times["one_step"] / times[baseline]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
