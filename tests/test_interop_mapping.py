"""Checkpoint mappings (gatedsl.interop): a transformers module's state dict loads into a compiled spec and comes
back out in its layout, all or nothing, and every way a state dict can fail to fit is an error that names the key
and both shapes. The reference is transformers' LlamaMLP on a tiny config, in float64."""

from __future__ import annotations

import pytest
import torch

import gatedsl
from gatedsl.interop import (Mapping, MappingError, export_state_dict, fill, ignore, load_state_dict, rename, split,
                             transform)
from gatedsl.interop.mlp import swiglu_from_llama

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaMLP  # noqa: E402

D, HIDDEN = 16, 24
AT = "layers.0.SwiGLU"  # the block instance of a one-layer spec


def llama_mlp(hidden: int = HIDDEN, seed: int = 0) -> LlamaMLP:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=D, intermediate_size=hidden, hidden_act="silu", num_attention_heads=2,
                                      num_key_value_heads=2)
    return LlamaMLP(config).double()


def spec(tmp_path, layers: int = 1, hidden: int = HIDDEN):
    path = tmp_path / "mlp.gate"
    path.write_text(f"""import std.mlp
model M(layers: int = {layers}) {{
  input x: [B, T, {D}]
  h = x
  repeat layers {{
    h = h + SwiGLU(h, hidden={hidden})
  }}
  output y = h
}}
""")
    return gatedsl.compile(path).double()


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def unchanged(module, before):
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_llama_mlp_in_and_out(tmp_path):
    ref, ours = llama_mlp(), spec(tmp_path)
    written = load_state_dict(ours, ref, swiglu_from_llama().under(AT, ""))
    assert sorted(written) == sorted(ours.state_dict())
    x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), x_ref + ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.get_parameter(f"{AT}.g.x_proj.weight").grad, ref.gate_proj.weight.grad,
                               rtol=1e-12, atol=1e-12)

    back = llama_mlp(seed=1)
    back.load_state_dict(export_state_dict(ours, swiglu_from_llama().under(AT, "")), strict=True)
    torch.testing.assert_close(back(x_ref), ref(x_ref), rtol=0, atol=0)


def test_composed_for_two_layers(tmp_path):
    refs, ours = [llama_mlp(seed=s) for s in (0, 1)], spec(tmp_path, layers=2)
    state = {f"mlps.{i}.{k}": v for i, ref in enumerate(refs) for k, v in ref.state_dict().items()}
    mapping = sum((swiglu_from_llama().under(f"layers.{i}.SwiGLU", f"mlps.{i}") for i in range(2)), Mapping())
    load_state_dict(ours, state, mapping)
    x = torch.randn(2, 4, D, dtype=torch.float64)
    h = x + refs[0](x)
    torch.testing.assert_close(ours(x), h + refs[1](h), rtol=1e-12, atol=1e-12)
    assert export_state_dict(ours, mapping).keys() == state.keys()


def test_a_shape_mismatch_names_both_and_writes_nothing(tmp_path):
    ours = spec(tmp_path)
    before = snapshot(ours)
    with pytest.raises(MappingError) as caught:
        load_state_dict(ours, llama_mlp(hidden=32), swiglu_from_llama().under(AT, ""))
    assert str(caught.value) == f"gate_proj.weight is [32, 16], but the spec's {AT}.g.x_proj.weight is [24, 16]"
    assert unchanged(ours, before)


def test_a_mismatch_after_rules_that_fit_writes_nothing(tmp_path):
    ours = spec(tmp_path)
    before = snapshot(ours)
    state = llama_mlp().state_dict()
    state["down_proj.weight"] = torch.zeros(D, 30, dtype=torch.float64)
    with pytest.raises(MappingError) as caught:
        load_state_dict(ours, state, swiglu_from_llama().under(AT, ""))
    assert str(caught.value) == f"down_proj.weight is [16, 30], but the spec's {AT}.y.proj.weight is [16, 24]"
    assert unchanged(ours, before)


