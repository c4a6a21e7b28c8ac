"""Never different: every spec compiled at -O0 and at full optimisation computes the same outputs and gradients,
with the same state_dict (checkpoints load both ways); and each optimisation rewrites what it claims to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import gatedsl
from gatedsl.api import analyse
from gatedsl.passes import MAX_OPT_LEVEL, OPTIMIZATIONS, PIPELINE

ROOT = Path(__file__).resolve().parent.parent
DIMS = {"B": 2, "T": 5}  # small: the comparison is exact up to rounding at any size

# (spec, parameter overrides): every model under specs/ and specs/zoo/ and every example spec, and every std cell
# through a scan.
CASES = [(path, {}) for path in sorted((ROOT / "specs").glob("*.gate"))]
CASES += [(path, {}) for path in sorted((ROOT / "specs" / "zoo").glob("*.gate"))]
CASES += [(ROOT / "specs" / "zoo" / "gla.gate", {"tie_word_embeddings": True, "use_short_conv": True})]
CASES += [(ROOT / "specs" / "gru.gate", {"layers": 2, "bidirectional": True, "initial_state": True})]
CASES += [(ROOT / "specs" / "lstm.gate", {"layers": 2, "bidirectional": True})]
CASES += [(ROOT / "specs" / "lstm.gate", {"initial_state": True})]
CASES += [(path, {}) for path in sorted((ROOT / "examples").glob("*.gate"))]
CASES += [(ROOT / "examples" / "lstm_char_lm.gate", {"cell": cell, "vocab": 11, "d": 8, "layers": 2})
          for cell in ("GRU", "GRUOriginal", "MGU", "RHN", "IndRNN", "TimescaleRNN")]

# float64 throughout. The optimised graph computes the same expressions; what changes is how matrix
# products are blocked (one [B*T, D] product for all steps instead of one [B, D] product per step),
# which reassociates sums: a few ulps (~1e-16 relative) per product, carried through a few steps and
# layers. 1e-10 leaves a margin of about a million over that, while any real difference (a wrong weight,
# step, order or gate) shows at 1e-3 or more.
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _case_id(case):
    path, params = case
    return path.parent.name + "/" + path.stem + "".join(f"-{k}={v}" for k, v in params.items())


def _outputs(model, inputs):
    out = model(*inputs)
    outs = list(out) if isinstance(out, tuple) else [out]
    return outs + list(gatedsl.aux_outputs(model).values())


def _run(model, inputs, weights):
    """Outputs, then the gradients of a fixed random combination of the float outputs wrt each weight and float input."""
    inputs = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = _outputs(model, inputs)
    loss = sum((torch.nan_to_num(o) * w).sum() for o, w in zip(outs, weights) if o.is_floating_point())
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    grads.update({f"input {i}": x.grad for i, x in enumerate(inputs) if x.is_floating_point()})
    return [o.detach() for o in outs], grads


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_optimised_equals_unoptimised(case):
    path, params = case
    torch.manual_seed(0)
    plain = gatedsl.compile(path, params, opt_level=0).double().eval()
    fast = gatedsl.compile(path, params, opt_level=MAX_OPT_LEVEL).double().eval()
    # Checkpoints move between the two, both ways: the same keys in the same order, the same shapes.
    assert [(k, v.shape) for k, v in plain.state_dict().items()] == \
           [(k, v.shape) for k, v in fast.state_dict().items()]
    fast.load_state_dict(plain.state_dict())
    again = gatedsl.compile(path, params, opt_level=0).double().eval()
    again.load_state_dict(fast.state_dict())
    inputs = gatedsl.example_inputs(plain.meta["gatedsl_report"], dims=DIMS, dtype=torch.float64, vocab=5)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) if o.is_floating_point() else None
               for o in _outputs(plain, inputs)]
    outs0, grads0 = _run(plain, inputs, weights)
    outs2, grads2 = _run(fast, inputs, weights)
    outs1, _ = _run(again, inputs, weights)
    assert len(outs0) == len(outs2)
    for a, b, c in zip(outs0, outs2, outs1):
        torch.testing.assert_close(b, a, equal_nan=True, **TOL)
        torch.testing.assert_close(c, a, equal_nan=True, rtol=0, atol=0)
    assert grads0.keys() == grads2.keys()
    for name in grads0:
        if grads0[name] is None:
            assert grads2[name] is None or not grads2[name].any(), name
        else:
            torch.testing.assert_close(grads2[name], grads0[name], msg=name, **TOL)


# ------------------------------------------------------------------ levels
def test_opt_levels_gate_the_optimisations():
    assert all(p in PIPELINE for p in OPTIMIZATIONS)
    first_optimisation = min(PIPELINE.index(p) for p in OPTIMIZATIONS)
    counting = max(PIPELINE.index(p) for p in PIPELINE if p.__name__.startswith("count_"))
    assert counting < first_optimisation  # reports are the same at every level
    reports = [gatedsl.check(ROOT / "specs" / "gru.gate", opt_level=level, dims=DIMS).model_dump()
               for level in range(3)]
    kernels = [r.pop("kernels") for r in reports]  # how each scan runs is what the levels change
    assert reports[0] == reports[1] == reports[2]
    assert [[k["kernel"] for k in ks] for ks in kernels] == [["loop"], ["loop"], ["torch.GRU"]]
    with pytest.raises(ValueError, match="opt_level"):
        gatedsl.compile(ROOT / "specs" / "gru.gate", opt_level=3)


def test_cli_takes_opt_levels(capsys):
    from gatedsl.cli.main import main

    for flag in ("-O0", "-O1", "-O2"):
        assert main(["compile", flag, str(ROOT / "specs" / "gru.gate"), "--json"]) == 0
    capsys.readouterr()
    assert main(["compile", "-O7", str(ROOT / "specs" / "gru.gate")]) == 2


# ------------------------------------------------------------ recurrence lowering
def _scan_bodies(graph):
    return [graph.node(n)["attrs"].body for n in graph.order() if graph.node(n)["op"] == "scan"]


def _ops(graph):
    return [graph.node(n)["op"] for n in graph.order()]


@pytest.mark.parametrize("cell,hoisted", [("LSTM", 4), ("GRU", 3), ("GRUOriginal", 3), ("MGU", 2),
                                          ("IndRNN", 1), ("TimescaleRNN", 1), ("RHN", 2)])
def test_input_projections_leave_the_loop(cell, hoisted):
    """Every projection of the sliced input moves out of the body; every projection of a state stays in it."""
    spec = ROOT / "examples" / "lstm_char_lm.gate"
    params = {"cell": cell, "vocab": 11, "d": 8, "layers": 1}
    before = _scan_bodies(analyse(spec, params, opt_level=0).graph)
    unit = analyse(spec, params, opt_level=1)
    after = _scan_bodies(unit.graph)
    assert len(before) == len(after) == 1
    x_projections = [n for n in before[0].order() if before[0].node(n)["op"] == "linear"
                     and ".x_proj." in before[0].node(n)["attrs"].weight]
    assert len(x_projections) == hoisted
    assert _ops(after[0]).count("linear") == _ops(before[0]).count("linear") - hoisted
    assert all(".x_proj." not in after[0].node(n)["attrs"].weight for n in after[0].order()
               if after[0].node(n)["op"] == "linear")
    # ... and now run once over the whole sequence, before the scan, which reads them as sequences.
    top = unit.graph
    scan = next(n for n in top.order() if top.node(n)["op"] == "scan")
    outside = [n for n in top.order() if n < scan and top.node(n)["op"] == "linear"
               and ".x_proj." in top.node(n)["attrs"].weight]
    assert len(outside) == hoisted
    # The sliced input itself is passed only where the loop still reads it (not just the hoisted projections).
    body = after[0]
    x_input = dict(body.inputs).get(before[0].inputs[0][0])
    read = {src for n in body.order() for src, _ in body.node(n)["inputs"]}
    assert x_input is None or x_input in read
    assert top.node(scan)["attrs"].roles.count("seq") == hoisted + (x_input is not None)
    # The learned tensors are still declared by the cell, where the report counts them.
    assert analyse(spec, params, opt_level=0).params_by_block == unit.params_by_block


def test_projections_of_constant_arguments_run_once():
    spec = """
