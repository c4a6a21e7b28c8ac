"""gatedsl.DecodeState and the Decoder's calls: a state's rows picked (select) or joined (cat, prompts of different
lengths, KV caches left-padded and masked) decode exactly as each row alone; clone and to leave the original as it
was; a step leaves its state valid (functional); bad calls are clear errors.

Tolerance: float64, rtol = atol = 1e-10, as in tests/test_decoding.py (the same function in another order: rounding
alone, at most ~1e-13 here).
"""

from __future__ import annotations

import pytest
import torch
from test_decoding import DT, TOL, as_tuple, build, wrap

import gatedsl
from gatedsl import DecodeState, Decoder

LENGTH = 9

# Models whose state holds every carried kind: KV caches (with a window, grouped heads, rotary positions), linear
# recurrences (-O2's fused scans and -O0's scans), torch's native LSTM, causal conv windows, running totals, token
# shifts.
MODELS = {
    "self_attention-window": (wrap("self_attention(x, heads=4, kv_heads=2, window=3)", "std.attention"), 2),
    "gated_attention": (wrap("gated_attention(x, heads=2, head_dim=8, partial_rotary=0.5)", "std.attention"), 0),
    "RetNet-conv": (wrap("RetNet(x, heads=2, short_conv=true)", "std.linear_rnn"), 2),
    "GatedDeltaNet": (wrap("GatedDeltaNet(x, heads=2, head_dim=4)", "std.linear_rnn"), 2),
    "Mamba": (wrap("Mamba(x, state_size=4)", "std.linear_rnn"), 0),
    "LSTM-native": (wrap("scan LSTM(x, H=6) over T", "std.cells"), 2),
    "cumsum-shift": (wrap("cumsum(x, 1) + cumprod(sigmoid(x), 1) * shift(x, 1, 2)", "std.cells"), 2),
    "zoo-qwen3_next": ("specs/zoo/qwen3_next.gate", 2),
    "zoo-mixtral": ("specs/zoo/mixtral.gate", 0),
}
_BUILT: dict[str, tuple] = {}


def model_and_decoder(name: str):
    """Built once per module run: these tests only read the model."""
    if name not in _BUILT:
        spec, opt_level = MODELS[name]
        model = build(spec, opt_level)
        _BUILT[name] = model, Decoder(model)
    return _BUILT[name]


def tokens(model, batch: int, seed: int = 0) -> torch.Tensor:
    (x,) = gatedsl.example_inputs(model.meta["gatedsl_report"], {"B": batch, "T": LENGTH}, seed=seed, dtype=DT,
                                  vocab=16)
    return x


def snapshot(state: DecodeState):
    return state.position.clone(), {k: [t.clone() for t in e.tensors] for k, e in state.entries.items()}


def assert_unchanged(state: DecodeState, snap) -> None:
    position, entries = snap
    assert torch.equal(state.position, position)
    assert state.entries.keys() == entries.keys()
    for key, e in state.entries.items():
        for t, was in zip(e.tensors, entries[key], strict=True):
            assert t.dtype == was.dtype and torch.equal(t, was), f"{key} changed"


# ------------------------------------------------------------------ select
@pytest.mark.parametrize("name", MODELS)
def test_select_then_step_equals_step_then_select(name):
    model, dec = model_and_decoder(name)
    x = tokens(model, 3)
    rows = [2, 0, 0]  # reordered and repeated, as a beam search does
    with torch.no_grad():
        _, state = dec.prefill(x[:, :4])
        out, after = dec.step(x[:, 4:6], state=state)
        picked_out, picked = dec.step(x[rows, 4:6], state=state.select(rows))
        torch.testing.assert_close(picked_out, out[rows], **TOL)
        assert picked.position.tolist() == [6, 6, 6]
        # and on from there: the selected state carries on as the rows it came from
        torch.testing.assert_close(dec.step(x[rows, 6:], state=picked)[0], dec.step(x[:, 6:], state=after)[0][rows],
                                   **TOL)
        # dropping rows: one row left
        one, _ = dec.step(x[1:2, 4:6], state=state.select(torch.tensor([1])))
        torch.testing.assert_close(one, out[1:2], **TOL)


