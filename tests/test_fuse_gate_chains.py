"""Gate-chain fusion (gatedsl/passes/fuse_gate_chains.py): which element-wise ops become one gate_chain, in the
top-level graph, scan bodies and early-exit stages; what stays out; gate marks and the report unchanged; the fused
model computes what -O0 does (outputs and gradients, float64)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import gatedsl
from gatedsl.api import analyse
from gatedsl.ir.graph import Graph
from gatedsl.ir.model import Target
from gatedsl.passes import OPTIMIZATIONS, PIPELINE, fuse_gate_chains, select_kernels

from test_optimizer import TOL, _outputs, _run  # the differential test's own comparison

ROOT = Path(__file__).resolve().parent.parent

CUDA = Target(device="cuda", training=False)  # one Triton launch beats two ops there: every chain is fused
DIMS = {"B": 2, "T": 5}


def _chains(graph: Graph) -> list[tuple[Graph, int]]:
    """Every gate_chain node, in scan bodies and stages too, with the graph it is in."""
    out = []
    for n in graph.order():
        data = graph.node(n)
        if data["op"] == "gate_chain":
            out.append((graph, n))
        body = getattr(data["attrs"], "body", None)
        if isinstance(body, Graph):
            out += _chains(body)
    return out


def _fns(graph: Graph, n: int) -> list[str]:
    return [fn for fn, _, _ in graph.node(n)["attrs"].steps if fn != "const"]


def _same_as_unoptimised(spec, params=None, target=CUDA):
    """-O0 and -O2 (for `target`) compute the same outputs and gradients in float64, with the same weights."""
    torch.manual_seed(0)
    plain = gatedsl.compile(spec, params, opt_level=0).double().eval()  # eval: noise_like off, as in test_optimizer
    fast = gatedsl.compile(spec, params, target=target).double().eval()
    fast.load_state_dict(plain.state_dict())
    inputs = gatedsl.example_inputs(plain.meta["gatedsl_report"], dims=DIMS, dtype=torch.float64, vocab=5)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) if o.is_floating_point() else None
               for o in _outputs(plain, inputs)]
    outs0, grads0 = _run(plain, inputs, weights)
    outs2, grads2 = _run(fast, inputs, weights)
    for a, b in zip(outs0, outs2):
        torch.testing.assert_close(b, a, equal_nan=True, **TOL)
    for name in grads0:
        if grads0[name] is None:
            assert grads2[name] is None or not grads2[name].any(), name
        else:
            torch.testing.assert_close(grads2[name], grads0[name], msg=name, **TOL)


def test_the_pass_runs_last_before_kernel_selection_from_o2():
    assert PIPELINE.index(fuse_gate_chains) == PIPELINE.index(select_kernels) - 1
    assert OPTIMIZATIONS[fuse_gate_chains] == 2
    assert not _chains(analyse(ROOT / "specs" / "swiglu.gate", opt_level=1, target=CUDA).graph)


# ------------------------------------------------------------ what fuses
GATED_CELL = """
cell Cell(x: [*, D], state h: [*, H]) {       # a GRU with an output gate: no native kernel
  gate r = sigmoid(linear(x, H) + linear(h, H))
  gate z = sigmoid(linear(x, H) + linear(h, H))
  gate o = sigmoid(linear(x, H) + linear(h, H))
  n = tanh(linear(x, H) + r * linear(h, H))
  h = o * ((1 - z) * n + z * h)
}
model M() {
  input x: [B, T, 3]
  output y = scan Cell(x, H=4) over T
}
"""


def test_a_gru_like_cells_gate_math_per_step_is_one_op_and_its_gates_stay_listed():
    for target in (CUDA, Target()):  # on the CPU too: its fused kernels pay on this chain
        graph = analyse(GATED_CELL, target=target).graph
        ((body, n),) = _chains(graph)
        assert sorted(set(_fns(body, n))) == ["add", "mul", "sigmoid", "sub", "tanh"]
        assert _fns(body, n).count("sigmoid") == 3
        # Nothing of the gate math is left outside the op (the projections' sums are theirs: addends).
        assert not [m for m in body.order() if body.node(m)["op"] in ("unary", "binary")]
    # The op carries r's mark; views of z and o, which it returns, carry theirs, in the spec's order.
    assert body.node(n)["gate"].name == "Cell.r"
    views = [m for m in body.order() if body.node(m)["op"] == "index"]
    assert [body.node(m)["gate"].name for m in views] == ["Cell.z", "Cell.o"]
    assert [m.name for m in body.gates()] == ["Cell.r", "Cell.z", "Cell.o"]
    assert gatedsl.check(GATED_CELL, opt_level=0).gates == gatedsl.check(GATED_CELL).gates
    _same_as_unoptimised(GATED_CELL)


SWIGLU = """
import std.mlp
model M() {
  input x: [B, T, 8]
  output y = SwiGLU(x, hidden=12)
}
"""


def test_swiglu_is_one_op_carrying_its_gate_without_returning_it():
    # For the CPU at the benchmark's width: large enough (at a nominal batch) for the in-place product to pay.
    for spec, target in ((SWIGLU.replace("hidden=12", "hidden=2816"), Target()), (SWIGLU, CUDA)):
        ((g, n),) = _chains(analyse(spec, target=target).graph)
        assert _fns(g, n) == ["silu", "mul"] and len(g.node(n)["attrs"].outputs) == 1
        assert g.node(n)["gate"].name == "SwiGLU.g"
    assert not _chains(analyse(SWIGLU).graph)  # 12 wide, it does not pay on the CPU
    _same_as_unoptimised(SWIGLU)


def test_a_value_read_outside_the_chain_is_one_of_its_outputs():
    spec = """
