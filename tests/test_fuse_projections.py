"""Projection fusion (passes/fuse_projections.py): linear ops reading one tensor run as one projection_group, and
nothing else changes: outputs and gradients equal the unoptimised compile's in float64, the state_dict is the same
(keys, shapes, order, Parameter objects, checkpoints both ways), the report is the same but for its kernels, and
only projections of the same tensor are fused. The kernels are checked against F.linear written out here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gatedsl
from gatedsl.api import analyse
from gatedsl.cli.main import main as cli
from gatedsl.ir.ops import ProjectionGroupAttrs
from gatedsl.kernels.projection_group.concat import concat, transposed
from gatedsl.kernels.projection_group.reference import separate
from gatedsl.kernels.registry import Context, choose

ROOT = Path(__file__).resolve().parent.parent
DT = torch.float64
# The fused graph computes the same sums in another order (one product over concatenated weights, the
# biases of both projections added before the state product): a few ulps per product in float64; 1e-10
# leaves a margin of about a million, while a wrong weight, bias, slice or step shows at 1e-3 or more.
TOL = dict(rtol=1e-10, atol=1e-10)

# A GRU (torch's form) with an extra output gate, so native_rnn leaves it to the loop; some projections
# without a bias, so groups mix biased and unbiased projections.
GATED_GRU = """
cell GatedGRU(x: [*, D], state h: [*, H]) {
  gate r = sigmoid(linear(x, H) + linear(h, H))
  gate z = sigmoid(linear(x, H, bias=false) + linear(h, H, bias=false))
  gate o = sigmoid(linear(x, H) + linear(h, H, bias=false))
  n = tanh(linear(x, H) + r * linear(h, H))
  h = o * ((1 - z) * n + z * h)
}
model M() {
  input x: [B, T, 3]
  output y = scan GatedGRU(x, H=4) over T
}
"""
# An LSTM with an extra gate e on what enters the memory: five state projections, each added to an input one.
GATED_LSTM = """
cell GatedLSTM(x: [*, D], state h: [*, H], state c: [*, H]) {
  gate i = sigmoid(linear(x, H) + linear(h, H))
  gate f = sigmoid(linear(x, H) + linear(h, H, bias=false))
  g = tanh(linear(x, H, bias=false) + linear(h, H))
  gate o = sigmoid(linear(x, H) + linear(h, H))
  gate e = sigmoid(linear(x, H) + linear(h, H))
  c = f * c + e * i * g
  h = o * tanh(c)
}
model M() {
  input x: [B, T, 3]
  y, hT, cT = scan GatedLSTM(x, H=4) over T
  output y
  output cT
}
"""
SWIGLU = ROOT / "specs" / "swiglu.gate"
GATED_ATTENTION = """
import std.attention
model M() {
  input x: [B, T, 8]
  output y = gated_attention(x, heads=2)
}
"""
RHN = ROOT / "benchmarks" / "specs" / "rhn.gate"
MIXED = """
model M() {
  input x: [B, 5]
  a = linear(x, 3)
  b = linear(x, 4, bias=false)
  c = linear(x, 2)
  output y = concat([tanh(a), b, c * a[..., :2]])
}
"""
# A scan inside a cell: the inner cell's concatenated weights are built before the outer loop too.
NESTED = """
cell Inner(x: [*, D], state h: [*, H]) {
  gate z = sigmoid(linear(x, H) + linear(h, H))
  h = z * tanh(linear(x, H) + linear(h, H, bias=false)) + (1 - z) * h
}
cell Outer(xs: [*, S, D], state g: [*, H]) {
  y = scan Inner(xs, h=g) over -2 last
  gate r = sigmoid(linear(y, H) + linear(g, H))
  g = r * tanh(linear(y, H) + linear(g, H)) + (1 - r) * g
}
model M() {
  input x: [B, T, S, 3]
  output y = scan Outer(x, H=4) over T
}
"""
# Two state projections, one marked as a gate: a group in the body whose marked member is read through a view.
MARKED_STATE = """
cell C(x: [*, D], state h: [*, H]) {
  gate linear g = linear(h, H)
  k = linear(h, H, bias=false)
  h = tanh(k * g + linear(x, H))
}
model M() {
  input x: [B, T, 3]
  output y = scan C(x, H=4) over T
}
"""
CASES = {
    "gated GRU": (GATED_GRU, {}, [(2, 6, 3)]),
    "a state projection marked as a gate": (MARKED_STATE, {}, [(2, 5, 3)]),
    "gated GRU reversed, last step": (GATED_GRU.replace("over T", "over T reverse last"), {}, [(2, 6, 3)]),
    "gated GRU, steps first, two batch dims": (GATED_GRU.replace("input x: [B, T, 3]", "input x: [T, A, B, 3]"), {},
                                               [(5, 2, 3, 3)]),
    "MGU": (ROOT / "benchmarks" / "specs" / "mgu.gate", {"d": 3, "hidden": 4}, [(2, 5, 3)]),
    "nested scans": (NESTED, {}, [(2, 4, 3, 3)]),
    "gated LSTM": (GATED_LSTM, {}, [(2, 5, 3)]),
    "SwiGLU": (SWIGLU, {"d": 8, "hidden": 12}, [(2, 3, 8)]),
    "gated attention": (GATED_ATTENTION, {}, [(2, 5, 8)]),
    "RHN depth 2": (RHN, {"d": 3, "hidden": 4, "depth": 2}, [(2, 5, 3)]),
    "mixed biases": (MIXED, {}, [(4, 5)]),
}


def _compile(spec, params, level, seed=0):
    torch.manual_seed(seed)
    return gatedsl.compile(spec, params, opt_level=level).double()


def _groups(graph):
    """The attrs of every projection_group node, scan bodies' included, in graph order."""
    found = []
    for n in graph.order():
        data = graph.node(n)
        if data["op"] == "projection_group":
            found.append(data["attrs"])
        body = data["attrs"].__dict__.get("body")
        if body is not None and hasattr(body, "order"):
            found += _groups(body)
    return found