# ------------------------------------------------------------------ cat
@pytest.mark.parametrize("name", MODELS)
def test_cat_of_prompts_of_different_lengths_decodes_each_row_as_alone(name):
    """Rows prefilled separately from prompts of 2, 5 and 3 positions, joined, stepped together (one position, then
    two at a time: each row at its own position) equal each row's own decoding and its full forward."""
    model, dec = model_and_decoder(name)
    x = tokens(model, 3)
    lengths = [2, 5, 3]
    with torch.no_grad():
        full = model(x)
        state = DecodeState.cat([dec.prefill(x[r:r + 1, :n])[1] for r, n in enumerate(lengths)])
        assert state.position.tolist() == lengths and state.batch_size == 3
        for e in state.entries.values():
            if e.kind == "kv_cache":  # left-padded to the longest cache (at most the window), the padding masked
                real = e.tensors[2]
                kept = [min(n, real.shape[1]) for n in lengths]
                assert real.sum(1).tolist() == kept and real.shape[1] == max(kept)
                assert not real[0, 0] and real[:, -1].all()
        # each call gives every row its next position(s): x[r, p : p + t]; rows past the end get padding
        padded = torch.cat([x, x[:, :4]], dim=1)
        got = [[] for _ in lengths]
        at = list(lengths)
        for t in [1, 2, 1, 2, 2]:
            out, state = dec.step(torch.stack([padded[r, at[r]:at[r] + t] for r in range(3)]), state=state)
            for r in range(3):
                got[r].append(out[r:r + 1, :max(0, min(t, LENGTH - at[r]))])
                at[r] += t
        assert state.position.tolist() == at
    for r, n in enumerate(lengths):
        torch.testing.assert_close(torch.cat(got[r], 1), full[r:r + 1, n:], **TOL)


def test_cat_joins_states_of_several_rows_each():
    model, dec = model_and_decoder("self_attention-window")
    x = tokens(model, 3)
    with torch.no_grad():
        state = DecodeState.cat([dec.prefill(x[:2, :4])[1], dec.prefill(x[2:, :2])[1]])
        out, _ = dec.step(torch.stack([x[0, 4:6], x[1, 4:6], x[2, 2:4]]), state=state)
        full = model(x)
    torch.testing.assert_close(out[:2], full[:2, 4:6], **TOL)
    torch.testing.assert_close(out[2:], full[2:, 2:4], **TOL)


# ------------------------------------------------------------------ a state's copies
@pytest.mark.parametrize("name", MODELS)
def test_a_step_leaves_its_state_as_it_was(name):
    """Functional: stepping twice from one state gives the same outputs and states, and the state is not written."""
    model, dec = model_and_decoder(name)
    x = tokens(model, 2)
    with torch.no_grad():
        _, state = dec.prefill(x[:, :5])
        before = snapshot(state)
        first, after_first = dec.step(x[:, 5:7], state=state)
        assert_unchanged(state, before)
        again, after_again = dec.step(x[:, 5:7], state=state)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert_unchanged(after_again, snapshot(after_first))
    assert after_first.position.tolist() == [7, 7] and state.position.tolist() == [5, 5]


@pytest.mark.parametrize("name", ["gated_attention", "GatedDeltaNet", "LSTM-native", "zoo-qwen3_next"])
def test_clone_and_to_leave_the_original_unchanged(name):
    model, dec = model_and_decoder(name)
    x = tokens(model, 2)
    with torch.no_grad():
        _, state = dec.prefill(x[:, :5])
        before = snapshot(state)
        copy = state.clone()
        for key, e in copy.entries.items():  # a clone shares no memory with its original
            for t, orig in zip(e.tensors, state.entries[key].tensors):
                assert t.data_ptr() != orig.data_ptr() and torch.equal(t, orig)
                t.zero_() if t.dtype != torch.bool else t.fill_(False)
        copy.position.add_(3)
        assert_unchanged(state, before)

        single = state.to(dtype=torch.float32)
        assert_unchanged(state, before)
        for key, e in single.entries.items():
            for t, orig in zip(e.tensors, state.entries[key].tensors):
                assert t.dtype == (torch.float32 if orig.is_floating_point() else orig.dtype)  # masks stay bool
        assert single.position.dtype == torch.long
        back = single.to(dtype=DT)
        assert_unchanged(state, before)
        # a state moved to float32 and back continues as float32 rounding allows; the original exactly
        exact, _ = dec.step(x[:, 5:], state=state)
        rounded, _ = dec.step(x[:, 5:], state=back)
        torch.testing.assert_close(dec.step(x[:, 5:], state=state.to())[0], exact, rtol=0, atol=0)
        # float32 rounds the state by ~6e-8 relative, which the models amplify to ~3e-5 on outputs of ~5
        torch.testing.assert_close(rounded, exact, rtol=1e-3, atol=1e-4)
        assert_unchanged(state, before)


