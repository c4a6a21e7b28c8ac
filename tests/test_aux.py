"""`aux NAME = expr`: auxiliary outputs (losses) recorded by the compiled module at each call.

The values of the latest call are read with `model.aux` or `gatedsl.aux_outputs(model)`,
{instance path: tensor}; they keep their autograd history, stay out of the state dict, and
survive torch.compile, pickling, deep copies and the standalone `-o` export. Also here:
`noise_like(x)`, N(0, 1) in training and zeros in eval (noisy gating).
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import gatedsl
from gatedsl.cli.main import main

SPEC = """
block Balanced(x: [*, D]) {
  y = linear(x, D)
  aux spread = mean(square(y))            # a per-instance loss
  return y
}

model M() {
  input x: [B, 4]
  h = x
  repeat 2 as layers {
    h = Balanced(h)
  }
  aux total = sum(h) * 0.5
  aux rows = mean(h, 1)                   # not only scalars
  output y = tanh(h)
}
"""
NAMES = ["layers.0.Balanced.spread", "layers.1.Balanced.spread", "total", "rows"]


def lin(gm, prefix, x):
    return x @ gm.get_parameter(prefix + ".weight").T + gm.get_parameter(prefix + ".bias")


def reference(gm, x):
    h = x
    aux = {}
    for i in range(2):
        h = lin(gm, f"layers.{i}.Balanced.y.x_proj", h)
        aux[f"layers.{i}.Balanced.spread"] = (h * h).mean()
    aux["total"] = h.sum() * 0.5
    aux["rows"] = h.mean(1)
    return torch.tanh(h), aux


def assert_aux(got: dict, want: dict, **tol):
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol)


@pytest.fixture
def gm():
    torch.manual_seed(0)
    return gatedsl.compile(SPEC).double()


def x64(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------- names
def test_check_reports_aux_by_instance_path():
    rep = gatedsl.check(SPEC)
    assert rep.aux == {"layers.0.Balanced.spread": [], "layers.1.Balanced.spread": [], "total": [], "rows": ["B"]}
    assert list(rep.outputs) == ["y"]  # aux values are not outputs


def test_compile_json_lists_aux(tmp_path, capsys):
    spec = tmp_path / "m.gate"
    spec.write_text(SPEC)
    assert main(["compile", str(spec), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["aux"] == {"layers.0.Balanced.spread": [], "layers.1.Balanced.spread": [], "total": [], "rows": ["B"]}


def test_a_model_without_aux():
    spec = "model M() {\n  input x: [B, 4]\n  output y = linear(x, 2)\n}"
    assert gatedsl.check(spec).aux == {}
    gm = gatedsl.compile(spec)
    gm(torch.randn(3, 4))
    assert gm.aux == {} and gatedsl.aux_outputs(gm) == {}
    assert "_aux" not in dict(gm.named_modules())


# ---------------------------------------------------------------- values
def test_values_after_each_call_match_the_equations(gm):
    assert gm.aux == {}  # nothing before the first call
    x1, x2 = x64(3, 4, seed=1), x64(5, 4, seed=2)
    y = gm(x1)
    first = gm.aux
    y_ref, aux_ref = reference(gm, x1)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert_aux(first, aux_ref, rtol=1e-12, atol=1e-12)
    assert_aux(gatedsl.aux_outputs(gm), aux_ref, rtol=0, atol=0)  # the same values through the function
    gm(x2)
    assert_aux(gm.aux, reference(gm, x2)[1], rtol=1e-12, atol=1e-12)  # replaced by the next call
    assert_aux(first, aux_ref, rtol=0, atol=0)  # a dict read earlier is not changed under the reader
    assert gm.aux["rows"].shape == (5,)


def test_aux_losses_backpropagate(gm):
    x = x64(3, 4).requires_grad_()
    y = gm(x)
    loss = y.sum() + sum(v.sum() * (i + 2) for i, v in enumerate(gm.aux.values()))
    params = list(gm.parameters())
    got = torch.autograd.grad(loss, [x] + params)
    xr = x.detach().clone().requires_grad_()
    y_ref, aux_ref = reference(gm, xr)
    loss_ref = y_ref.sum() + sum(v.sum() * (i + 2) for i, v in enumerate(aux_ref.values()))
    want = torch.autograd.grad(loss_ref, [xr] + params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    # and the aux terms do change the gradient: without them it differs
    plain = torch.autograd.grad(gm(x).sum(), [x])[0]
    assert not torch.allclose(plain, got[0])


def test_training_step_with_aux_loss(gm):
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    x = x64(8, 4)
    before = None
    for _ in range(20):
        gm(x)
        loss = gm.aux["layers.0.Balanced.spread"] + gm.aux["layers.1.Balanced.spread"]
        before = loss.item() if before is None else before
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < before


def test_aux_is_not_state(gm):
    gm(x64(3, 4))
    state = gm.state_dict()
    assert sorted(state) == sorted(n for n, _ in gm.named_parameters())
    twin = gatedsl.compile(SPEC).double()
    twin.load_state_dict(state)  # strict: no aux keys expected or present
    twin(x64(3, 4))
    assert_aux(twin.aux, gm.aux, rtol=0, atol=0)


def test_pickle_and_deepcopy_after_a_training_call(gm, tmp_path):
    x = x64(3, 4)
    gm(x.requires_grad_())  # the recorder now holds non-leaf tensors, which cannot be deep-copied
    twin = copy.deepcopy(gm)
    assert twin.aux == {}  # the values are not copied ...
    twin(x)
    assert_aux(twin.aux, gm.aux, rtol=0, atol=0)  # ... but the copy records its own
    path = tmp_path / "whole.pt"
    torch.save(gm, path)
    loaded = torch.load(path, weights_only=False)
    assert loaded.aux == {}
    loaded(x)
    assert_aux(loaded.aux, gm.aux, rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(gm))
    again(x)
    assert list(again.aux) == NAMES


def test_torch_compile_records_aux(gm):
    x = x64(3, 4)
    compiled = torch.compile(gm)
    y = compiled(x)
    y_ref, aux_ref = reference(gm, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert_aux(compiled.aux, aux_ref, rtol=1e-10, atol=1e-10)  # through the wrapper
    assert_aux(gatedsl.aux_outputs(compiled), aux_ref, rtol=1e-10, atol=1e-10)
    loss = sum(v.sum() for v in compiled.aux.values())
    got = torch.autograd.grad(loss, list(gm.parameters()))
    want = torch.autograd.grad(sum(v.sum() for v in aux_ref.values()), list(gm.parameters()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    x2 = x64(3, 4, seed=7)
    compiled(x2)
    assert_aux(compiled.aux, reference(gm, x2)[1], rtol=1e-10, atol=1e-10)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    gm = gatedsl.compile(SPEC)
    compiled = torch.compile(gm, fullgraph=True)  # recording is no graph break
    x = torch.randn(3, 4)
    compiled(x)
    assert_aux(compiled.aux, reference(gm, x)[1], rtol=1e-5, atol=1e-5)


def test_standalone_export_records_aux(tmp_path, capsys):
    spec = tmp_path / "m.gate"
    spec.write_text(SPEC.replace("output y = tanh(h)", "output y = tanh(h) + noise_like(h)"))
    out = tmp_path / "export" / "aux_model.py"
    assert main(["compile", str(spec), "-o", str(out)]) == 0
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent(f"""\
        import sys
        sys.modules["gatedsl"] = None  # the module must not need gatedsl
        sys.path.insert(0, {str(out.parent)!r})
        import torch, aux_model
        m = aux_model.load().eval()
        assert m.aux == {{}}
        x = torch.randn(3, 4)
        y = m(x)
        assert list(m.aux) == {NAMES!r}, list(m.aux)
        assert "aux" not in str(list(m.state_dict()))
        m.train()
        noisy = m(x)
        assert not torch.allclose(noisy, y)  # noise_like is on in training
        m.eval()
        torch.save((x, y, dict(m.aux)), {str(tmp_path / 'probe.pt')!r})
    """))
    subprocess.run([sys.executable, str(probe)], check=True, env={**os.environ, "PYTHONPATH": ""})
    x, y, aux = torch.load(tmp_path / "probe.pt")
    gm = gatedsl.compile(spec).eval()
    gm.load_state_dict(torch.load(out.with_suffix(".pt")))
    torch.testing.assert_close(gm(x), y)
    assert_aux(aux, gm.aux)


# --------------------------------------------------------------- where
def test_aux_in_a_cell_called_for_one_step():
    spec = """