def _outputs_and_grads(model, inputs):
    inputs = [x.clone().requires_grad_() for x in inputs]
    out = model(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=DT)).sum() for o in outs)
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads.update({f"input {i}": x.grad for i, x in enumerate(inputs)})
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_unfused(case):
    spec, params, shapes = CASES[case]
    plain, fused = _compile(spec, params, 0), _compile(spec, params, 2, seed=1)
    assert _groups(fused._ir), "nothing was fused: the comparison would prove nothing"
    # The same state_dict: keys, shapes and order; loaded both ways.
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == \
           [(k, v.shape) for k, v in fused.state_dict().items()]
    fused.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(3)
    inputs = [torch.randn(s, generator=gen, dtype=DT) for s in shapes]
    outs0, grads0 = _outputs_and_grads(plain, inputs)
    outs2, grads2 = _outputs_and_grads(fused, inputs)
    for a, b in zip(outs0, outs2):
        torch.testing.assert_close(b, a, **TOL)
    assert grads0.keys() == grads2.keys()
    for name in grads0:
        assert grads2[name] is not None, f"no gradient reaches {name}"
        torch.testing.assert_close(grads2[name], grads0[name], msg=name, **TOL)
    back = _compile(spec, params, 0, seed=2)
    back.load_state_dict(fused.state_dict())
    for a, b in zip(outs0, _outputs_and_grads(back, inputs)[0]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_gated_grus_projections_are_grouped_and_folded():
    """The input projections of r, z, o: one product before the loop, biased by both sides' biases; the state
    projections of r, z, o: one product per step that adds those (addmm); n's keeps its own (r multiplies it)."""
    graph = analyse(GATED_GRU).graph
    top = [graph.node(n) for n in graph.order()]
    (scan,) = [d for d in top if d["op"] == "scan"]
    (inputs,) = [d["attrs"] for d in top if d["op"] == "projection_group"]
    assert inputs.packed and not inputs.addend and inputs.out_features == (12,)
    assert inputs.weights == ("GatedGRU.r.x_proj.weight,GatedGRU.z.x_proj.weight,GatedGRU.o.x_proj.weight",)
    (state,) = _groups(scan["attrs"].body)
    assert state.packed and state.addend and state.weights == tuple(f"GatedGRU.{g}.h_proj.weight" for g in "rzo")
    body_ops = [scan["attrs"].body.node(n)["op"] for n in scan["attrs"].body.order()]
    assert body_ops.count("linear") == 1 and "join" not in body_ops and "param" not in body_ops
    # The folded input projections' sequences are gone, and so is x (only hoisted projections read it); the
    # concatenated ones come in: one sequence, and the state weights as two constants (as they are and
    # transposed, row-major).
    assert scan["attrs"].roles == ("state", "seq", "seq", "const", "const")
    linears = [d["attrs"].weight for d in top if d["op"] == "linear"]
    assert linears == ["GatedGRU.n.x_proj.weight"]


def test_a_gated_lstms_five_state_projections_are_one_product():
    graph = analyse(GATED_LSTM).graph
    (scan,) = [graph.node(n) for n in graph.order() if graph.node(n)["op"] == "scan"]
    (state,) = _groups(scan["attrs"].body)
    assert state.out_features == (4,) * 5 and state.addend
    assert [graph.node(n)["op"] for n in graph.order()].count("linear") == 0


class _CountCat(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.cats = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.cats += func.overloadpacket is torch.ops.aten.cat
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", [GATED_GRU, RHN])
def test_the_concatenated_weights_are_built_once_per_call(spec):
    """Not once per step: the forward's concatenations do not grow with the sequence (a split's backward is one)."""
    params = {"d": 3, "hidden": 4, "depth": 2} if spec is RHN else {}
    model = _compile(spec, params, 2)
    counts = []
    for steps in (2, 7):
        x = torch.randn(2, steps, 3, dtype=DT, requires_grad=True)
        with _CountCat() as mode:
            model(x)
        counts.append(mode.cats)
    assert counts[0] == counts[1] and counts[0] >= 2


def test_parameters_are_the_modules_own():
    """The fused op reads the module's Parameters (no copies): named_parameters, get_parameter and an optimizer step
    all act on what it computes with."""
    plain, fused = _compile(GATED_GRU, {}, 0), _compile(GATED_GRU, {}, 2)
    fused.load_state_dict(plain.state_dict())
    state = fused.state_dict(keep_vars=True)
    assert all(state[name] is p for name, p in fused.named_parameters())
    assert fused.get_parameter("GatedGRU.z.h_proj.weight") is state["GatedGRU.z.h_proj.weight"]
    x = torch.randn(2, 4, 3, dtype=DT)
    for model in (plain, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(fused(x), plain(x), **TOL)
    with torch.no_grad():
        fused.get_parameter("GatedGRU.o.h_proj.weight").add_(1.0)
        plain.get_parameter("GatedGRU.o.h_proj.weight").add_(1.0)
    torch.testing.assert_close(fused(x), plain(x), **TOL)


def test_projections_of_different_tensors_are_not_fused():
    spec = """
model M() {
  input x: [B, 4]
  input u: [B, 4]
  output y = linear(x, 3) + linear(u, 3) + linear(tanh(x), 3)
}
"""
    assert not _groups(analyse(spec).graph)
    # ... and in a cell: MGU's two state projections read h and f ⊙ h: each is only folded with its input projection.
    mgu = analyse(ROOT / "benchmarks" / "specs" / "mgu.gate", {"d": 3, "hidden": 4}).graph
    (scan,) = [mgu.node(n) for n in mgu.order() if mgu.node(n)["op"] == "scan"]
    body = scan["attrs"].body
    groups = [body.node(n) for n in body.order() if body.node(n)["op"] == "projection_group"]
    assert [g["attrs"].weights for g in groups] == [("MGU.f.h_proj.weight",), ("MGU.n.proj.weight",)]
    assert groups[0]["inputs"][0] != groups[1]["inputs"][0] and all(g["attrs"].addend for g in groups)


FOLDABLE = """
cell Cell(x: [*, D], u: [*, H], state h: [*, H]) {
  h = tanh(linear(h, H) + u)
}
model M() {
  input x: [B, T, 3]
  u = linear(x, 4)
  y = scan Cell(x, u) over T
  output y
}
"""


@pytest.mark.parametrize("read_elsewhere", [False, True])
def test_a_sequence_is_folded_into_the_state_product_only_where_nothing_else_reads_it(read_elsewhere):
    spec = FOLDABLE.replace("  output y\n", "  output y\n  output u\n") if read_elsewhere else FOLDABLE
    graph = analyse(spec).graph
    (scan,) = [graph.node(n) for n in graph.order() if graph.node(n)["op"] == "scan"]
    # Folded: one addmm per step; else the state projection stays a linear (alone it is not worth a fused op).
    assert [g.addend for g in _groups(scan["attrs"].body)] == ([] if read_elsewhere else [True])
    ops = [graph.node(n)["op"] for n in graph.order()]
    assert ops.count("linear") == read_elsewhere  # folded: u is computed by the new product alone
    plain, fused = _compile(spec, {}, 0), _compile(spec, {}, 2)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 3, dtype=DT)
    outs0, grads0 = _outputs_and_grads(plain, [x])
    outs2, grads2 = _outputs_and_grads(fused, [x])
    for a, b in zip(outs0, outs2):
        torch.testing.assert_close(b, a, **TOL)
    for name in grads0:
        torch.testing.assert_close(grads2[name], grads0[name], msg=name, **TOL)


GATED_PROJECTION = """
model M() {
  input x: [B, T, 6]
  gate linear g = linear(x, 6)
  v = linear(x, 6)
  gate s = sigmoid(linear(x, 6))
  output y = g * v * s
}
"""


def test_a_projection_marked_as_a_gate_keeps_its_mark():
    graph = analyse(GATED_PROJECTION).graph
    (group,) = _groups(graph)
    assert len(group.out_features) == 3
    marked = [graph.node(n) for n in graph.order() if graph.node(n)["gate"] is not None]
    assert [d["op"] for d in marked][0] == "index" and marked[0]["gate"].kind == "linear"
    reports = [gatedsl.check(GATED_PROJECTION, opt_level=level) for level in (0, 2)]
    assert [g.name for g in reports[1].gates] == ["g", "s"]
    _assert_same_report(reports[0], reports[1])
    plain, fused = _compile(GATED_PROJECTION, {}, 0), _compile(GATED_PROJECTION, {}, 2)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 6, dtype=DT)
    torch.testing.assert_close(fused(x), plain(x), **TOL)


def _assert_same_report(a, b):
    assert a.model_dump(exclude={"kernels"}) == b.model_dump(exclude={"kernels"})


@pytest.mark.parametrize("case", list(CASES))
def test_the_report_is_the_same_but_for_kernels(case):
    spec, params, _ = CASES[case]
    reports = [gatedsl.check(spec, params, opt_level=level) for level in (0, 2)]
    _assert_same_report(*reports)
    assert not [k for k in reports[0].kernels if k["op"] == "projection_group"]
    assert [k for k in reports[1].kernels if k["op"] == "projection_group"]


def test_explain_lists_the_groups_and_their_kernels(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # the table's cells wrap at the terminal's width
    spec = tmp_path / "gru.gate"
    spec.write_text(GATED_GRU)
    assert cli(["compile", str(spec), "--explain"]) == 0
    shown = capsys.readouterr().out
    assert "projection_group" in shown and "r_z_o_h_proj" in shown and "y_all_r_z_o_x_proj" in shown
    assert cli(["compile", str(spec), "--json"]) == 0
    kernels = [k for k in json.loads(capsys.readouterr().out)["kernels"] if k["op"] == "projection_group"]
    assert {k["node"].split(" ")[0] for k in kernels} == {"r_z_o_h_proj", "y_all_r_z_o_x_proj"}
    for k in kernels:  # packed before the loop: one product is cheaper than three
        assert k["kernel"] == "concat"
        assert {c["kernel"] for c in k["candidates"]} == {"concat", "separate", "transposed"}
    (step,) = [k for k in kernels if k["node"].startswith("r_z_o_h_proj")]
    assert [c["applies"] for c in step["candidates"] if c["kernel"] == "transposed"] == [False]  # training
    assert cli(["compile", str(spec), "--json", "--inference"]) == 0
    kernels = {k["node"].split(" ")[0]: k["kernel"] for k in json.loads(capsys.readouterr().out)["kernels"]
               if k["op"] == "projection_group"}
    assert kernels == {"r_z_o_h_proj": "transposed", "y_all_r_z_o_x_proj": "concat"}



# ------------------------------------------------------------------ kernels
def _config(out, biases, packed=False, addend=False, d_in=5):
    return ProjectionGroupAttrs(in_features=d_in, out_features=tuple(out), biases=tuple(biases),
                                weights=tuple(f"p{j}.weight" for j in range(len(out))), packed=packed,
                                transposed=packed, addend=addend)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("addend", [False, True])
@pytest.mark.parametrize("biases", [(True, False, True), (False, False, False), (True, True, True)])
@pytest.mark.parametrize("lead", [(3,), (2, 3)])
def test_kernels_equal_linear_written_out(packed, addend, biases, lead):
    gen = torch.Generator().manual_seed(7)
    out = (2, 3, 4)
    x = torch.randn(*lead, 5, generator=gen, dtype=DT, requires_grad=True)
    weights = [torch.randn(o, 5, generator=gen, dtype=DT, requires_grad=True) for o in out]
    bias = [torch.randn(o, generator=gen, dtype=DT, requires_grad=True) if b else None for o, b in zip(out, biases)]
    extra = torch.randn(*lead, sum(out), generator=gen, dtype=DT, requires_grad=True)
    expected = [x @ w.T + (b if b is not None else 0) for w, b in zip(weights, bias)]
    if addend:
        expected = [y + a for y, a in zip(expected, extra.split(out, -1))]
    if packed:
        tensors = [torch.cat(weights), torch.cat(weights).t().contiguous()]
        if any(biases):
            tensors.append(torch.cat([b if b is not None else torch.zeros(o, dtype=DT) for b, o in zip(bias, out)]))
    else:
        tensors = weights + [b for b in bias if b is not None]
    tensors += [extra] if addend else []
    config = _config(out, biases, packed, addend)
    leaves = [x, extra, *weights, *[b for b in bias if b is not None]]
    gen_w = [torch.randn(e.shape, generator=gen, dtype=DT) for e in expected]
    want = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, gen_w)), leaves, allow_unused=True)
    for kernel in (separate, concat, transposed) if packed else (separate, concat):
        got = kernel(config, x, *tensors)
        assert len(got) == 3
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **TOL)
        grads = torch.autograd.grad(sum((g * w).sum() for g, w in zip(got, gen_w)), leaves, allow_unused=True)
        for g, e in zip(grads, want):
            if e is None:
                assert g is None
            else:
                torch.testing.assert_close(g, e, **TOL)


