"""passes/chunk_delta_rule.py: a scan of the (gated) delta rule, however the cell spells it, becomes one delta_rule_scan
that computes what the loop computes (float64, outputs and gradients against -O0); any other cell keeps its form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gatedsl
from gatedsl.api import analyse
from gatedsl.cli.main import main as cli
from gatedsl.kernels.delta_rule.chunked import CHUNK

ROOT = Path(__file__).resolve().parent.parent

# float64: the chunked kernel regroups the steps' sums (see tests/test_kernels_delta_rule.py), ~1e-14 apart.
TOL = {"rtol": 1e-10, "atol": 1e-10}
LONG = 2 * CHUNK + 6  # the cost rule runs the chunked kernel: three chunks, the last one partial

MODEL = """
cell Delta(q: [*, K], k: [*, K], v: [*, V], alpha: [*, {cell_decay}], beta: [*, 1], state S: [*, V, K]) {{
{body}
}}
model M() {{
  input q: [B, T, 4]
  input k: [B, T, 4]
  input v: [B, T, 3]
  input alpha: [B, T, {decay}]
  input beta: [B, T, 1]
  output o = scan Delta(q, k, v, alpha, beta) over T
}}
"""
STD = """
  recalled = einsum("...vk,...k->...v", S, k)
  forget = S - einsum("...v,...k->...vk", beta * recalled, k)
  S = unsqueeze(alpha, -1) * forget + einsum("...v,...k->...vk", beta * v, k)
  return einsum("...vk,...k->...v", S, q)
"""
SAME = {  # the gated delta rule (or DeltaNet) written otherwise: recognised
    "as std.linear_rnn writes it": STD,
    "operands swapped": """
  recalled = einsum("...k,...vk->...v", k, S)
  forget = S - einsum("...k,...v->...vk", k, recalled * beta)
  S = einsum("...k,...v->...vk", k, v * beta) + forget * unsqueeze(alpha, -1)
  return einsum("...k,...vk->...v", q, S)
""",
    "beta times the outer products": """
  forget = S - unsqueeze(beta, -1) * einsum("...v,...k->...vk", einsum("...vk,...k->...v", S, k), k)
  S = unsqueeze(alpha, -1) * forget + unsqueeze(beta, -1) * einsum("...v,...k->...vk", v, k)
  return einsum("...vk,...k->...v", S, q)
""",
    "decay before the erase": """
  decayed = unsqueeze(alpha, -1) * S
  erased = decayed - einsum("...v,...k->...vk", beta * einsum("...vk,...k->...v", decayed, k), k)
  S = erased + einsum("...v,...k->...vk", beta * v, k)
  return einsum("...vk,...k->...v", S, q)
""",
    "the error-correction form": """
  S = unsqueeze(alpha, -1) * S + einsum("...v,...k->...vk", beta * (v - alpha * einsum("...vk,...k->...v", S, k)), k)
  return einsum("...vk,...k->...v", S, q)
""",
    "matmul and sum": """
  recalled = sum(S * unsqueeze(k, -2), -1)
  S = unsqueeze(alpha, -1) * (S - unsqueeze(beta * recalled, -1) @ unsqueeze(k, -2)) + unsqueeze(beta * v, -1) @ unsqueeze(k, -2)
  return squeeze(S @ unsqueeze(q, -1), -1)
""",
    "DeltaNet (no decay)": """
  S = S - einsum("...v,...k->...vk", beta * einsum("...vk,...k->...v", S, k), k) + einsum("...v,...k->...vk", beta * v, k)
  return einsum("...vk,...k->...v", S, q)
""",
    "no write strength": """
  S = unsqueeze(alpha, -1) * (S - einsum("...v,...k->...vk", einsum("...vk,...k->...v", S, k), k)) + einsum("...v,...k->...vk", v, k)
  return einsum("...vk,...k->...v", S, q)
""",
    "gates computed in the cell": """
  gate b = sigmoid(beta)
  gate sigmoid a = exp(logsigmoid(alpha))
  forget = S - einsum("...v,...k->...vk", b * einsum("...vk,...k->...v", S, k), k)
  S = unsqueeze(a, -1) * forget + einsum("...v,...k->...vk", b * v, k)
  return einsum("...vk,...k->...v", S, q)
