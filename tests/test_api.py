"""The Python contract: compile/check signatures, the report, SpecError's fields, and check allocating nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import gatedsl
from gatedsl.errors import ShapeError

SPEC = textwrap.dedent("""\
    block Highway(x: [*, D]) {                         # Srivastava et al. 2015
      gate t = sigmoid(linear(x, D))
      return t * relu(linear(x, D)) + (1 - t) * x
    }

    model Net(width: int in 2..4096 = 16, depth: int in 1..8 = 2, act: {relu, gelu} = relu) {
      input x: [B, 5]
      h = act(linear(x, width))
      repeat depth as blocks {
        h = Highway(h)
      }
      output y = linear(h, 1)
    }
""")


def test_compile_from_text_and_from_path_agree(tmp_path):
    path = tmp_path / "net.gate"
    path.write_text(SPEC)
    torch.manual_seed(0)
    from_text = gatedsl.compile(SPEC)
    torch.manual_seed(0)
    from_path = gatedsl.compile(str(path))
    assert isinstance(from_text, torch.fx.GraphModule)
    x = torch.randn(3, 5)
    torch.testing.assert_close(from_text(x), from_path(x))
    assert list(from_text.state_dict()) == list(from_path.state_dict())


def test_report_fields_match_the_equations():
    rep = gatedsl.check(SPEC, params={"width": 32, "depth": 3})
    w = 32
    assert rep.params == (5 * w + w) + 3 * 2 * (w * w + w) + (w + 1)
    assert rep.params_by_block["blocks.0.Highway"] == 2 * (w * w + w)
    assert rep.inputs == {"x": ["B", 5]} and rep.outputs == {"y": ["B", 1]}
    assert [(g.name, g.kind, g.line) for g in rep.gates] == [
        (f"blocks.{i}.Highway.t", "sigmoid", 2) for i in range(3)
    ]
    # FLOPs: 2·in·out per linear per row, plus the element-wise ops; a polynomial in B.
    assert rep.flops_expr.endswith("·B")
    assert gatedsl.check(SPEC, dims={"B": 10}).flops == 10 * gatedsl.check(SPEC).flops


def test_params_override_choice_by_name_and_domain_checked():
    with_gelu = gatedsl.compile(SPEC, params={"act": "gelu", "depth": 1})
    with_relu = gatedsl.compile(SPEC, params={"depth": 1})
    assert "gelu" in with_gelu.code and "gelu" not in with_relu.code
    with pytest.raises(gatedsl.SpecError) as err:
        gatedsl.check(SPEC, params={"depth": 9})
    assert "outside its domain 1..8" in err.value.message
    assert err.value.line == 6  # the parameter's declaration
    with pytest.raises(gatedsl.SpecError):
        gatedsl.check(SPEC, params={"act": "tanh"})


def test_spec_error_carries_location_fields():
    bad = SPEC.replace("return t * relu(linear(x, D))", "return t * relu(linear(x, 2 * D))")
    with pytest.raises(ShapeError) as info:
        gatedsl.check(bad)
    err = info.value
    assert isinstance(err, gatedsl.SpecError)
    assert (err.file, err.line, err.column) == ("<string>", 3, 10)
    assert "cannot broadcast [B, 16] with [B, 32]" == err.message
    assert err.render().startswith("<string>:3:10: error: cannot broadcast")


def test_check_allocates_no_weights_and_never_imports_torch():
    # A 100-billion-parameter model checks instantly when the limit allows it: nothing is allocated.
    code = textwrap.dedent(f"""
        import sys, time
        import gatedsl
        start = time.perf_counter()
        rep = gatedsl.check({SPEC!r}, params={{"width": 4096, "depth": 8}}, max_params=10**12)
        assert rep.params > 2 * 10**8
        assert "torch" not in sys.modules, "check imported torch"
        print(time.perf_counter() - start)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 60  # a hang guard only: nothing is allocated, so this is instant


def test_several_models_need_a_name():
    two = SPEC + "\nmodel Other() {\n  input x: [B, 2]\n  output y = x * 2\n}\n"
    with pytest.raises(gatedsl.SpecError) as err:
        gatedsl.check(two)
    assert "defines 2 models" in err.value.message
    assert gatedsl.check(two, model="Other").outputs == {"y": ["B", 2]}


def test_symbolic_input_sizes_are_names_in_the_body():
    src = textwrap.dedent("""\
        model M() {
          input x: [B, T, 4]
          z = zeros([B, T, 2])
          output y = concat([x, z], -1)
        }
    """)
    assert gatedsl.check(src).outputs == {"y": ["B", "T", 6]}
    y = gatedsl.compile(src)(torch.randn(3, 5, 4))
    assert y.shape == (3, 5, 6) and torch.all(y[..., 4:] == 0)


def test_gates_must_be_float_and_kinds_are_inferred_or_named():
    base = "model M() {\n  input x: [B, 4]\n  %s\n  output y = g * x\n}\n"
    kinds = {
        "gate g = sigmoid(linear(x, 4))": "sigmoid",
        "gate g = softmax(linear(x, 4))": "softmax",
        "gate g = topk_softmax(linear(x, 4), 2)": "topk",
        "gate g = binary(sigmoid(linear(x, 4)))": "binary",
        "gate g = learned([4], init=zeros)": "learned",
        "gate softmax g = softmax(linear(x, 4) / 2)": "softmax",
    }
    for stmt, kind in kinds.items():
        assert [g.kind for g in gatedsl.check(base % stmt).gates] == [kind], stmt
    with pytest.raises(gatedsl.SpecError, match="cannot tell what kind of gate"):
        gatedsl.check(base % "gate g = linear(x, 4) * 2")
    with pytest.raises(gatedsl.SpecError, match="must be a float tensor"):
        gatedsl.check(base % "gate binary g = x > 0")