def test_one_projection_returns_a_tensor():
    x, w, a = torch.randn(3, 5, dtype=DT), torch.randn(4, 5, dtype=DT), torch.randn(3, 4, dtype=DT)
    config = _config((4,), (False,), packed=True, addend=True)
    for kernel in (separate, concat, transposed):
        torch.testing.assert_close(kernel(config, x, w, w.t().contiguous(), a), F.linear(x, w) + a, **TOL)


def _ctx(tokens, d_in, widths, training, packed=False):
    return Context("cpu", "float32", training, (("tokens", tokens), ("in", d_in), ("out", sum(widths)),
                                                 ("projections", len(widths)), ("biases", 0), ("packed", int(packed)),
                                                 ("transposed", int(packed)), ("addend", 0)))


def test_the_cost_rule():
    """Concatenating pays where the activations outweigh the weights; a wide MLP on a few thousand tokens keeps its
    products separate (copying 23 MB of weights per call costs more than reading x twice); packed weights always pay."""
    for training in (False, True):
        assert choose("projection_group", _ctx(2048, 1024, (2816, 2816), training)).kernel == "separate"
        assert choose("projection_group", _ctx(4096, 256, (256,) * 4, training)).kernel == "concat"
        assert choose("projection_group", _ctx(None, 256, (256,) * 3, training)).kernel == "concat"
        # Packed before a loop: one product; on the row-major copy of the weights where no gradient flows.
        step = choose("projection_group", _ctx(32, 256, (256,) * 4, training, packed=True)).kernel
        assert step == ("concat" if training else "transposed")
    assert choose("projection_group", _ctx(4096, 256, (256,) * 4, False, packed=True)).kernel == "concat"
