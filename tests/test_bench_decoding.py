"""benchmarks/decoding.py at --quick sizes: its record is complete and honest; no timing is asserted (BENCHMARKS.md's
business). Honest: the naive baseline's forwards give the decoder's logits at the lengths it times, the naive total
integrates what it measured, and the memory it reports is the state the decoder carries."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import gatedsl

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "decoding.py"


@pytest.fixture(scope="module")
def decoding():
    spec = importlib.util.spec_from_file_location("bench_decoding", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(decoding, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoding") / "decoding.json"
    results = decoding.main(["--quick", "--model", "gla", "--model", "qwen3_next", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    return {r["model"]: r for r in results}


def test_quick_run_times_every_step_and_both_ends(decoding, quick):
    q = decoding.QUICK
    for r in quick.values():
        assert r["tokens"] == q["tokens"] and r["prompt"] == q["prompt"]
        covered = [int(n) for b in r["buckets"] for n in b["steps"].split("-")]
        assert covered[0] == 1 and covered[-1] == q["tokens"] - 1     # steps 1..tokens-1: token 0 is the prefill's
        assert all(b["ms"] > 0 for b in r["buckets"])
        assert r["ratio"] == pytest.approx(r["last_ms"] / r["first_ms"])
        assert r["ratio_interleaved"] == pytest.approx(r["last_ms_interleaved"] / r["first_ms_interleaved"])
        assert r["decode_s"] > r["prefill_s"] > 0


def test_naive_forwards_give_the_decoders_logits(quick):
    # The timed forwards compute what the decoder computed (float32, tiny sizes: 1e-4 is float32's rounding over a
    # few layers); the lengths measured span the prompt to the last token, so interpolation never extrapolates.
    naive = quick["gla"]["naive"]
    assert naive["max_logit_gap"] < 1e-4
    lengths = sorted(int(L) for L in naive["measured_s"])
    assert lengths[0] == quick["gla"]["prompt"] and lengths[-1] == quick["gla"]["prompt"] + quick["gla"]["tokens"] - 1
    assert quick["gla"]["speedup"] == pytest.approx(naive["total_s"] / quick["gla"]["decode_s"])
    assert "naive" not in quick["qwen3_next"]


def test_naive_total_sums_the_interpolated_forward_times(decoding):
    linear = {0: 1.0, 10: 21.0}                                       # f(L) = 1 + 2L, known at both ends
    assert decoding.naive_total(range(0, 11), linear) == pytest.approx(sum(1 + 2 * L for L in range(11)))
    every = {L: float(L * L) for L in range(3, 9)}                    # measured at every length: no interpolation
    assert decoding.naive_total(range(3, 9), every) == pytest.approx(sum(L * L for L in range(3, 9)))
    assert decoding.naive_lengths(16, 100, 64) == [16, 80, 100]


def test_memory_constant_for_a_recurrence_and_growing_with_a_kv_cache(quick):
    recurrent = [m["state_bytes"] for m in quick["gla"]["memory"]]
    assert len(set(recurrent)) == 1 and recurrent[0] > 0
    hybrid = quick["qwen3_next"]["memory"]
    tokens = [m["tokens"] for m in hybrid]
    grown = [b["state_bytes"] - a["state_bytes"] for a, b in zip(hybrid, hybrid[1:])]
    per_token = grown[0] / (tokens[1] - tokens[0])
    assert per_token > 0 and all(g == per_token * (t1 - t0) for g, t0, t1 in zip(grown, tokens, tokens[1:]))


def test_attention_op_is_timed_only_where_there_is_a_cache(quick):
    assert "windows" not in quick["gla"]
    windows = quick["qwen3_next"]["windows"]
    assert len(windows) == 3 and all(0 < w["attention_share"] < 1 for w in windows)


def test_state_bytes_counts_every_carried_tensor(decoding):
    model = gatedsl.compile(decoding.ZOO / "gla.gate", {"vocab_size": 11}, opt_level=2)
    _, state = gatedsl.Decoder(model).prefill(torch.tensor([[1, 2, 3]]))
    expected = 8 + sum(t.numel() * t.element_size() for e in state.entries.values() for t in e.tensors)
    assert decoding.state_bytes(state) == expected == 8 + 2 * 4 * 4 * 8 * 4   # position; 2 layers, 4 heads, 4x8 float32


@pytest.mark.parametrize("argv, message", [
    (["--tokens", "10", "--window", "5"], "--tokens must be at least"),
    (["--quick", "-p", "hidden_size"], "-p takes NAME=VALUE"),
    (["--quick", "--model", "gla", "-p", "hiden_size=8"], "has no parameter 'hiden_size'"),
])
def test_bad_options_are_usage_errors(decoding, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        decoding.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err