cell Step(x: [*, D], state h: [*, D]) {
  h = tanh(linear(x, D) + h)
  aux energy = mean(square(h))
}
model M() {
  input x: [B, 3]
  output y = Step(x)
}
"""
    gm = gatedsl.compile(spec)
    x = torch.randn(2, 3)
    y = gm(x)
    assert list(gm.aux) == ["Step.energy"]
    torch.testing.assert_close(gm.aux["Step.energy"], (y * y).mean())


def test_aux_inside_a_scanned_cell_is_rejected():
    spec = """
cell Step(x: [*, D], state h: [*, D]) {
  h = tanh(linear(x, D) + h)
  aux energy = mean(square(h))
}
model M() {
  input x: [B, T, 3]
  output y = scan Step(x) over T
}
"""
    with pytest.raises(gatedsl.SpecError, match="inside a scanned cell") as err:
        gatedsl.check(spec)
    assert err.value.line == 4
    assert "after the scan" in err.value.render()


@pytest.mark.parametrize("stmt, message", [
    ("aux a = 3", "must be a tensor"),
    ("aux a = to_int(x)", "float tensor"),
    ("aux a = x > 0", "float tensor"),
    ("aux a = sum(x)\n  aux a = mean(x)", "recorded twice"),
])
def test_aux_errors(stmt, message):
    spec = f"model M() {{\n  input x: [B, 3]\n  {stmt}\n  output y = x\n}}"
    with pytest.raises(gatedsl.SpecError, match=message):
        gatedsl.check(spec)


def test_aux_name_is_usable_after_and_aux_is_a_keyword():
    spec = "model M() {\n  input x: [B, 3]\n  aux s = sum(x)\n  output y = x * s\n}"
    gm = gatedsl.compile(spec)
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), x * x.sum())
    with pytest.raises(gatedsl.SpecError, match="unexpected"):
        gatedsl.check("model M() {\n  input x: [B, 3]\n  aux = sum(x)\n  output y = x\n}")


def test_a_scope_named_aux_does_not_hide_the_values():
    spec = """
