"""The examples run end to end, shortened, and their models learn."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_forecaster_loss_falls(capsys):
    result = load_example("train_forecaster").main(steps=40, log_every=20)
    assert result["final_loss"] < result["initial_loss"]
    printed = capsys.readouterr().out
    assert "step   20" in printed and "eval loss after training" in printed


def test_lorenz96_derivative_is_the_equation():
    """dx_i/dt = (x_{i+1} - x_{i-2}) x_{i-1} - x_i + F, indices on the ring, written out element by element."""
    x = torch.randn(8, dtype=torch.float64)
    expected = torch.stack([(x[(i + 1) % 8] - x[i - 2]) * x[i - 1] - x[i] + 8.0 for i in range(8)])
    torch.testing.assert_close(load_example("train_forecaster").lorenz96(x), expected, rtol=1e-12, atol=1e-12)