model M() {
  input x: [B, 6]
  a = tanh(x) * 2
  output y = linear(a, 3) + linear(sigmoid(a) * x, 3)
}
"""
    graph = analyse(spec, target=CUDA).graph
    ((g, n),) = _chains(graph)
    assert _fns(g, n) == ["tanh", "mul", "sigmoid", "mul"]
    assert len(g.node(n)["attrs"].outputs) == 2  # a, for the first projection, and sigmoid(a) * x
    readers = {port for m in g.order() for port in g.node(m)["inputs"] if port[0] == n}
    assert readers == {(n, 0), (n, 1)}
    _same_as_unoptimised(spec)


def test_ops_that_are_not_element_wise_end_chains_and_chains_stay_convex():
    spec = """
model M() {
  input x: [B, 6]
  a = sigmoid(x)
  b = linear(a, 6)
  output y = a * tanh(b) + x
}
"""
    graph = analyse(spec, target=CUDA).graph
    # sigmoid(x) feeds the product both directly and through the projection: one op for all three would
    # have to run before and after the projection. It stays out; tanh, the product and the sum fuse.
    ((g, n),) = _chains(graph)
    assert _fns(g, n) == ["tanh", "mul", "add"]
    assert "unary" in [graph.node(m)["op"] for m in graph.order()]  # the sigmoid, on its own
    _same_as_unoptimised(spec)


def test_a_single_op_is_left_alone():
    spec = """
model M() {
  input x: [B, 6]
  output y = linear(sigmoid(linear(x, 6)), 2)
}
"""
    assert not _chains(analyse(spec, target=CUDA).graph)


def test_operands_broadcast_into_a_chain_and_smaller_values_form_their_own():
    spec = """
model M() {
  input x: [B, 6]
  s = sigmoid(learned([6], init=normal(1.0))) * 2    # [6]: a chain of its own shape
  gate t = sigmoid(tanh(x) + learned([6]))           # a [6] operand broadcast into the [B, 6] chain
  output y = t * exp(x) * s + 0.5
}
"""
    graph = analyse(spec, target=CUDA).graph
    chains = {tuple(_fns(g, n)): (g, n) for g, n in _chains(graph)}
    assert set(chains) == {("sigmoid", "mul"), ("tanh", "add", "sigmoid", "exp", "mul", "mul", "add")}
    g, n = chains[("tanh", "add", "sigmoid", "exp", "mul", "mul", "add")]
    shapes = sorted(tuple(map(str, g.type_of(p).shape)) for p in g.node(n)["inputs"])
    assert shapes == [("6",), ("6",), ("B", "6")]  # the learned bias, s, and x
    _same_as_unoptimised(spec)


def test_comparisons_stay_out_and_where_takes_their_result():
    spec = """
model M() {
  input x: [B, 6]
  input k: int[B, 6]
  output y = where(x > 0, tanh(x), sigmoid(x) * 0.5) + to_float(k * 2)
}
"""
    graph = analyse(spec, target=CUDA).graph
    ((g, n),) = _chains(graph)
    assert _fns(g, n) == ["tanh", "sigmoid", "mul", "where", "add"]
    kinds = [g.type_of(p).dtype for p in g.node(n)["inputs"]]
    assert kinds.count("bool") == 1 and "int" not in kinds  # x > 0 comes in; k * 2 (int) stays out
    _same_as_unoptimised(spec)


def test_a_chain_that_would_reorder_the_gates_is_left_unfused():
    spec = """
model M() {
  input x: [B, 6]
  gate r = sigmoid(x)
  gate softmax g = softmax(x)           # between r and z, and z's projection reads it
  gate z = sigmoid(linear(g, 6))
  output y = r * z
}
"""
    # r, z and the product are one convex chain, but its op must run after g's projection: r's mark would
    # move past g's. The report lists the gates as the spec does, so that chain stays as written.
    graph = analyse(spec, target=CUDA).graph
    assert all(_fns(g, n) != ["sigmoid", "sigmoid", "mul"] for g, n in _chains(graph))
    assert [m.name for m in graph.gates()] == ["r", "g", "z"]
    assert gatedsl.check(spec, opt_level=0).gates == gatedsl.check(spec, target=CUDA).gates
    _same_as_unoptimised(spec)


def test_stages_of_an_early_exit_cascade_fuse_too():
    spec = """
