"""`gatedsl bench`: the harness at --quick sizes, and the baselines computing exactly what gatedsl computes.

No timing is asserted here: the numbers are BENCHMARKS.md's business. What is asserted is that
the comparison is honest (each baseline equals the compiled spec on the same weights, in
float64, outputs and input gradients) and that the harness and the CLI produce the documented
JSON: a list of {name, gatedsl_s, baseline, baseline_s, ratio}, ratio = gatedsl_s / baseline_s.
"""

from __future__ import annotations

import json

import pytest
import torch

from gatedsl import bench
from gatedsl.cli.main import main as cli

OPT_LEVELS = [0, bench.default_opt_level()] if bench.opt_level_supported() else [None]


def _outputs(out) -> list[torch.Tensor]:
    """Every output tensor, flat: torch.nn.LSTM returns (y, (h_n, c_n)), the spec y, h_n, c_n."""
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _outputs(item)]
    return [out]


@pytest.mark.parametrize("opt_level", OPT_LEVELS)
@pytest.mark.parametrize("case", list(bench.CASES))
def test_baselines_equal_the_compiled_spec(case, opt_level):
    built = bench.build_case(case, quick=True, seed=1, opt_level=opt_level)
    model = built.gatedsl.double()
    x = built.inputs[0].double().requires_grad_()
    expected = _outputs(model(x))
    (grad_expected,) = torch.autograd.grad(expected[0].sum(), x)
    assert built.baselines
    for label, baseline in built.baselines.items():
        baseline = baseline.double()
        got = _outputs(baseline(x))
        assert len(got) == len(expected), label
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9, msg=lambda m: f"{case} vs {label}: {m}")
        (grad_got,) = torch.autograd.grad(got[0].sum(), x)
        torch.testing.assert_close(grad_got, grad_expected, rtol=1e-9, atol=1e-9)


def test_moe_baseline_routes_to_several_experts():
    # The equality above would be weak if the router sent every token to the same two experts.
    built = bench.build_case("moe_top2_of_8", quick=True, seed=1)
    baseline = next(iter(built.baselines.values()))
    chosen = baseline.router(built.inputs[0]).topk(2, dim=-1).indices
    assert chosen.unique().numel() >= 4


def _check_rows(rows: list[dict], cases: list[str]) -> None:
    assert rows
    for row in rows:
        assert {"name", "gatedsl_s", "baseline", "baseline_s", "ratio"} <= set(row)
        assert isinstance(row["name"], str) and isinstance(row["baseline"], str)
        assert row["gatedsl_s"] > 0 and row["baseline_s"] > 0
        assert row["ratio"] == pytest.approx(row["gatedsl_s"] / row["baseline_s"])
        assert isinstance(row["met"], bool) and row["target"] > 0
    names = {row["name"] for row in rows}
    assert names == {f"{case}/{variant}" for case in cases for variant in bench.VARIANTS}


def test_quick_run_of_every_case_writes_the_json_schema(tmp_path):
    out = tmp_path / "bench.json"
    logged: list[str] = []
    args = ["--quick", "--repeats", "2", "--json", str(out)]
    import argparse

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    rows = bench.run(parser.parse_args(args), log=logged.append)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(rows))
    _check_rows(written, list(bench.CASES))
    # the cells are also compared with torch.compile of the eager module, compile times recorded
    compiled = [r for r in written if r["baseline"].startswith("torch.compile")]
    assert {r["name"] for r in compiled} == {f"{c}/{v}" for c in ("mgu", "rhn2", "gru_extra_gate")
                                             for v in bench.VARIANTS}
    for row in compiled:
        assert row["gatedsl_compile_s"] > 0 and row["baseline_compile_s"] > 0
        assert row["compile_speedup"] == pytest.approx(row["baseline_compile_s"] / row["gatedsl_compile_s"])
    assert "torch threads" in logged[0] and "gatedsl.compile" in logged[0]


def test_cli_bench_subcommand(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = cli(["bench", "--quick", "--repeats", "1", "--case", "gru", "--case", "swiglu", "--json", str(out),
                "--threads", str(torch.get_num_threads())])
    assert code == 0
    _check_rows(json.loads(out.read_text()), ["gru", "swiglu"])
    printed = capsys.readouterr().out
    assert "gru/fwd+bwd" in printed and "torch.nn.GRU" in printed and f"wrote {out}" in printed


def test_cli_bench_usage_errors(capsys):
    assert cli(["bench", "--case", "no_such_case"]) == 2
    assert cli(["bench", "--quick", "--repeats", "0", "--case", "swiglu"]) == 2
    assert "--repeats" in capsys.readouterr().err


def test_interleaving_rotates_the_order():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    medians = bench.time_interleaved(fns, repeats=3, warmup=1)
    assert set(medians) == {"a", "b", "c"}
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
