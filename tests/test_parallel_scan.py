"""passes/parallel_scan.py: which scans become one linear_scan (and which keep their loop), and that they compute the same.

A scan is rewritten where its cell updates its one state as S = a ⊙ S + b with a and b not reading
the state, and emits S or a readout linear in it; the cells below are written the ways a user might
(operands swapped, the decay as exp or sigmoid of something, other einsum spellings, constants,
reversed, only the last step) and rewritten, or differ from that form (a nonlinearity on the state,
a decay or readout reading it, the delta rule, two states) and keep the loop. Each rewritten scan
is compiled at -O0 and -O2 and compared in float64 (outputs, and gradients with respect to every
input and weight) with each of its kernels in turn: the -O2 module computes the same sums in
another order (chunks, blocks), ~1e-15 relative; 1e-10 leaves a wide margin below any real
difference. The report (shapes, counts, gates) is the same at both levels but for its kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json

import pytest
import torch

import gatedsl
from gatedsl.api import analyse
from gatedsl.cli.main import main as cli
from gatedsl.kernels import registry
from gatedsl.kernels.linear_scan.blocked import blocked
from gatedsl.kernels.linear_scan.chunked import chunked
from gatedsl.kernels.linear_scan.reference import step
from gatedsl.passes.parallel_scan import recognise

TOL = dict(rtol=1e-10, atol=1e-10)
KERNELS = {"step": step, "chunked": chunked, "blocked": blocked}


def nodes(spec, params=None, opt_level=2, **kwargs):
    unit = analyse(spec, params, opt_level=opt_level, **kwargs)
    graph = unit.graph
    return [graph.node(n) for n in graph.order()]


def linear_scans(spec, params=None):
    return [d["attrs"] for d in nodes(spec, params) if d["op"] == "linear_scan"]


def loops(spec, params=None):
    return [d for d in nodes(spec, params) if d["op"] == "scan"]


@contextlib.contextmanager
def only(kernel: str):
    """Every linear_scan runs on `kernel` (where it applies) for the duration."""
    patched = [dataclasses.replace(k, cost=(lambda ctx: -1.0) if k.name == kernel else k.cost)
               for k in registry.kernels_for("linear_scan")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry.KERNELS, "linear_scan", patched)
        mp.setattr(registry, "_CHOSEN", {})
        mp.setattr(registry, "_BY_SIGNATURE", {})
        yield registry._CHOSEN


def same(spec, inputs, params=None, kernels=("step", "blocked")):
    """-O2 with each kernel in turn equals -O0 (outputs, gradients wrt inputs, weights); checkpoints move both ways."""
    torch.manual_seed(0)
    plain = gatedsl.compile(spec, params, opt_level=0).double()
    fast = gatedsl.compile(spec, params, opt_level=2).double()
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == \
           [(k, v.shape) for k, v in fast.state_dict().items()]
    with torch.no_grad():  # move every weight off its init (A_log = 0, norm weights = 1, ...)
        gen = torch.Generator().manual_seed(1)
        for p in plain.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=gen))
    fast.load_state_dict(plain.state_dict())
    plain.load_state_dict(fast.state_dict())

    def run(model):
        xs = [x.clone().requires_grad_() for x in inputs]
        out = model(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        probes = [torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(7 + i))
                  for i, o in enumerate(outs)]
        loss = sum((o * p).sum() for o, p in zip(outs, probes))
        grads = torch.autograd.grad(loss, xs + list(model.parameters()), allow_unused=True, materialize_grads=True)
        return list(outs) + list(grads)

    want = run(plain)
    for kernel in kernels:
        with only(kernel) as chosen:
            got = run(fast)
            assert KERNELS[kernel] in chosen.values(), f"{kernel} did not run"
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"{kernel}, value {i}: {m}")


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------ the std blocks
STD = {
    "RetNet": ("RetNet(x, heads=2)", dict(log_decay=True, drive="outer", readout="einsum", key_readout=True)),
    "SimpleGLA": ("SimpleGLA(x, heads=2)", dict(log_decay=True, drive="outer", readout="einsum", key_readout=True)),
    "GLA": ("GLA(x, heads=2, rank=4)", dict(log_decay=True, drive="outer", readout="einsum", key_readout=True)),
    "HGRN": ("HGRN(x, lower)", dict(log_decay=False, drive="given", readout="none")),
    "HGRNStack": ("HGRNStack(x, layers=2)", dict(log_decay=False, drive="given", readout="none")),
    "Mamba": ("Mamba(x, state_size=4)", dict(log_decay=True, drive="given", readout="einsum", key_readout=False)),
}


def std_spec(call: str) -> str:
    lower = "  input lower: [8]\n" if "lower" in call else ""
    return f"import std.linear_rnn\nmodel M() {{\n  input x: [B, T, 8]\n{lower}  output y = {call}\n}}\n"


def std_inputs(call: str, T: int):
    x = randn(2, T, 8, seed=T)
    return [x, torch.rand(8, dtype=torch.float64)] if "lower" in call else [x]


@pytest.mark.parametrize("block", sorted(STD))
def test_std_blocks_become_linear_scans(block):
    call, form = STD[block]
    spec = std_spec(call)
    found = linear_scans(spec)
    assert found and not loops(spec)
    for attrs in found:
        assert {k: getattr(attrs, k) for k in form} == form
    same(spec, std_inputs(call, 70), kernels=("step", "chunked", "blocked") if form["drive"] == "outer"
         else ("step", "blocked"))


def test_the_log_decay_is_the_exponent_where_the_decay_is_an_exp():
    """SimpleGLA's γ = exp(logsigmoid(z) / τ): the op reads logsigmoid(z) / τ (through layout ops), no exp or log."""
    graph = analyse(std_spec("SimpleGLA(x, heads=2)")).graph
    (scan,) = [n for n in graph.order() if graph.node(n)["op"] == "linear_scan"]
    source = graph.node(scan)["inputs"][0][0]
    while graph.node(source)["op"] in ("permute", "heads", "unsqueeze"):
        source = graph.node(source)["inputs"][0][0]
    assert (graph.node(source)["op"], graph.node(source)["attrs"].fn) == ("binary", "div")


