"""Incremental decoding (issue 12): time per token against position, decoding against a full forward per token, and memory.

Run:  python benchmarks/decoding.py [--tokens 1024] [--prompt 16] [--window 100] [--bucket 128]
                                    [--lengths 256,512,1024,2048] [--naive-stride 64] [--repeats 3] [--threads 1]
                                    [--clock wall|cpu] [--model NAME] [-p NAME=VALUE] [--quick] [--json OUT]

One process, float32, -O2, eval, torch.no_grad, batch 1, greedy (argmax), a random prompt of --prompt tokens; the
zoo's GLA and Mamba language models and the Qwen3-Next hybrid at MODELS' sizes, each decoded with gatedsl.Decoder
(prefill, then one step per token):

- Per token: --tokens new tokens (the first from the prefill, then a step each), each step timed with its argmax.
  The median of the first and of the last --window steps, and their ratio, in that run and again interleaved: a
  second run keeps the states before those steps, and --repeats rounds step from each in turn, with the model's
  own forward on one token (what a step would cost if decoding added nothing to the forward), the order rotated
  each time, so that drift in the machine's speed falls on all alike. A table of medians by --bucket steps. For
  models with a KV cache, the attention op's share of each step (decode_runtime.attention, timed by a wrapper the
  decoder calls).
- Against the naive way, where each new token re-runs model(x) on the whole sequence so far: the naive total is
  the sum over every length L = prompt .. prompt + tokens - 1 of one forward's time f(L). f is measured (the median
  of --repeats interleaved rounds of gatedsl.bench.runner) at every --naive-stride-th length and the last one, and
  linearly interpolated in between (--naive-stride 1 measures every length). The decoding total is the measured
  prefill plus the tokens - 1 steps. At each measured length the forward's last logits are compared with the
  decoder's at that position (max |difference|, printed).
- Memory, at each of --lengths new tokens, in a separate run (nothing kept but the current state): the state's
  bytes (every tensor of every DecodeState entry: exact), and the peak resident memory of the process while
  decoding up to there above its resident memory just before the first step (Linux: /proc/self/status's VmHWM,
  its peak reset by writing 5 to /proc/self/clear_refs after the prefill and glibc's malloc_trim; page-granular).

Times are wall time (time.perf_counter), or with --clock cpu the process's CPU time (time.process_time): on a machine
other jobs share, a single-threaded run's CPU time leaves out the time it waited for a core.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import ctypes
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
from array import array
from pathlib import Path
from unittest import mock

import torch

import gatedsl
from gatedsl.backend import decode_runtime
from gatedsl.bench import runner, time_interleaved

ZOO = Path(__file__).resolve().parents[1] / "specs" / "zoo"

# Small but real: hidden 256, 4 layers, a 4,096-token vocabulary (so that the head, the same per token whatever the
# position, does not hide the mixers); each in its config's names. Qwen3-Next's 4 layers are one turn of its
# schedule: three gated delta nets, then gated attention (4 query heads, 2 key/value heads of 64).
MODELS = {
    "gla": {"vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4, "num_heads": 4},
    "mamba": {"vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4},
    "qwen3_next": {"vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "linear_num_key_heads": 2,
                   "linear_num_value_heads": 4, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
                   "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256,
                   "shared_expert_intermediate_size": 256},
}
QUICK_MODELS = {name: {"vocab_size": 64} for name in MODELS}  # the specs' tiny defaults
NAIVE = ("gla", "mamba")  # the models the issue compares against re-running the full forward
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
QUICK = dict(tokens=16, prompt=4, window=3, bucket=8, lengths="4,8,16", naive_stride=8, repeats=1)


class Stopwatch:
    """Wraps a function and adds up the seconds spent in it, read from `clock`."""

    def __init__(self, fn, clock):
        self.seconds = 0.0

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += clock() - start

        self.fn = timed


def build(name: str, params: dict, clock=time.perf_counter) -> tuple[torch.nn.Module, gatedsl.Decoder, Stopwatch]:
    """The model at -O2 in eval mode, its decoder, and the stopwatch on the decoder's attention op."""
    torch.manual_seed(0)
    model = gatedsl.compile(ZOO / f"{name}.gate", params, opt_level=2).eval()
    attention = Stopwatch(decode_runtime.attention, clock)
    with mock.patch.object(decode_runtime, "attention", attention.fn):  # the decoder's graph calls the wrapper
        decoder = gatedsl.Decoder(model)
    return model, decoder, attention