""",
}
NOT = {  # anything else keeps the loop
    "the erase added": STD.replace("forget = S - einsum", "forget = S + einsum"),
    "beta on the write only": STD.replace("beta * recalled", "recalled"),
    "alpha on the write too": STD.replace("+ einsum(\"...v,...k->...vk\", beta * v, k)",
                                          "+ unsqueeze(alpha, -1) * einsum(\"...v,...k->...vk\", beta * v, k)"),
    "a function of the state": STD.replace("S = unsqueeze(alpha, -1) * forget + einsum(\"...v,...k->...vk\", beta * v, k)",
                                           "S = tanh(unsqueeze(alpha, -1) * forget + einsum(\"...v,...k->...vk\", beta * v, k))"),
    "recalled with another key": STD.replace("einsum(\"...vk,...k->...v\", S, k)", "einsum(\"...vk,...k->...v\", S, q)"),
    "the erase doubled": STD.replace("beta * recalled", "2 * beta * recalled"),
    "the old state read out": """
  o = einsum("...vk,...k->...v", S, q)
  S = unsqueeze(alpha, -1) * (S - einsum("...v,...k->...vk", beta * einsum("...vk,...k->...v", S, k), k)) + einsum("...v,...k->...vk", beta * v, k)
  return o
""",
    "the state emitted": """
  S = unsqueeze(alpha, -1) * (S - einsum("...v,...k->...vk", beta * einsum("...vk,...k->...v", S, k), k)) + einsum("...v,...k->...vk", beta * v, k)
""",
}


def _spec(body: str, decay: int = 1) -> str:
    return MODEL.format(body=body, decay=decay, cell_decay="K" if decay > 1 else 1)


def _ops(spec, params=None, opt_level=2, **kwargs) -> list[str]:
    graph = analyse(spec, params, opt_level=opt_level, **kwargs).graph
    return [graph.node(n)["op"] for n in graph.order()]


def _inputs(length: int, batch: int = 2, decay_width: int = 1, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, 4, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(batch, length, 4, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(batch, length, 3, generator=gen, dtype=torch.float64)
    alpha = 0.5 + 0.5 * torch.rand(batch, length, decay_width, generator=gen, dtype=torch.float64)
    beta = torch.rand(batch, length, 1, generator=gen, dtype=torch.float64)
    return [q, k, v, alpha, beta]


def _same(spec, inputs, params=None):
    """-O0 and -O2 compute the same outputs and gradients (wrt every input and weight), with the same state_dict."""
    plain, fast = (gatedsl.compile(spec, params, opt_level=level).double() for level in (0, 2))
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == [(k, v.shape) for k, v in fast.state_dict().items()]
    fast.load_state_dict(plain.state_dict())
    gen = torch.Generator()
    results = []
    for model in (plain, fast):
        inputs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
        out = model(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        gen.manual_seed(3)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
        grads = torch.autograd.grad(loss, inputs + list(model.parameters()), allow_unused=True, materialize_grads=True)
        results.append([*outs, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL)


# ------------------------------------------------------------ recognition
@pytest.mark.parametrize("variant", sorted(SAME))
def test_the_delta_rule_written_otherwise_is_chunked(variant):
    spec = _spec(SAME[variant])
    ops = _ops(spec)
    assert ops.count("delta_rule_scan") == 1 and "scan" not in ops
    assert "delta_rule_scan" not in _ops(spec, opt_level=1)
    _same(spec, _inputs(LONG))
    _same(spec, _inputs(1))  # one step: the step kernel


@pytest.mark.parametrize("variant", sorted(NOT))
def test_other_cells_keep_the_loop(variant):
    spec = _spec(NOT[variant])
    assert "delta_rule_scan" not in _ops(spec)
    _same(spec, _inputs(9))


def test_a_decay_per_key_dim_is_not_the_delta_rule():
    spec = _spec(STD.replace("unsqueeze(alpha, -1)", "unsqueeze(alpha, -2)"), decay=4)
    assert "delta_rule_scan" not in _ops(spec)
    _same(spec, _inputs(9, decay_width=4))


def test_the_diagonal_linear_recurrences_are_not_the_delta_rule():
    for block in ("GLA", "SimpleGLA", "RetNet"):
        spec = f"import std.linear_rnn\nmodel M() {{\n  input x: [B, T, 8]\n  output y = {block}(x, heads=2)\n}}\n"
        assert "delta_rule_scan" not in _ops(spec)


def test_the_gates_the_cell_computes_stay_reported_and_alpha_goes_in_as_its_log():
    spec = _spec(SAME["gates computed in the cell"])
    reports = [gatedsl.check(spec, opt_level=level) for level in (0, 2)]
    assert [g.name for g in reports[0].gates] == [g.name for g in reports[1].gates] == ["Delta.b", "Delta.a"]
    graph = analyse(spec).graph
    (node,) = [graph.node(n) for n in graph.order() if graph.node(n)["op"] == "delta_rule_scan"]
    assert node["attrs"].gate == "log" and node["attrs"].beta


# ------------------------------------------------------------ how the scan runs
def _inputs_spec(how: str, layout: str = "[B, T, {d}]", extra: str = "") -> str:
    shapes = {name: layout.format(d=d) for name, d in (("q", 4), ("k", 4), ("v", 3), ("alpha", 1), ("beta", 1))}
    declared = "\n".join(f"  input {name}: {shape}" for name, shape in shapes.items())
    return f"""
