"""shift(x, dim, steps, fill): a token shift along any axis, a symbolic one included (y_t = x_{t−steps}, the first
positions a number or a given slice), against plain-PyTorch references in float64 with gradients; its errors;
its standalone export; and its decoding (it carries its last inputs between calls)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import gatedsl

SPEC = """
model M(d: int = 4, steps: int = 1) {
  input x: [B, T, d]
  first = learned([d], init=normal(1.0))       # a learned token before the first (RWKV's shift uses zeros)
  output zero = shift(x, steps=steps)
  output given = shift(x, steps=steps, fill=first)
  output across = shift(x, dim=-1, fill=1.5)     # along the features: any axis
}
"""


def reference(x, first, steps):
    T = x.shape[1]
    kept = min(steps, T)
    zero = torch.cat([torch.zeros_like(x[:, :kept]), x[:, :T - kept]], dim=1)
    given = torch.cat([first.expand(x.shape[0], kept, -1), x[:, :T - kept]], dim=1)
    across = torch.cat([torch.full_like(x[..., :1], 1.5), x[..., :-1]], dim=-1)
    return zero, given, across


@pytest.mark.parametrize("steps,T", [(1, 6), (2, 6), (3, 2), (1, 1)])
@pytest.mark.parametrize("opt_level", [0, 2])
def test_shift_equals_its_reference(tmp_path, steps, T, opt_level):
    spec = tmp_path / "m.gate"
    spec.write_text(SPEC)
    torch.manual_seed(0)
    model = gatedsl.compile(spec, {"steps": steps}, opt_level=opt_level).double()
    x = torch.randn(3, T, 4, dtype=torch.float64, requires_grad=True)
    ours = model(x)
    first = model.get_parameter("first")
    theirs = reference(x, first, steps)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    weights = [torch.randn_like(a) for a in ours]
    grads = torch.autograd.grad(sum((a * w).sum() for a, w in zip(ours, weights)), [x, first])
    expected = torch.autograd.grad(sum((a * w).sum() for a, w in zip(theirs, weights)), [x, first])
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split", [[1] * 7, [2, 2, 2, 1], [3, 1, 3], [1, 6]])
def test_shift_decodes(tmp_path, split):
    spec = tmp_path / "m.gate"
    spec.write_text(SPEC)
    model = gatedsl.compile(spec, {"steps": 2}).double()
    decoder = gatedsl.Decoder(model)
    x = torch.randn(2, 7, 4, dtype=torch.float64)
    full = model(x)
    outs, state, t = [], None, 0
    for n in split:
        out, state = decoder.prefill(x[:, :n]) if state is None else decoder.step(x[:, t:t + n], state=state)
        outs.append(out)
        t += n
    for i, whole in enumerate(full):
        torch.testing.assert_close(torch.cat([o[i] for o in outs], dim=1), whole, rtol=0, atol=0)


@pytest.mark.parametrize("call,message", [
    ("shift(x, steps=0)", "shift moves by at least one position, got steps=0"),
    ("shift(x, fill=true)", "shift's fill is a number or a tensor"),
    ("shift(x, fill=learned([3]))", "must be a float tensor broadcasting to [B, 4]"),
    ("shift(x, dim=3)", "dim=3 is out of range for [B, T, 4]"),
])
def test_shift_errors(tmp_path, call, message):
    spec = tmp_path / "bad.gate"
    spec.write_text(f"model M() {{\n  input x: [B, T, 4]\n  output y = {call}\n}}\n")
    with pytest.raises(gatedsl.SpecError) as err:
        gatedsl.check(spec)
    assert message in err.value.message and err.value.line == 3


def test_shift_exports_standalone(tmp_path):
    from gatedsl.backend.export import export_standalone

    spec = tmp_path / "m.gate"
    spec.write_text(SPEC)
    model = gatedsl.compile(spec, {"steps": 2}, standalone=True).double()
    export_standalone(model, tmp_path / "m.py", "m.gate")
    found = importlib.util.spec_from_file_location("m", tmp_path / "m.py")
    module = importlib.util.module_from_spec(found)
    found.loader.exec_module(module)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    for a, b in zip(module.load().double()(x), model(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