def test_retnets_fixed_decays_are_proven_positive_by_their_bounds():
    """γ_h = 1 − 2^{−5−h}, h = 0..heads−1, lies in [1 − 2^{−5}, 1 − 2^{−6−heads}]: its log is exact."""
    graph = analyse(std_spec("RetNet(x, heads=2)")).graph
    (scan,) = [n for n in graph.order() if graph.node(n)["op"] == "linear_scan"]
    log = graph.node(graph.node(scan)["inputs"][0][0])
    assert log["op"] == "unary" and log["attrs"].fn == "log"


def lowered_scans(spec, params=None):
    """The scans as parallel_scan reads them: after recurrence lowering (-O1), which runs just before it."""
    return [d["attrs"] for d in nodes(spec, params, opt_level=1) if d["op"] == "scan"]


def test_the_gated_delta_rule_is_left_alone():
    spec = std_spec("GatedDeltaNet(x, heads=2)")
    (scan,) = lowered_scans(spec)
    assert scan.cell == "GatedDeltaStep" and recognise(scan) is None
    assert not linear_scans(spec)


@pytest.mark.parametrize("block", sorted(STD))
def test_the_report_is_the_same_at_every_level_but_for_its_kernels(block):
    spec = std_spec(STD[block][0])
    fast, plain = gatedsl.check(spec).model_dump(), gatedsl.check(spec, opt_level=0).model_dump()
    kernels = fast.pop("kernels")
    plain.pop("kernels")
    assert fast == plain
    assert any(k["op"] == "linear_scan" for k in kernels)