def state_bytes(state: gatedsl.DecodeState) -> int:
    """Every tensor the state carries, in bytes (the positions too)."""
    tensors = [state.position] + [t for e in state.entries.values() for t in e.tensors]
    return sum(t.numel() * t.element_size() for t in tensors)


def naive_total(lengths: range, measured: dict[int, float]) -> float:
    """Sum over `lengths` of f(L), f known at `measured`'s lengths and linearly interpolated between them."""
    xs = sorted(measured)
    total = 0.0
    for length in lengths:
        i = bisect.bisect_left(xs, length)
        if xs[i] == length:
            total += measured[length]
        else:
            a, b = xs[i - 1], xs[i]
            total += measured[a] + (measured[b] - measured[a]) * (length - a) / (b - a)
    return total


def naive_lengths(first: int, last: int, stride: int) -> list[int]:
    return sorted(set(range(first, last + 1, stride)) | {last})


def decode_timed(decoder, prompt: torch.Tensor, tokens: int, attention: Stopwatch, keep: set[int],
                 logits_at: set[int], clock=time.perf_counter) -> dict:
    """Greedy decoding of `tokens` new tokens after `prompt`, each step timed; returns the run's record."""
    step_s, attention_s = array("d", [0.0]) * tokens, array("d", [0.0]) * tokens
    seq = torch.empty(1, prompt.shape[1] + tokens, dtype=torch.long)
    seq[:, :prompt.shape[1]] = prompt
    kept, logits = {}, {}
    start = clock()
    out, state = decoder.prefill(prompt)
    tok = out[:, -1:].argmax(-1)
    prefill_s = clock() - start
    logits[0] = out[0, -1].clone()
    for j in range(1, tokens):
        seq[:, prompt.shape[1] + j - 1] = tok[:, 0]
        if j in keep:
            kept[j] = (tok, state)
        before = attention.seconds
        start = clock()
        out, state = decoder.step(tok, state=state)
        tok = out[:, -1:].argmax(-1)
        step_s[j] = clock() - start
        attention_s[j] = attention.seconds - before
        if j in logits_at:
            logits[j] = out[0, -1].clone()
    seq[:, -1] = tok[:, 0]
    return {"prefill_s": prefill_s, "step_s": step_s, "attention_s": attention_s, "seq": seq, "kept": kept,
            "logits": logits}


def retime(decoder, model, kept: dict, first: list[int], last: list[int], repeats: int,
           clock=time.perf_counter) -> dict[str, float]:
    """Median seconds of a step from the kept states before the `first` and the `last` steps, and of the model's
    forward on one token, called in turn (the order rotated by one each time)."""
    times = {"first": [], "last": [], "forward": []}
    names = list(times)
    for rep in range(repeats):
        for i, (a, b) in enumerate(zip(first, last)):
            shift = (rep * len(first) + i) % len(names)
            for group in names[shift:] + names[:shift]:
                tok, state = kept[b if group == "last" else a]
                start = clock()
                out = model(tok) if group == "forward" else decoder.step(tok, state=state)[0]
                out[:, -1:].argmax(-1)
                times[group].append(clock() - start)
    return {group: statistics.median(ts) for group, ts in times.items()}