cell Ctx(x: [*, D], ctx: [*, C], state h: [*, H]) {
  h = tanh(linear(x, H) + linear(ctx, H, bias=false) + h)
}
model M() {
  input x: [B, T, 3]
  input c: [B, 5]
  output y = scan Ctx(x, c, H=4) over T
}
"""
    unit = analyse(spec, opt_level=1)
    (body,) = _scan_bodies(unit.graph)
    assert "linear" not in _ops(body)
    scan = next(n for n in unit.graph.order() if unit.graph.node(n)["op"] == "scan")
    # x and c are read only by the hoisted projections, so the loop gets those alone: x's per step, c's once.
    assert unit.graph.node(scan)["attrs"].roles == ("state", "seq", "const")
    plain, fast = (gatedsl.compile(spec, opt_level=level).double() for level in (0, 2))
    fast.load_state_dict(plain.state_dict())
    x, c = torch.randn(2, 7, 3, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(fast(x, c), plain(x, c), **TOL)


# ------------------------------------------------------------ native kernels
def _kernels(spec, params=None, opt_level=MAX_OPT_LEVEL):
    graph = analyse(spec, params, opt_level=opt_level).graph
    return [graph.node(n)["attrs"].kernel for n in graph.order() if graph.node(n)["op"] == "scan"]


def test_std_gru_and_lstm_run_on_the_native_kernels():
    for spec, kernel in (("gru.gate", "gru"), ("lstm.gate", "lstm")):
        params = {"layers": 2, "bidirectional": True}
        assert _kernels(ROOT / "specs" / spec, params) == [kernel] * 4
        assert _kernels(ROOT / "specs" / spec, params, opt_level=1) == ["loop"] * 4


CUSTOM = """
import std.cells
cell {name}(x: [*, D], state h: [*, H]{extra_state}) {{
{body}
}}
model M() {{
  input x: [B, T, 3]
  output y = scan {name}(x, H=4) over T{how}
}}
"""
GRU_BODY = """
  gate r = sigmoid(linear(x, H) + linear(h, H))
  gate z = sigmoid(linear(x, H) + linear(h, H))
  n = tanh(linear(x, H) + r * linear(h, H))
  h = (1 - z) * n + z * h
