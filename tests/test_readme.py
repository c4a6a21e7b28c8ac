"""The README's tour spec is real: it checks, compiles for every cell choice, and runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import gatedsl

README = Path(__file__).resolve().parents[1] / "README.md"


def _tour() -> str:
    blocks = re.findall(r"```\w*\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if "model Forecaster" in b)


@pytest.mark.parametrize("cell", ["MyGRU", "LSTM", "MGU"])
def test_readme_tour_compiles_and_runs(tmp_path, cell):
    spec = tmp_path / "tour.gate"
    spec.write_text(_tour())
    rep = gatedsl.check(spec, params={"cell": cell, "d": 32})
    assert rep.outputs == {"y": ["B", "T", 8]}
    gm = gatedsl.compile(spec, params={"cell": cell, "d": 32})
    y = gm(torch.randn(2, 6, 8))
    y.sum().backward()
    assert y.shape == (2, 6, 8)
    assert "layers.1.cell" in " ".join(gm.state_dict())


def test_readme_decoding_example_runs(monkeypatch):
    monkeypatch.chdir(README.parent)  # its paths are the repository's
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "gatedsl.Decoder(" in b)
    exec(compile(block, "README.md", "exec"), {})


def test_readme_generate_example_runs(monkeypatch):
    monkeypatch.chdir(README.parent)
    block = next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "gatedsl.generate(" in b)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert [len(row) for row in scope["out"].tokens] == [8, 8] and scope["out"].finished == ["length", "length"]
