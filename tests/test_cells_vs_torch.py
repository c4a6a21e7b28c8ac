"""The std GRU and LSTM cells, scanned by specs/gru.gate and specs/lstm.gate, equal torch.nn.GRU / torch.nn.LSTM.

The reference is torch's own module with the same weights, in float64: outputs, final
states, and gradients with respect to the inputs, the initial states and every weight.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

import gatedsl

SPECS = Path(__file__).resolve().parent.parent / "specs"
TOL = dict(rtol=1e-10, atol=1e-10)
GATES = {"GRU": ("r", "z", "n"), "LSTM": ("i", "f", "g", "o")}
SHAPES = [  # batch, time, input size, hidden size
    (1, 1, 3, 4),
    (1, 6, 2, 5),
    (3, 1, 4, 3),
    (4, 7, 5, 6),
]


def build(kind: str, batch_time_in_hidden, layers: int, bidirectional: bool, initial_state: bool, seed: int):
    """torch's layer and the compiled spec, in float64, with torch's (random) weights loaded into the spec."""
    _, _, d_in, hidden = batch_time_in_hidden
    torch.manual_seed(seed)
    ref = getattr(nn, kind)(d_in, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True).double()
    spec = SPECS / f"{kind.lower()}.gate"
    model = gatedsl.compile(spec, params=dict(input_size=d_in, hidden=hidden, layers=layers,
                                              bidirectional=bidirectional, initial_state=initial_state)).double()
    gatedsl.load_torch_rnn(model, ref)
    return ref, model


def cell_path(layer: int, direction: int, kind: str) -> str:
    # specs/gru.gate and lstm.gate: `repeat i in layers as layers`, the reversed scan second.
    return f"layers.{layer}.{kind}" + ("_1" if direction else "")


def torch_layout_grads(model, kind: str, layers: int, directions: int) -> dict[str, torch.Tensor]:
    """The spec's weight gradients packed as torch packs its weights (gate rows stacked), by torch's names."""
    out = {}
    for layer, direction in itertools.product(range(layers), range(directions)):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        path = cell_path(layer, direction, kind)
        for torch_name, side, leaf in (("weight_ih", "x", "weight"), ("weight_hh", "h", "weight"),
                                       ("bias_ih", "x", "bias"), ("bias_hh", "h", "bias")):
            out[torch_name + suffix] = torch.cat(
                [model.get_parameter(f"{path}.{g}.{side}_proj.{leaf}").grad for g in GATES[kind]])
    return out


def run_both(kind, shape, layers, bidirectional, initial_state, seed):
    batch, time, d_in, hidden = shape
    directions = 2 if bidirectional else 1
    ref, model = build(kind, shape, layers, bidirectional, initial_state, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, time, d_in, generator=gen, dtype=torch.float64)
    states = [torch.randn(layers * directions, batch, hidden, generator=gen, dtype=torch.float64)
              for _ in range(2 if kind == "LSTM" else 1)] if initial_state else []

    x_ref = x.clone().requires_grad_()
    states_ref = [s.clone().requires_grad_() for s in states]
    if kind == "LSTM":
        y_ref, (h_ref, c_ref) = ref(x_ref, tuple(states_ref) or None)
        outs_ref = [y_ref, h_ref, c_ref]
    else:
        y_ref, h_ref = ref(x_ref, states_ref[0] if states_ref else None)
        outs_ref = [y_ref, h_ref]

    x_ours = x.clone().requires_grad_()
    states_ours = [s.clone().requires_grad_() for s in states]
    outs = list(model(x_ours, *states_ours))

    assert [o.shape for o in outs] == [o.shape for o in outs_ref]
    for ours, theirs in zip(outs, outs_ref):
        torch.testing.assert_close(ours, theirs, **TOL)

    # One random weighting of every output, so each output's gradient path is checked.
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs_ref]
    sum((o * w).sum() for o, w in zip(outs_ref, weights)).backward()
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()

    torch.testing.assert_close(x_ours.grad, x_ref.grad, **TOL)
    for ours, theirs in zip(states_ours, states_ref):
        torch.testing.assert_close(ours.grad, theirs.grad, **TOL)
    packed = torch_layout_grads(model, kind, layers, directions)
    ref_params = dict(ref.named_parameters())
    assert set(packed) == set(ref_params)
    for name, p in ref_params.items():
        torch.testing.assert_close(packed[name], p.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    # Every learned tensor of the spec is one of torch's, so all got compared.
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}D{}H{}".format(*s))
def test_equals_torch(kind, layers, bidirectional, shape):
    run_both(kind, shape, layers, bidirectional, initial_state=False, seed=layers * 10 + bidirectional)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3]], ids=lambda s: "B{}T{}D{}H{}".format(*s))
def test_equals_torch_from_given_states(kind, layers, bidirectional, shape):
    """h0 (and c0) given: the spec's `scan CELL(x, h=h0[j]) over T` against torch's (h0, c0)."""
    run_both(kind, shape, layers, bidirectional, initial_state=True, seed=100 + layers * 10 + bidirectional)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_equals_torch_in_float32(kind):
    """The default dtype as users run it: the same to float32 rounding."""
    shape = (2, 5, 3, 4)
    ref, model = build(kind, shape, layers=2, bidirectional=True, initial_state=False, seed=7)
    ref, model = ref.float(), model.float()
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ load_torch_rnn
@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_load_torch_rnn_writes_each_gate_block(kind):
    """Copy torch's packed matrices by hand, gate by gate, and compare with what load_torch_rnn wrote."""
    shape = (2, 3, 3, 4)
    ref, model = build(kind, shape, layers=2, bidirectional=True, initial_state=False, seed=3)
    hidden = shape[3]
    for layer, direction in itertools.product(range(2), range(2)):
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        path = cell_path(layer, direction, kind)
        for g_index, gate in enumerate(GATES[kind]):
            rows = slice(g_index * hidden, (g_index + 1) * hidden)
            for torch_name, target in (("weight_ih", "x_proj.weight"), ("weight_hh", "h_proj.weight"),
                                       ("bias_ih", "x_proj.bias"), ("bias_hh", "h_proj.bias")):
                expected = getattr(ref, torch_name + suffix)[rows]
                assert torch.equal(model.get_parameter(f"{path}.{gate}.{target}"), expected)