model M() {
  input x: [B, 3]
  h = x
  repeat 2 as aux { h = linear(h, 3) }
  aux total = sum(h)
  output y = h
}
"""
    gm = gatedsl.compile(spec)
    assert all(n.startswith("aux_.") for n, _ in gm.named_parameters())
    gm(torch.randn(2, 3))
    assert list(gm.aux) == ["total"]


# ------------------------------------------------------------ noise_like
NOISE = """
model M() {
  input x: [B, T, 4]
  output y = x + noise_like(x)
}
"""


def test_noise_like_is_standard_normal_in_training_and_zero_in_eval():
    gm = gatedsl.compile(NOISE).double()
    x = x64(2, 3, 4)
    assert gm.training
    torch.manual_seed(5)
    y = gm(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y, x + torch.randn(2, 3, 4, dtype=torch.float64), rtol=0, atol=0)
    assert y.dtype == torch.float64
    assert not torch.equal(gm(x), gm(x))
    big = gm(x64(64, 64, 4)) - x64(64, 64, 4)
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05
    gm.eval()
    torch.testing.assert_close(gm(x), x, rtol=0, atol=0)
    assert gatedsl.check(NOISE).params == 0 and list(gm.state_dict()) == []


def test_noise_like_has_no_gradient_path_but_keeps_the_input_one():
    gm = gatedsl.compile("model M() {\n  input x: [B, 3]\n  output y = x * noise_like(x)\n}").double()
    x = x64(2, 3).requires_grad_()
    torch.manual_seed(1)
    gm(x).sum().backward()
    torch.manual_seed(1)
    torch.testing.assert_close(x.grad, torch.randn(2, 3, dtype=torch.float64), rtol=0, atol=0)


def test_noise_like_inside_a_scanned_cell_follows_the_mode():
    spec = """
cell Noisy(x: [*, D], state h: [*, D]) {
  h = x + noise_like(x) + h
}
model M() {
  input x: [B, T, 4]
  output y = scan Noisy(x) over T
}
"""
    gm = gatedsl.compile(spec).double().eval()
    x = x64(2, 5, 4)
    torch.testing.assert_close(gm(x), x.cumsum(1), rtol=1e-12, atol=1e-12)
    gm.train()
    assert not torch.allclose(gm(x), x.cumsum(1))


def test_noise_like_needs_a_float_tensor():
    with pytest.raises(gatedsl.SpecError, match="noise_like"):
        gatedsl.check("model M() {\n  input i: int[B, 3]\n  output y = to_float(i) + noise_like(i)\n}")


def test_compile_summary_lists_aux(tmp_path, capsys):
    spec = tmp_path / "m.gate"
    spec.write_text(SPEC)
    assert main(["compile", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "aux values (4)" in out and "layers.1.Balanced.spread" in out


def test_verify_graph_checks_aux_ports():
    from gatedsl.api import analyse
    from gatedsl.passes.verify_graph import GraphInvariantError, verify_graph

    unit = analyse(SPEC)
    verify_graph(unit)
    name, (node, port) = unit.graph.aux[0]
    unit.graph.aux[0] = (name, (node, port + 5))
    with pytest.raises(GraphInvariantError, match="aux"):
        verify_graph(unit)