import std.linear_rnn
model M() {{
{declared}{extra}
  {how}
}}
"""


@pytest.mark.parametrize("modifiers", ["", " reverse", " last", " reverse last"])
def test_reversed_and_last_step_scans(modifiers):
    spec = _inputs_spec(f"output o = scan GatedDeltaStep(q, k, v, alpha, beta) over T{modifiers}")
    assert "delta_rule_scan" in _ops(spec)
    _same(spec, _inputs(LONG))


def test_an_initial_state_and_the_final_state():
    spec = _inputs_spec("o, S_T = scan GatedDeltaStep(q, k, v, alpha, beta, S=S0) over T\n  output o\n  output S_T",
                        extra="\n  input S0: [B, 3, 4]")
    assert "delta_rule_scan" in _ops(spec)
    state = torch.randn(2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _same(spec, _inputs(LONG) + [state])


def test_steps_on_another_axis_and_more_leading_dims():
    spec = _inputs_spec("output o = scan GatedDeltaStep(q, k, v, alpha, beta) over T", layout="[T, B, {d}]")
    assert "delta_rule_scan" in _ops(spec)
    _same(spec, [x.transpose(0, 1).contiguous() for x in _inputs(LONG)])
    spec = _inputs_spec("output o = scan GatedDeltaStep(q, k, v, alpha, beta) over T", layout="[B, H, T, {d}]")
    assert "delta_rule_scan" in _ops(spec)
    _same(spec, [x.reshape(1, 2, *x.shape[1:]) for x in _inputs(LONG)])


def test_decays_without_a_log_at_run_time():
    """α from the model's input, ≤ 0 at some steps: the chunked kernel runs the step form for that call."""
    spec = _inputs_spec("output o = scan GatedDeltaStep(q, k, v, alpha, beta) over T")
    inputs = _inputs(LONG)
    inputs[3][0, 5], inputs[3][1, 70] = 0.0, -0.3
    _same(spec, inputs)


def test_a_standalone_export_keeps_the_loop():
    spec = _inputs_spec("output o = scan GatedDeltaStep(q, k, v, alpha, beta) over T")
    assert "delta_rule_scan" not in _ops(spec, standalone=True)


# ------------------------------------------------------------ std GatedDeltaNet
GDN_SPEC = """
import std.linear_rnn
model M() {
  input x: [B, T, 16]
  output y = GatedDeltaNet(x, heads=2)
}
"""


# Qwen3-Next's layout: more value heads than key heads (each key head's q and k repeated for its value heads),
# key and value head sizes apart, its eps and inits.
GVA_SPEC = GDN_SPEC.replace("GatedDeltaNet(x, heads=2)", 'GatedDeltaNet(x, heads=2, v_heads=4, head_dim=3, '
                            'v_head_dim=5, norm_eps=1e-6, init="qwen3_next")')


@pytest.mark.parametrize("spec", [GDN_SPEC, GVA_SPEC], ids=["fla", "qwen3_next"])
def test_std_gated_delta_net_is_chunked_and_equals_the_loop(spec):
    graph = analyse(spec).graph
    (node,) = [graph.node(n) for n in graph.order() if graph.node(n)["op"] == "delta_rule_scan"]
    assert node["attrs"].gate == "log"  # α = exp(...) in the block: its argument, through split_heads
    assert not [n for n in graph.order() if graph.node(n)["op"] == "scan"]
    x = torch.randn(2, CHUNK + 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _same(spec, [x])
    _same(spec, [x[:, :3]])
    reports = [gatedsl.check(spec, opt_level=level) for level in (0, 2)]
    for field in ("gates", "params", "params_by_block", "flops_expr", "shapes", "outputs"):
        assert getattr(reports[0], field) == getattr(reports[1], field), field


def test_explain_lists_the_delta_rule_and_its_kernel(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # the table's cells wrap at the terminal's width
    spec = tmp_path / "gdn.gate"
    spec.write_text(GDN_SPEC)
    assert cli(["compile", str(spec), "--explain"]) == 0
    shown = capsys.readouterr().out
    assert "delta_rule_scan" in shown and "GatedDeltaNet.GatedDeltaStep" in shown and "chunked" in shown
    assert cli(["compile", str(spec), "--json"]) == 0
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    (choice,) = [c for c in kernels if c["op"] == "delta_rule_scan"]
    assert choice["kernel"] == "chunked" and choice["target"]["sizes"]["T"] is None
    assert {c["kernel"] for c in choice["candidates"]} == {"loop", "one_step", "chunked", "triton"}
    assert choice["decoding"]["kernel"] == "one_step"  # what a decoder's one-token calls run
    assert cli(["compile", str(spec), "-O0", "--json"]) == 0
    assert not [c for c in json.loads(capsys.readouterr().out)["kernels"] if c["op"] == "delta_rule_scan"]