"""
LSTM_BODY = """
  gate i = sigmoid(linear(x, H) + linear(h, H))
  gate f = sigmoid(linear(x, H) + linear(h, H))
  g = tanh(linear(x, H) + linear(h, H))
  gate o = sigmoid(linear(x, H) + linear(h, H))
  c = f * c + i * g
  h = o * tanh(c)
"""
SAME_GRU = {  # torch's GRU, written otherwise: recognised
    "operands swapped": GRU_BODY.replace("linear(x, H) + linear(h, H)", "linear(h, H) + linear(x, H)")
                                .replace("z * h\n", "h * z\n"),
    "no biases": GRU_BODY.replace("linear(x, H)", "linear(x, H, bias=false)")
                         .replace("linear(h, H)", "linear(h, H, bias=false)"),
}
NOT_GRU = {  # any difference keeps the loop
    "relu for tanh": GRU_BODY.replace("tanh(", "relu("),
    "r inside the projection": GRU_BODY.replace("r * linear(h, H)", "linear(r * h, H)"),
    "z and r swapped in the update": GRU_BODY.replace("(1 - z) * n + z * h", "(1 - r) * n + r * h"),
    "the update flipped": GRU_BODY.replace("(1 - z) * n + z * h", "z * n + (1 - z) * h"),
    "some biases only": GRU_BODY.replace("r * linear(h, H)", "r * linear(h, H, bias=false)"),
    "an extra gate": GRU_BODY.replace("  h = (1 - z)", "  gate e = sigmoid(linear(x, H))\n  h = e * (1 - z)"),
    "a shared projection": GRU_BODY.replace("gate z = sigmoid(linear(x, H) + linear(h, H))", "gate z = r"),
}


def _custom(body, name="Cell", how="", lstm=False):
    return CUSTOM.format(name=name, body=body, how=how, extra_state=", state c: [*, H]" if lstm else "")


def _same(spec, *inputs):
    plain, fast = (gatedsl.compile(spec, opt_level=level).double() for level in (0, MAX_OPT_LEVEL))
    fast.load_state_dict(plain.state_dict())
    inputs = [x.requires_grad_() for x in inputs]
    gen = torch.Generator().manual_seed(3)
    results = []
    for model in (plain, fast):
        out = model(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        weights = [torch.randn(o.shape, generator=gen.manual_seed(3), dtype=torch.float64) for o in outs]
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)),
                                    inputs + list(model.parameters()),
                                    allow_unused=True, materialize_grads=True)  # a spec's dead weights
        results.append((outs, grads))
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(b, a, **TOL)


@pytest.mark.parametrize("variant", sorted(SAME_GRU))
def test_torch_gru_written_otherwise_is_recognised(variant):
    spec = _custom(SAME_GRU[variant])
    assert _kernels(spec) == ["gru"]
    _same(spec, torch.randn(2, 6, 3, dtype=torch.float64))


@pytest.mark.parametrize("variant", sorted(NOT_GRU))
def test_other_cells_keep_the_loop(variant):
    spec = _custom(NOT_GRU[variant])
    assert _kernels(spec) == ["loop"]
    _same(spec, torch.randn(2, 6, 3, dtype=torch.float64))


@pytest.mark.parametrize("cell", ["GRUOriginal", "MGU", "RHN", "IndRNN", "TimescaleRNN"])
def test_other_std_cells_keep_the_loop(cell):
    assert _kernels(ROOT / "examples" / "lstm_char_lm.gate", {"cell": cell, "vocab": 11, "d": 8}) == ["loop"]


def test_lstm_with_an_extra_gate_keeps_the_loop():
    extra = LSTM_BODY.replace("  c = f * c + i * g", "  gate e = sigmoid(linear(x, H) + linear(h, H))\n"
                                                      "  c = f * c + e * i * g")
    assert _kernels(_custom(LSTM_BODY, lstm=True)) == ["lstm"]
    assert _kernels(_custom(extra, lstm=True)) == ["loop"]
    swapped = LSTM_BODY.replace("h = o * tanh(c)", "h = o * sigmoid(c)")
    assert _kernels(_custom(swapped, lstm=True)) == ["loop"]


@pytest.mark.parametrize("how", ["", " reverse", " last", " reverse last"])
@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_native_kernels_equal_the_loop(cell, how):
    """Outputs, final states and gradients, forward and reversed, every step or the last, with and without
    initial states, and with the steps on another axis than 1 and more than one batch dim."""
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    spec = _custom("", name=cell, how=how).split("cell ")[0] + f"""
model M() {{
  input x: [B, T, 3]
  output y = scan {cell}(x, H=4) over T{how}
}}
"""
    assert _kernels(spec) == [cell.lower()]
    _same(spec, x)
    states = "h=h0, c=c0" if cell == "LSTM" else "h=h0"
    inputs = "input h0: [B, 4]\n  input c0: [B, 4]" if cell == "LSTM" else "input h0: [B, 4]"
    finals = "y, hT, cT" if cell == "LSTM" else "y, hT"
    spec = f"""
import std.cells
model M() {{
  input x: [B, T, 3]
  {inputs}
  {finals} = scan {cell}(x, {states}) over T{how}
  output y
  output hT
}}
"""
    assert _kernels(spec) == [cell.lower()]
    _same(spec, x, *[torch.randn(2, 4, dtype=torch.float64) for _ in range(2 if cell == "LSTM" else 1)])
    spec = f"""
import std.cells
model M() {{
  input x: [T, A, B, 3]
  output y = scan {cell}(x, H=4) over T{how}
}}
"""
    assert _kernels(spec) == [cell.lower()]
    _same(spec, torch.randn(5, 2, 3, 3, dtype=torch.float64))