model M() {
  input x: [B, 6]
  y, exit_at, ys, gs = cascade l in 3 {
    h = x * sigmoid(linear(x, 6)) + tanh(linear(x, 6))
    x = h
    gate g = sigmoid(linear(h, 1))
    exit linear(h, 2) when g > 0.5
  }
  output out = y
  output gates = gs
}
"""
    graph = analyse(spec, target=CUDA).graph
    chains = _chains(graph)
    assert len(chains) == 3 and all(_fns(g, n) == ["sigmoid", "mul", "tanh", "add"] for g, n in chains)
    for mode in ("train", "eval"):
        torch.manual_seed(0)
        plain = gatedsl.compile(spec, opt_level=0).double()
        fast = gatedsl.compile(spec, target=CUDA).double()
        fast.load_state_dict(plain.state_dict())
        getattr(plain, mode)()
        getattr(fast, mode)()
        x = torch.randn(7, 6, dtype=torch.float64)
        for a, b in zip(plain(x), fast(x)):
            torch.testing.assert_close(b, a, equal_nan=True, **TOL)


def test_native_rnn_bodies_are_left_alone():
    graph = analyse(ROOT / "specs" / "gru.gate", target=CUDA).graph
    assert not _chains(graph)


# ------------------------------------------------------------ the CPU's cost rule
def test_on_the_cpu_a_chain_fuses_only_where_a_fused_kernel_pays():
    mgu = ROOT / "benchmarks" / "specs" / "mgu.gate"
    cpu = [_fns(g, n) for g, n in _chains(analyse(mgu).graph)]
    cuda = [_fns(g, n) for g, n in _chains(analyse(mgu, target=CUDA).graph)]
    # The gate σ(...) and f ⊙ h (before U's projection): nothing for the CPU to fuse away, a dispatch to add;
    # the candidate's tanh and the update (1 − f, two products, a sum: a lerp) shrink, and fuse.
    gate = [fns for fns in cuda if "tanh" not in fns]
    assert len(cuda) == 2 and gate and "sigmoid" in gate[0]
    assert len(cpu) == 1 and "tanh" in cpu[0] and "sub" in cpu[0]


# ------------------------------------------------------------ never different
SPECS = sorted((ROOT / "specs").glob("*.gate")) + sorted((ROOT / "examples").glob("*.gate")) + \
    sorted((ROOT / "benchmarks" / "specs").glob("*.gate"))


@pytest.mark.parametrize("spec", SPECS, ids=[p.parent.name + "/" + p.stem for p in SPECS])
def test_the_report_is_the_same_but_for_the_kernels(spec):
    before = gatedsl.check(spec, opt_level=0, dims=DIMS).model_dump()
    before.pop("kernels")
    for target in (Target(), CUDA):
        after = gatedsl.check(spec, dims=DIMS, target=target).model_dump()
        after.pop("kernels")
        assert after == before


MANY_CHAINS = [(ROOT / "examples" / "moe_transformer.gate", {}), (ROOT / "examples" / "rhn_hybrid.gate", {}),
               (ROOT / "examples" / "gla_lm.gate", {}), (ROOT / "examples" / "mamba_model.gate", {}),
               (ROOT / "specs" / "forecaster.gate", {})]
MANY_CHAINS += [(ROOT / "examples" / "lstm_char_lm.gate", {"cell": cell, "vocab": 11, "d": 8, "layers": 2})
                for cell in ("GRUOriginal", "MGU", "TimescaleRNN", "IndRNN")]


@pytest.mark.parametrize("case", MANY_CHAINS, ids=[p.stem + "".join(f"-{v}" for v in c.values())
                                                    for p, c in MANY_CHAINS])
def test_every_chain_fused_computes_what_o0_does(case):
    spec, params = case
    assert _chains(analyse(spec, params, target=CUDA).graph)
    _same_as_unoptimised(spec, params)


def test_explain_and_json_list_the_chains(capsys):
    from gatedsl.cli.main import main

    assert main(["compile", str(ROOT / "benchmarks" / "specs" / "gru_extra_gate.gate"), "--explain"]) == 0
    shown = capsys.readouterr().out
    assert "gate_chain" in shown and "r_z_o_h" in shown
    assert main(["compile", str(ROOT / "benchmarks" / "specs" / "gru_extra_gate.gate"), "--json"]) == 0
    kernels = json.loads(capsys.readouterr().out)["kernels"]
    (chain,) = [k for k in kernels if k["op"] == "gate_chain"]
    assert chain["kernel"] == "autograd" and {c["kernel"] for c in chain["candidates"]} == \
        {"reference", "torch", "autograd", "triton"}