def test_load_torch_rnn_returns_every_parameter():
    ref, model = build("LSTM", (1, 2, 3, 4), layers=2, bidirectional=False, initial_state=False, seed=0)
    written = gatedsl.load_torch_rnn(model, ref)
    assert sorted(written) == sorted(name for name, _ in model.named_parameters())


def test_load_torch_rnn_without_biases_zeroes_them():
    torch.manual_seed(0)
    ref = nn.GRU(3, 4, bias=False, batch_first=True).double()
    model = gatedsl.compile(SPECS / "gru.gate", params=dict(input_size=3, hidden=4)).double()
    gatedsl.load_torch_rnn(model, ref)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(model(x)[0], ref(x)[0], **TOL)
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if n.endswith("bias"))


def test_load_torch_rnn_into_the_forecaster():
    """The loader finds the cells of any model built on std.cells: the forecaster without attention is
    linear -> torch.nn.LSTM (2 layers) -> linear."""
    d = 32
    model = gatedsl.compile(SPECS / "forecaster.gate",
                            params=dict(cell="LSTM", d=d, layers=2, attention=False)).double()
    torch.manual_seed(1)
    lstm = nn.LSTM(d, d, num_layers=2, batch_first=True).double()
    gatedsl.load_torch_rnn(model, lstm)
    embed, head = model.get_submodule("h"), model.get_submodule("y")
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    expected = nn.functional.linear(
        lstm(nn.functional.linear(x, embed.x_proj.weight, embed.x_proj.bias))[0], head.h_proj.weight, head.h_proj.bias)
    torch.testing.assert_close(model(x), expected, **TOL)


def test_load_torch_rnn_explicit_scans():
    """`scans` picks the cells by path; here torch's only layer goes into the spec's second one."""
    model = gatedsl.compile(SPECS / "gru.gate", params=dict(input_size=4, hidden=4, layers=2)).double()
    untouched = model.get_parameter("layers.0.GRU.r.x_proj.weight").clone()
    torch.manual_seed(2)
    ref = nn.GRU(4, 4, batch_first=True).double()
    gatedsl.load_torch_rnn(model, ref, scans=["layers.1.GRU"])
    for i, gate in enumerate(GATES["GRU"]):
        torch.testing.assert_close(model.get_parameter(f"layers.1.GRU.{gate}.x_proj.weight"),
                                   ref.weight_ih_l0[i * 4:(i + 1) * 4], rtol=0, atol=0)
    assert torch.equal(model.get_parameter("layers.0.GRU.r.x_proj.weight"), untouched)


@pytest.mark.parametrize("case", ["kind", "layers", "hidden", "direction", "not_rnn"])
def test_load_torch_rnn_rejects_what_does_not_fit(case):
    model = gatedsl.compile(SPECS / "gru.gate", params=dict(input_size=3, hidden=4, layers=1))
    ref = {
        "kind": nn.LSTM(3, 4, batch_first=True),
        "layers": nn.GRU(3, 4, num_layers=2, batch_first=True),
        "hidden": nn.GRU(3, 5, batch_first=True),
        "direction": nn.GRU(3, 4, bidirectional=True, batch_first=True),
        "not_rnn": nn.RNN(3, 4, batch_first=True),
    }[case]
    if case == "direction":
        # Two forward scans where torch wants a forward and a reversed one.
        model = gatedsl.compile(SPECS / "gru.gate", params=dict(input_size=3, hidden=4, layers=2))
        ref = nn.GRU(3, 4, num_layers=1, bidirectional=True, batch_first=True)
    with pytest.raises(TypeError if case == "not_rnn" else ValueError):
        gatedsl.load_torch_rnn(model, ref)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_weights_go_back_to_torch(kind, bias):
    """load_torch_rnn is one case of gatedsl.interop's mappings, so the same mapping writes the cells back in torch's
    packed layout: a fresh torch layer loads them (strict) and computes what the spec does."""
    from gatedsl.interop import export_state_dict, scanned_cells, torch_rnn_mapping

    torch.manual_seed(0)
    rnn = getattr(nn, kind)
    ref = rnn(3, 4, num_layers=2, bidirectional=True, bias=bias, batch_first=True).double()
    model = gatedsl.compile(SPECS / f"{kind.lower()}.gate",
                            params=dict(input_size=3, hidden=4, layers=2, bidirectional=True)).double()
    gatedsl.load_torch_rnn(model, ref)
    scans = [path for path, _, _ in scanned_cells(model)]
    exported = export_state_dict(model, torch_rnn_mapping(kind, scans, directions=2, bias=bias))
    back = rnn(3, 4, num_layers=2, bidirectional=True, bias=bias, batch_first=True).double()
    back.load_state_dict(exported, strict=True)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.testing.assert_close(back(x)[0], model(x)[0], **TOL)
    assert all(torch.equal(exported[k], v) for k, v in ref.state_dict().items())