def test_keys_that_do_not_fit(tmp_path):
    ours, mapping = spec(tmp_path), swiglu_from_llama().under(AT, "")
    state = llama_mlp().state_dict()
    with pytest.raises(MappingError, match=r"^no rule of the mapping reads extra.bias \("):
        load_state_dict(ours, {**state, "extra.bias": torch.zeros(3)}, mapping)
    load_state_dict(ours, {**state, "extra.bias": torch.zeros(3)}, mapping + Mapping([ignore("extra.bias")]))

    misspelt = {("up_proj.wieght" if k == "up_proj.weight" else k): v for k, v in state.items()}
    with pytest.raises(MappingError, match=r"^the state dict lacks up_proj.weight \(closest: up_proj.wieght"):
        load_state_dict(ours, misspelt, mapping)

    with pytest.raises(MappingError, match=r"^the mapping fills SwiGLU.g.x_proj.weight, .*which the compiled spec "
                                           r"lacks \(closest: layers.0.SwiGLU.g.x_proj.weight"):
        load_state_dict(ours, state, swiglu_from_llama().under("SwiGLU", ""))

    short = Mapping([rename("gate_proj.weight", f"{AT}.g.x_proj.weight"), ignore("up_proj.weight", "down_proj.weight")])
    with pytest.raises(MappingError, match=rf"^no rule of the mapping fills {AT}.v.x_proj.weight, {AT}.y.proj.weight,"):
        load_state_dict(ours, state, short)
    assert load_state_dict(ours, state, short, partial=True) == [f"{AT}.g.x_proj.weight"]
    with pytest.raises(MappingError, match=rf"^the mapping names parameter {AT}.g.x_proj.weight in two rules$"):
        load_state_dict(ours, state, mapping + Mapping([rename("x", f"{AT}.g.x_proj.weight")]))


def test_a_fused_projection_splits_and_joins(tmp_path):
    ref, ours = llama_mlp(), spec(tmp_path)
    fused = {"gate_up.weight": torch.cat([ref.gate_proj.weight, ref.up_proj.weight]).detach(),
             "down.weight": ref.down_proj.weight.detach()}
    mapping = Mapping([split("gate_up.weight", ["g.x_proj.weight", "v.x_proj.weight"]),
                       rename("down.weight", "y.proj.weight")]).under(AT, "")
    load_state_dict(ours, fused, mapping)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    torch.testing.assert_close(ours(x), x + ref(x), rtol=1e-12, atol=1e-12)
    out = export_state_dict(ours, mapping)
    assert torch.equal(out["gate_up.weight"], fused["gate_up.weight"])

    before = snapshot(ours)
    with pytest.raises(MappingError) as caught:
        load_state_dict(ours, {**fused, "gate_up.weight": torch.zeros(40, D)}, mapping)
    assert str(caught.value) == (f"gate_up.weight is [40, 16], but the spec's {AT}.g.x_proj.weight, "
                                 f"{AT}.v.x_proj.weight joined (split along dim 0) make [48, 16]")
    uneven = Mapping([split("gate_up.weight", ["g.x_proj.weight", "v.x_proj.weight"], sizes=[20, 28]),
                      rename("down.weight", "y.proj.weight")]).under(AT, "")
    with pytest.raises(MappingError, match=r"gives layers.0.SwiGLU.g.x_proj.weight a \[20, 16\] tensor"):
        load_state_dict(ours, fused, uneven)
    assert unchanged(ours, before)


def test_transforms_and_fills(tmp_path):
    ref, ours = llama_mlp(), spec(tmp_path)
    state = {"gate_t": ref.gate_proj.weight.detach().t().contiguous(), "up_proj.weight": ref.up_proj.weight.detach(),
             "down_proj.weight": ref.down_proj.weight.detach()}
    transposed = Mapping([transform("gate_t", "g.x_proj.weight", lambda t: [t[0].t()], lambda t: [t[0].t()], "transpose"),
                          rename("up_proj.weight", "v.x_proj.weight"),
                          rename("down_proj.weight", "y.proj.weight")]).under(AT, "")
    load_state_dict(ours, state, transposed)
    assert torch.equal(export_state_dict(ours, transposed)["gate_t"], state["gate_t"])
    bad = {**state, "gate_t": torch.zeros(5, 7, dtype=torch.float64)}
    with pytest.raises(MappingError, match=r"^gate_t \[5, 7\] gives layers.0.SwiGLU.g.x_proj.weight a \[7, 5\] tensor "
                                           r"\(transpose\), but the spec's layers.0.SwiGLU.g.x_proj.weight is \[24, 16\]$"):
        load_state_dict(ours, bad, transposed)

    # a parameter the reference lacks: set on load, and exported only while it still holds the value
    filled = Mapping([rename("gate_proj.weight", "g.x_proj.weight"), fill("v.x_proj.weight", 0.0),
                      ignore("up_proj.weight"), rename("down_proj.weight", "y.proj.weight")]).under(AT, "")
    load_state_dict(ours, ref, filled)
    assert not ours.get_parameter(f"{AT}.v.x_proj.weight").any()
    assert "up_proj.weight" not in export_state_dict(ours, filled)
    with torch.no_grad():
        ours.get_parameter(f"{AT}.v.x_proj.weight")[0, 0] = 1.0
    with pytest.raises(MappingError, match=rf"^{AT}.v.x_proj.weight no longer holds 0, and the reference has no place"):
        export_state_dict(ours, filled)
