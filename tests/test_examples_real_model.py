"""examples/ablate_real_model.py runs end to end, shortened: both versions import transformers' weights, learn, and
the gated one goes back into a Qwen3NextForCausalLM that computes the same logits."""

from __future__ import annotations

import pytest

from test_examples import load_example

pytest.importorskip("transformers")


def test_ablate_real_model_runs(tmp_path, capsys):
    plot = tmp_path / "ablate.png"
    result = load_example("ablate_real_model").main(steps=8, log_every=4, eval_chars=2000, plot=plot)
    # float32 both sides: transformers' model and the imported spec agree to float32's rounding, before and after
    assert result["import_gap"] < 1e-4 and result["export_gap"] < 1e-4
    assert result["gated"] < result["initial_gated"] and result["gate_off"] < result["initial_gate_off"]
    printed = capsys.readouterr().out
    assert "attention_gate='none'" in printed and "load_state_dict(strict=True) took it" in printed
    assert [line.split()[0] for line in printed.splitlines() if line[:5].strip().isdigit()] == ["4", "8"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