def peak_rss_reset() -> int | None:
    """Reset the process's peak resident memory to its current one; returns that (bytes), None where unsupported.

    glibc's malloc first returns the free memory it holds to the system (malloc_trim): memory freed earlier but still
    resident would otherwise absorb growth without raising the peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then miss growth into memory malloc holds
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status("VmRSS")


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decode_memory(decoder, prompt: torch.Tensor, lengths: list[int]) -> list[dict]:
    """State bytes and peak resident memory above the start, after each of `lengths` new tokens (one run)."""
    out, state = decoder.prefill(prompt)
    tok = out[:, -1:].argmax(-1)
    gc.collect()
    base = peak_rss_reset()
    rows, checkpoints = [], set(lengths)
    for j in range(1, max(lengths) + 1):
        out, state = decoder.step(tok, state=state)
        tok = out[:, -1:].argmax(-1)
        if j in checkpoints:
            peak = _status("VmHWM")
            rows.append({"tokens": j, "state_bytes": state_bytes(state),
                         "peak_rss_above_start": None if base is None or peak is None else peak - base})
    return rows


def median_ms(xs) -> float:
    return statistics.median(xs) * 1e3


def run_model(name: str, params: dict, args, log) -> dict:
    clock = CLOCKS[args.clock]
    model, decoder, attention = build(name, params, clock)
    n, w, prompt_len = args.tokens, args.window, args.prompt
    prompt = torch.randint(0, params["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(1))
    first, last = list(range(1, w + 1)), list(range(n - w, n))
    with torch.no_grad():
        decode_timed(decoder, prompt, min(n, 32), attention, set(), set())  # warm-up
        lengths = naive_lengths(prompt_len, prompt_len + n - 1, args.naive_stride) if name in NAIVE else []
        rec = decode_timed(decoder, prompt, n, attention, set(), {L - prompt_len for L in lengths}, clock)
        steps, att = rec["step_s"], rec["attention_s"]
        result = {"model": name, "params": params, "tokens": n, "prompt": prompt_len,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "prefill_s": rec["prefill_s"], "decode_s": rec["prefill_s"] + sum(steps[1:]),
                  "first_ms": median_ms(steps[1:w + 1]), "last_ms": median_ms(steps[n - w:])}
        result["ratio"] = result["last_ms"] / result["first_ms"]
        # The same tokens again, keeping the states for the interleaved rounds: kept in the timed run, they would
        # make its steps allocate fresh memory where they otherwise reuse what the previous state freed.
        kept = decode_timed(decoder, prompt, n, attention, set(first + last), set())["kept"]
        again = retime(decoder, model, kept, first, last, args.repeats, clock)
        result["first_ms_interleaved"], result["last_ms_interleaved"] = again["first"] * 1e3, again["last"] * 1e3
        result["forward_one_token_ms"] = again["forward"] * 1e3
        result["ratio_interleaved"] = result["last_ms_interleaved"] / result["first_ms_interleaved"]
        del kept
        result["buckets"] = [{"steps": f"{a}-{min(a + args.bucket, n) - 1}", "ms": median_ms(steps[a:a + args.bucket]),
                              "attention_ms": median_ms(att[a:a + args.bucket])}
                             for a in range(1, n, args.bucket)]
        if any(c.kind == "kv_cache" for c in decoder.plan.carried.values()):
            result["windows"] = [{"steps": f"{a}-{a + w - 1}", "ms": median_ms(steps[a:a + w]),
                                  "attention_ms": median_ms(att[a:a + w]),
                                  "attention_share": sum(att[a:a + w]) / sum(steps[a:a + w])}
                                 for a in (1, n // 2, n - w)]
        if lengths:
            seq = rec["seq"]
            fns = {L: runner(model, (seq[:, :L],), "fwd") for L in lengths}
            measured = time_interleaved(fns, repeats=args.repeats, clock=clock)
            gap = max((model(seq[:, :L])[0, -1] - rec["logits"][L - prompt_len]).abs().max().item() for L in lengths)
            result["naive"] = {"measured_s": {str(L): s for L, s in measured.items()},
                               "total_s": naive_total(range(prompt_len, prompt_len + n), measured),
                               "max_logit_gap": gap}
            result["speedup"] = result["naive"]["total_s"] / result["decode_s"]
        del rec
        gc.collect()
        result["memory"] = decode_memory(decoder, prompt, args.lengths)
    report(result, args, log)
    return result


def report(r: dict, args, log) -> None:
    log(f"\n== {r['model']} ({r['parameters']:,} parameters; {', '.join(f'{k}={v}' for k, v in r['params'].items())})")
    log(f"prefill of {r['prompt']} tokens {r['prefill_s'] * 1e3:.1f} ms; per token, steps 1-{args.window}: "
        f"{r['first_ms']:.2f} ms, steps {r['tokens'] - args.window}-{r['tokens'] - 1}: {r['last_ms']:.2f} ms, "
        f"ratio {r['ratio']:.3f} (in the run); interleaved from the kept states: {r['first_ms_interleaved']:.2f} / "
        f"{r['last_ms_interleaved']:.2f} ms, ratio {r['ratio_interleaved']:.3f}; the model's forward on one token "
        f"{r['forward_one_token_ms']:.2f} ms")
    log("steps      median ms" + ("   attention op ms" if "windows" in r else ""))
    for b in r["buckets"]:
        log(f"{b['steps']:>10} {b['ms']:9.3f}" + (f" {b['attention_ms']:17.3f}" if "windows" in r else ""))
    for wdw in r.get("windows", []):
        log(f"steps {wdw['steps']:>10}: {wdw['ms']:.3f} ms per token, attention op {wdw['attention_ms']:.3f} ms "
            f"({wdw['attention_share']:.1%})")
    if "naive" in r:
        nv = r["naive"]
        pts = ", ".join(f"f({L})={s * 1e3:.1f}" for L, s in list(nv["measured_s"].items())[::4])
        log(f"decoding {r['tokens']} tokens: {r['decode_s']:.2f} s; full forward per token: {nv['total_s']:.1f} s "
            f"({len(nv['measured_s'])} lengths measured, every {args.naive_stride}th, interpolated: {pts} ms ...); "
            f"speedup {r['speedup']:.1f}x (max |logits gap| {nv['max_logit_gap']:.1e})")
    log("tokens  state bytes  peak RSS above start")
    for m in r["memory"]:
        peak = "n/a" if m["peak_rss_above_start"] is None else f"{m['peak_rss_above_start'] / 2 ** 20:.2f} MiB"
        log(f"{m['tokens']:6d} {m['state_bytes']:12,d} {peak:>21}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--window", type=int, default=100, help="steps at each end compared")
    p.add_argument("--bucket", type=int, default=128, help="steps per row of the table")
    p.add_argument("--lengths", default="256,512,1024,2048", help="new tokens at which memory is read")
    p.add_argument("--naive-stride", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time, or the process's CPU time (for a busy machine, with --threads 1)")
    p.add_argument("--model", action="append", choices=list(MODELS), help="only this model (repeatable)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="set a parameter of every model run, by its config's name (e.g. -p hidden_size=512)")
    p.add_argument("--quick", action="store_true", help="the specs' tiny sizes and a few tokens: a smoke run")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.lengths = sorted(int(x) for x in str(args.lengths).split(","))
    if args.tokens < 2 * args.window + 1:
        p.error(f"--tokens must be at least 2 * --window + 1 (got {args.tokens} and {args.window})")
    if min(args.lengths) < 1 or args.naive_stride < 1 or args.repeats < 1 or args.bucket < 1 or args.prompt < 1:
        p.error("--lengths, --naive-stride, --repeats, --bucket and --prompt must be positive")
    overrides = {}
    for item in args.param:
        name, eq, value = item.partition("=")
        try:
            overrides[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            eq = ""
        if not eq or not name:
            p.error(f"-p takes NAME=VALUE with a Python literal value (a number, True, False), got {item!r}")
    torch.set_num_threads(args.threads)
    log = print
    log(f"{' '.join(['python', *sys.argv])}\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, {args.threads} torch threads, float32, -O2, "
        f"{args.clock} clock; "
        f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
    results = []
    for name in args.model or list(MODELS):
        try:
            results.append(run_model(name, {**(QUICK_MODELS if args.quick else MODELS)[name], **overrides}, args, log))
        except gatedsl.SpecError as e:  # a -p the spec does not take
            p.error(str(e))
    log(f"\nload average {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