def test_explain_lists_each_linear_scan_with_its_kernel(tmp_path, capsys):
    path = tmp_path / "layers.gate"
    path.write_text("import std.linear_rnn\nmodel M() {\n  input x: [B, T, 64]\n  output y = GLA(x, heads=2) + "
                    "HGRN(x, zeros([64])) + RetNet(x, heads=2) + SimpleGLA(x, heads=2) + Mamba(x) + HGRNStack(x)\n}\n")
    assert cli(["compile", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "linear_scan" in out and "chunked" in out and "blocked" in out
    assert all(block in out for block in STD)
    assert cli(["compile", str(path), "--json"]) == 0
    kernels = {k["node"].split(".")[0]: k for k in json.loads(capsys.readouterr().out)["kernels"]
               if k["op"] == "linear_scan"}
    assert set(kernels) == set(STD)
    gla, hgrn = kernels["GLA"], kernels["HGRN"]
    # T is symbolic: the report names the step form and says each call decides by its own T.
    assert gla["kernel"] == hgrn["kernel"] == "step" and gla["target"]["sizes"]["T"] is None
    assert "each call decides" in next(c["why"] for c in gla["candidates"] if c["kernel"] == "step")
    applies = {name: {c["kernel"]: c["applies"] for c in k["candidates"]} for name, k in kernels.items()}
    # one_step runs a call of one token: T unknown here, it is named as what such calls run
    assert applies["GLA"] == {"step": True, "one_step": False, "chunked": True, "blocked": True, "triton": False}
    assert applies["HGRN"] == {"step": True, "one_step": False, "chunked": False, "blocked": True, "triton": False}
    assert gla["decoding"]["kernel"] == hgrn["decoding"]["kernel"] == "one_step"


def test_a_standalone_export_keeps_the_loop():
    unit = analyse(std_spec("GLA(x, heads=2, rank=4)"), standalone=True)
    assert not any(unit.graph.node(n)["op"] == "linear_scan" for n in unit.graph.order())


# ------------------------------------------------------------ written otherwise
CELL = """
cell Step(q: [*, K], k: [*, K], v: [*, V], a: [*, K], state S: [*, K, V]) {{
{body}
}}
model M() {{
  input q: [B, T, 4]
  input k: [B, T, 4]
  input v: [B, T, 3]
  input a: [B, T, 4]
  output o = scan Step(q, k, v, a) over T{how}
}}
"""
GLA = """
  S = unsqueeze(a, -1) * S + einsum("...k,...v->...kv", k, v)
  return einsum("...k,...kv->...v", q, S)
"""
DECAY = "unsqueeze(a, -1) * S"
SAME_FORM = {  # (body, log decay, drive, readout)
    "GLA as in std": (GLA, False, "outer", "einsum"),
    "operands swapped": ("""
  S = einsum("...v,...k->...kv", v, k) + S * unsqueeze(a, -1)
  return einsum("...kv,...k->...v", S, q)
""", False, "outer", "einsum"),
    "explicit letters": (GLA.replace("...k,...v->...kv", "bk,bv->bkv").replace("...k,...kv->...v", "bk,bkv->bv"),
                         False, "outer", "einsum"),
    "decay written as exp(log a)": (GLA.replace(DECAY, "exp(unsqueeze(a, -1)) * S"), True, "outer", "einsum"),
    "decay written as sigmoid": (GLA.replace(DECAY, "unsqueeze(sigmoid(a), -1) * S"), True, "outer", "einsum"),
    "a decay of two factors": (GLA.replace(DECAY, "unsqueeze(sigmoid(a), -1) * (exp(unsqueeze(a, -1)) * S)"),
                               True, "outer", "einsum"),
    "no decay": (GLA.replace(DECAY, "S"), True, "outer", "einsum"),
    "a drive of two terms": (GLA.replace('einsum("...k,...v->...kv", k, v)',
                                         'einsum("...k,...v->...kv", k, v) - einsum("...k,...v->...kv", q, v)'),
                             False, "given", "einsum"),
    "a readout by a product": (GLA.replace('return einsum("...k,...kv->...v", q, S)', "return S * unsqueeze(q, -1)"),
                               False, "outer", "mul"),
    "emits its state": (GLA.replace('  return einsum("...k,...kv->...v", q, S)\n', ""), False, "outer", "none"),
    "a nonlinear drive and decay": (GLA.replace(DECAY, "unsqueeze(tanh(a) * a, -1) * S")
                                       .replace('einsum("...k,...v->...kv", k, v)',
                                                'tanh(einsum("...k,...v->...kv", k, v))'), False, "given", "einsum"),
}
NOT_LINEAR = {  # the loop stays
    "tanh on the state": GLA.replace("S = unsqueeze(a, -1) * S + einsum(\"...k,...v->...kv\", k, v)",
                                     "S = tanh(unsqueeze(a, -1) * S + einsum(\"...k,...v->...kv\", k, v))"),
    "a decay reading the state": GLA.replace(DECAY, "sigmoid(S) * S"),
    "the state squared": GLA.replace(DECAY, "S * S"),
    "a readout of the old state": """
  o = einsum("...k,...kv->...v", q, S)
  S = unsqueeze(a, -1) * S + einsum("...k,...v->...kv", k, v)
  return o
""",
    "a nonlinear readout": GLA.replace('return einsum("...k,...kv->...v", q, S)',
                                       'return tanh(einsum("...k,...kv->...v", q, S))'),
    "a drive reading the state (the delta rule's S k)": GLA.replace(
        'einsum("...k,...v->...kv", k, v)', 'einsum("...k,...v->...kv", k, einsum("...kv,...k->...v", S, k))'),
    "a readout reading the state twice": GLA.replace('return einsum("...k,...kv->...v", q, S)',
                                                     'return einsum("...kv,...kv->...v", S, S)'),
}


def cell_spec(body: str, how: str = "") -> str:
    return CELL.format(body=body, how=how)


def cell_inputs(T: int = 37):
    return [randn(2, T, 4, seed=1), randn(2, T, 4, seed=2), randn(2, T, 3, seed=3), randn(2, T, 4, seed=4) / 2]


@pytest.mark.parametrize("variant", sorted(SAME_FORM))
def test_linear_cells_written_otherwise_are_recognised(variant):
    body, log_decay, drive, readout = SAME_FORM[variant]
    spec = cell_spec(body)
    (attrs,) = linear_scans(spec)
    assert not loops(spec)
    assert (attrs.log_decay, attrs.drive, attrs.readout) == (log_decay, drive, readout)
    gla = attrs.key_readout and drive == "outer" and log_decay
    same(spec, cell_inputs(), kernels=("step", "blocked", "chunked") if gla else ("step", "blocked"))


@pytest.mark.parametrize("variant", sorted(NOT_LINEAR))
def test_other_cells_keep_the_loop(variant):
    spec = cell_spec(NOT_LINEAR[variant])
    (scan,) = lowered_scans(spec)
    assert recognise(scan) is None
    assert not linear_scans(spec)


def test_a_drive_with_dropout_keeps_the_loop():
    """Linear, but a dropout in the cell draws a fresh mask every step: not computed once for all steps."""
    spec = cell_spec(GLA.replace('einsum("...k,...v->...kv", k, v)', 'dropout(einsum("...k,...v->...kv", k, v), 0.5)'))
    assert recognise(lowered_scans(spec)[0]) is not None
    assert not linear_scans(spec) and len(loops(spec)) == 1


def test_a_second_state_keeps_the_loop():
    spec = """
cell Two(k: [*, K], v: [*, V], a: [*, K], state S: [*, K, V], state n: [*, K]) {
  S = unsqueeze(a, -1) * S + einsum("...k,...v->...kv", k, v)
  n = a * n + k
}
model M() {
  input k: [B, T, 4]
  input v: [B, T, 3]
  input a: [B, T, 4]
  output o = scan Two(k, v, a) over T
}
"""
    (scan,) = lowered_scans(spec)
    assert recognise(scan) is None and not linear_scans(spec)


@pytest.mark.parametrize("how", [" reverse", " last", " reverse last"])
def test_reversed_and_last_step_scans(how):
    body = SAME_FORM["decay written as exp(log a)"][0]
    spec = cell_spec(body, how)
    (attrs,) = linear_scans(spec)
    assert (attrs.reverse, attrs.last) == ("reverse" in how, "last" in how)
    same(spec, cell_inputs(), kernels=("step", "blocked", "chunked"))


def test_initial_and_final_states():
    body = SAME_FORM["decay written as exp(log a)"][0]
    spec = cell_spec(body).replace("  output o = scan Step(q, k, v, a) over T\n",
                                   "  input S0: [B, 4, 3]\n  o, S_T = scan Step(q, k, v, a, S=S0) over T\n"
                                   "  output o\n  output S_T\n")
    assert linear_scans(spec)
    same(spec, cell_inputs() + [randn(2, 4, 3, seed=9)], kernels=("step", "blocked", "chunked"))


def test_decays_the_same_at_every_step_and_steps_on_another_axis():
    """A decay passed whole (not sliced: the same every step), and sequences whose steps are on axis 0."""
    spec = cell_spec(SAME_FORM["decay written as exp(log a)"][0]).replace(
        "  input a: [B, T, 4]\n", "  input a: [B, 4]\n")
    assert linear_scans(spec)
    inputs = cell_inputs()
    same(spec, inputs[:3] + [inputs[3][:, 0]], kernels=("step", "blocked", "chunked"))
    # A readout by a constant q (the scan's first argument is a sequence: the IR sizes its steps from it).
    spec = cell_spec(SAME_FORM["decay written as exp(log a)"][0])
    spec = spec.replace("  input q: [B, T, 4]\n", "  input q: [B, 4]\n").replace("Step(q, k, v, a)", "Step(k, v, a, q)")
    spec = spec.replace("Step(q: [*, K], k: [*, K], v: [*, V], a: [*, K]",
                        "Step(k: [*, K], v: [*, V], a: [*, K], q: [*, K]")
    (attrs,) = linear_scans(spec)
    assert attrs.key_readout
    same(spec, [inputs[0][:, 0]] + inputs[1:], kernels=("step", "blocked", "chunked"))
    spec = """
import std.linear_rnn
model M() {
  input i: [T, B, 5]
  input f: [T, B, 5]
  output h = scan HGRNStep(i, sigmoid(f)) over T
}
"""
    (attrs,) = linear_scans(spec)
    assert attrs.log_decay  # the sigmoid's log is logsigmoid
    same(spec, [randn(9, 2, 5, seed=1), randn(9, 2, 5, seed=2)])


@pytest.mark.parametrize("decay,positive", [("tanh(a)", False), ("relu(a)", False), ("a", False),
                                            ("0.9 * sigmoid(a)", False), ("1 - 0.5 * sigmoid(a)", True),
                                            ("exp(a)", True), ("sigmoid(a)", True)])
def test_the_log_space_form_needs_a_decay_proven_positive(decay, positive):
    """A decay that can be 0 or negative (tanh, relu, an input) or underflow to 0 (0.9 σ) is never logged: the
    chunked form does not apply and another runs, exactly; one bounded away from 0 (1 − σ/2 ≥ 1/2) is."""
    spec = cell_spec(GLA.replace(DECAY, f"unsqueeze({decay}, -1) * S"))
    (attrs,) = linear_scans(spec)
    assert attrs.log_decay == positive
    (choice,) = [k for k in gatedsl.check(spec, dims={"T": 4096}).kernels if k["op"] == "linear_scan"]
    chunked_candidate = next(c for c in choice["candidates"] if c["kernel"] == "chunked")
    assert chunked_candidate["applies"] == positive
    inputs = cell_inputs()
    if not positive:  # decays of both signs and exact zeros
        assert (torch.tanh(inputs[3]) < 0).any() and (torch.relu(inputs[3]) == 0).any()
    same(spec, inputs, kernels=("step", "blocked", "chunked") if positive else ("step", "blocked"))