def test_detach_keeps_values_and_drops_the_graph():
    model, dec = model_and_decoder("GatedDeltaNet")
    _, state = dec.prefill(tokens(model, 2)[:, :4])  # gradients on: the state hangs on the weights' graph
    assert any(t.requires_grad for e in state.entries.values() for t in e.tensors)
    detached = state.detach()
    assert not any(t.requires_grad for e in detached.entries.values() for t in e.tensors)
    assert_unchanged(detached, snapshot(state))


# ------------------------------------------------------------------ the Decoder and the model
def test_decoder_reads_the_model_weights_as_they_are_now():
    """The decoder shares its model's parameters: changing them (after the decoder was made) changes its outputs."""
    model = gatedsl.compile(wrap("GLA(x, heads=2, rank=4)", "std.linear_rnn"))
    dec = Decoder(model)
    model.double()  # after the decoder: it follows the model into float64
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=DT, generator=torch.Generator().manual_seed(3)))
    x = torch.randn(2, 6, 8, dtype=DT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, state = dec.prefill(x[:, :4])
        rest, _ = dec.step(x[:, 4:], state=state)
        torch.testing.assert_close(torch.cat([out, rest], 1), model(x), **TOL)
    assert {k.split(".")[0] for k in dec.state_dict()} == {"model"}  # the weights are listed once, as the model's
    assert dec.inputs == ["x"] and dec.outputs == ["y"]


def test_several_outputs_come_back_in_order_and_a_scan_last_state_is_the_latest():
    source = ("import std.cells\nmodel M() {\n  input x: [B, T, 8]\n  output total = cumsum(x, 1)\n"
              "  output h = scan GRU(x, H=4) over T last\n  output y = scan LSTM(x, H=4) over T\n}\n")
    model = build(source, 2)
    dec = Decoder(model)
    assert dec.outputs == ["total", "h", "y"]
    x = torch.randn(2, 7, 8, dtype=DT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        first, state = dec.prefill(x[:, :3])
        second, state = dec.step(x[:, 3:], state=state)
    assert isinstance(first, tuple) and len(first) == 3
    torch.testing.assert_close(torch.cat([first[0], second[0]], 1), full[0], **TOL)
    torch.testing.assert_close(second[1], full[1], **TOL)  # the state after the last position, no T
    torch.testing.assert_close(torch.cat([first[2], second[2]], 1), full[2], **TOL)


def test_the_batch_is_read_from_the_input_that_has_it():
    """The first input has no batch dim ([T, 4], the same for every row): the rows are the second input's."""
    source = "model M() {\n  input t: [T, 4]\n  input x: [B, T, 8]\n  output y = cumsum(x + linear(t, 8), 1)\n}\n"
    model = build(source, 2)
    dec = Decoder(model)
    t = torch.randn(6, 4, dtype=DT)
    x = torch.randn(3, 6, 8, dtype=DT)
    with torch.no_grad():
        out, state = dec.prefill(t[:4], x[:, :4])
        assert state.batch_size == 3
        rest, state = dec.step(t=t[4:], x=x[:, 4:], state=state)
        torch.testing.assert_close(torch.cat([out, rest], 1), model(t, x), **TOL)


# ------------------------------------------------------------------ errors
def test_bad_calls_are_clear_errors():
    model, dec = model_and_decoder("gated_attention")
    x = tokens(model, 2)
    _, state = dec.prefill(x[:, :4])
    cases = [
        (lambda: dec.step(x[:1, 4:5], state=state), ValueError, "the state has 2 rows but the inputs have 1"),
        (lambda: dec.step(x[:, 4:5, :7], state=state), ValueError, r"input x must be \[B, T, 8\]: dim 2 is 7, not 8"),
        (lambda: dec.step(x[:, 4], state=state), ValueError, r"input x must be \[B, T, 8\], got .* shape \(2, 8\)"),
        (lambda: dec.step(x[:, 4:5].long(), state=state), ValueError,
         r"input x must be \[B, T, 8\], got a torch.int64"),
        (lambda: dec.step(x[:, 4:4], state=state), ValueError, "at least one position along T, got 0"),
        (lambda: dec.step(x[:, 4:5], state=None), TypeError, "step takes the state a prefill or step returned"),
        (lambda: dec.step(x[:, 4:5].tolist(), state=state), TypeError, "input x must be a tensor"),
        (lambda: dec.prefill(x, x), TypeError, r"the model takes 1 inputs \(x\), got 2"),
        (lambda: dec.prefill(tokens=x), TypeError, "the model has no input 'tokens'"),
        (lambda: dec.prefill(x, x=x), TypeError, "input 'x' given twice"),
        (lambda: dec.prefill(), TypeError, "missing input: x"),
        (lambda: state.select([2]), IndexError, r"rows \[2\] out of range for a state of 2 rows"),
        (lambda: state.select([[0]]), ValueError, "select takes a list of row numbers"),
        (lambda: DecodeState.cat([]), ValueError, "needs at least one state"),
        (lambda: Decoder(torch.nn.Linear(2, 2)), TypeError, "Decoder takes a model from gatedsl.compile, got Linear"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_a_state_from_another_decoder_is_refused():
    model, dec = model_and_decoder("gated_attention")
    other_model, other = model_and_decoder("LSTM-native")
    x = tokens(model, 2)
    _, theirs = other.prefill(x[:, :3])
    with pytest.raises(ValueError, match="the state was made by another decoder"):
        dec.step(x[:, 3:4], state=theirs)
    with pytest.raises(ValueError, match="these carry different ops"):
        DecodeState.cat([dec.prefill(x[:, :3])[1], theirs])


def test_inputs_disagreeing_on_a_size_are_refused():
    source = ("model M() {\n  input a: [B, T, 4]\n  input b: int[B, T]\n"
              "  output y = a + unsqueeze(cumsum(b, 1), -1)\n}\n")
    dec = Decoder(gatedsl.compile(source))
    a, b = torch.randn(2, 3, 4), torch.ones(3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input b \[B, T\] has B = 3, but another input has B = 2"):
        dec.prefill(a, b)
    with pytest.raises(ValueError, match="the inputs along T must have one length, got a: 3, b: 2"):
        dec.prefill(a, b[:2, :2])
    with pytest.raises(ValueError, match=r"input b must be int\[B, T\], got a torch.float32"):
        dec.prefill(a, b[:2].float())


def test_rows_of_a_state_without_a_batch_dim_cannot_be_picked():
    """A model over [T, 8] (no batch) decodes, but its state has no rows to select or join."""
    source = ("model M() {\n  input x: [T, 8]\n  q = split_heads(x, 2)\n"
              "  output y = merge_heads(attention(q, q, q, causal=true), 2)\n}\n")
    model = build(source, 2)
    dec = Decoder(model)
    x = torch.randn(6, 8, dtype=DT)
    with torch.no_grad():
        out, state = dec.prefill(x[:4])
        rest, state = dec.step(x[4:], state=state)
        torch.testing.assert_close(torch.cat([out, rest]), model(x), **TOL)
    assert state.batch_size == 1
    with pytest.raises(ValueError, match="has no dim of the batch's symbolic size, so its rows cannot be picked"):
        state.select([0])
    with pytest.raises(ValueError, match="has no dim of the batch's symbolic size, so its rows cannot be picked"):
        DecodeState.cat([state, state])
