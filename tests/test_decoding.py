"""Incremental decoding (gatedsl.Decoder) equals one full forward: a prompt's prefill, then the rest of the sequence
stepped one position at a time, two at a time, or in uneven pieces, gives the outputs the compiled model gives for
the whole sequence, at -O0 and -O2, for every zoo model, the std library's causal blocks (linear recurrences,
attention, causal convolutions, cells scanned over T) and the example language models.

Tolerance: float64, rtol = atol = 1e-10. Decoding computes the same function as the full forward in another order
(a recurrence continued from a carried state where the forward may take a chunked parallel form, attention over a
concatenated key/value cache, a convolution over a carried window), so the two differ by rounding alone: at most
~1e-13 here, on outputs of size ~1-10. A wrong state, position or mask moves them by far more, and each case first
checks that its stepped outputs do depend on the prompt (changing the prompt moves them by more than 1e-6), so a
state that was silently dropped would fail it.

Every weight is moved off its initialisation (norm weights at 1 or 0, biases at 0) so that each one matters.
"""

from __future__ import annotations

import pytest
import torch

import gatedsl
from gatedsl.kernels import registry

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
B, T, D = 2, 12, 8
VOCAB = 16  # below every example's and zoo model's vocabulary

# How the 12 positions are cut: the first piece is the prefill, each later one a step.
SPLITS = {
    "ones": [5] + [1] * 7,
    "twos": [4, 2, 2, 2, 2],
    "uneven": [3, 1, 2, 3, 1, 2],
    "long-step": [1, 11],  # a one-position prompt, then every other position in one step from the carried state
}


# ------------------------------------------------------------------ helpers
def build(spec, opt_level: int, params=None, seed: int = 0):
    """Compile in float64, eval mode, every weight moved off its init."""
    model = gatedsl.compile(spec, params, opt_level=opt_level).double().eval()
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.3 * torch.randn(p.shape, dtype=DT, generator=gen))
    return model


def inputs_for(model, batch: int = B, length: int = T, seed: int = 0) -> list[torch.Tensor]:
    return gatedsl.example_inputs(model.meta["gatedsl_report"], {"B": batch, "T": length}, seed=seed, dtype=DT,
                                  vocab=VOCAB)


def as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def output_axes(model) -> list[int | None]:
    """Each output's dim along T (None for one without it: a scan's last state)."""
    return [shape.index("T") if "T" in shape else None for shape in model.meta["gatedsl_report"].outputs.values()]


def pieces(dec: gatedsl.Decoder, inputs: list[torch.Tensor], cuts: list[int]) -> list[list[torch.Tensor]]:
    """The inputs cut along T: one list of inputs per call."""
    axes = [dec.plan.input_axes[name] for name in dec.inputs]
    calls, at = [], 0
    for n in cuts:
        calls.append([x if axis is None else x.narrow(axis, at, n) for x, axis in zip(inputs, axes)])
        at += n
    return calls


def decode(dec: gatedsl.Decoder, inputs: list[torch.Tensor], cuts: list[int]):
    """Prefill the first piece, step the others; each output joined along its T dim, and the last state."""
    state, outs = None, []
    for args in pieces(dec, inputs, cuts):
        out, state = dec.prefill(*args) if state is None else dec.step(*args, state=state)
        outs.append(as_tuple(out))
    joined = []
    for i, axis in enumerate(output_axes(dec.model)):
        joined.append(outs[-1][i] if axis is None else torch.cat([o[i] for o in outs], dim=axis))
    return tuple(joined), state


def check_decoding(model, splits=SPLITS.values(), length: int = T, history: bool = True):
    """Every split's decoding equals the full forward; the stepped outputs depend on the prompt (unless `history` is
    false: a model whose outputs are per position)."""
    dec = gatedsl.Decoder(model)
    inputs = inputs_for(model, length=length)
    with torch.no_grad():
        full = as_tuple(model(*inputs))
        if history:
            _depends_on_prompt(model, dec, inputs, full)
        for cuts in splits:
            assert sum(cuts) == length
            got, state = decode(dec, inputs, list(cuts))
            assert len(got) == len(full)
            for g, f in zip(got, full):
                torch.testing.assert_close(g, f, **TOL, msg=lambda m, cuts=cuts: f"split {cuts}: {m}")
            assert state.position.tolist() == [length] * state.batch_size
    return dec, state


def _depends_on_prompt(model, dec, inputs, full) -> None:
    """Another prompt (the first 3 positions redrawn) moves the outputs after it: the carried state matters."""
    other = inputs_for(model, length=3, seed=99)
    changed = [x if axis is None else torch.cat([o, x.narrow(axis, 3, x.shape[axis] - 3)], dim=axis)
               for x, o, axis in zip(inputs, other, (dec.plan.input_axes[n] for n in dec.inputs))]
    moved = as_tuple(model(*changed))
    for f, m, axis in zip(full, moved, output_axes(model)):
        later = slice(None) if axis is None else (slice(None),) * axis + (slice(3, None),)
        assert (f[later] - m[later]).abs().max() > 1e-6, "the outputs after the prompt do not depend on it"


def carried_kinds(dec: gatedsl.Decoder) -> set[str]:
    return {c.kind for c in dec.plan.carried.values()}


def wrap(call: str, imports: str, inputs: str = f"input x: [B, T, {D}]") -> str:
    """A model around one std definition."""
    return f"import {imports}\nmodel Wrap() {{\n  {inputs}\n  output y = {call}\n}}\n"


# ------------------------------------------------------------------ cases
# (spec, params, what the decoding carries at -O2; at -O0 every linear_scan / delta_rule_scan is a scan)
ZOO = {
    "zoo-gla": ("specs/zoo/gla.gate", None, {"linear_scan"}),
    "zoo-mamba": ("specs/zoo/mamba.gate", None, {"conv_window", "linear_scan"}),
    "zoo-mixtral": ("specs/zoo/mixtral.gate", None, {"kv_cache", "positions"}),
    "zoo-mixtral-window": ("specs/zoo/mixtral.gate", {"sliding_window": 3}, {"kv_cache", "positions"}),
    "zoo-qwen3_next": ("specs/zoo/qwen3_next.gate", None,
                       {"conv_window", "delta_rule_scan", "kv_cache", "positions"}),
}
LINEAR_RNN = {
    "RetNet": ("RetNet(x, heads=2)", {"linear_scan", "positions"}),
    "RetNet-conv-group": ('RetNet(x, heads=2, short_conv=true, norm="group", output_gate=false, rotary=false)',
                          {"conv_window", "linear_scan"}),
    "SimpleGLA": ("SimpleGLA(x, heads=2)", {"conv_window", "linear_scan"}),
    "GLA": ("GLA(x, heads=2, rank=4)", {"linear_scan"}),
    "GLA-conv-layer": ('GLA(x, heads=2, rank=4, short_conv=true, norm="layer", gate_bias=true)',
                       {"conv_window", "linear_scan"}),
    "GatedDeltaNet": ("GatedDeltaNet(x, heads=2, head_dim=4, v_heads=4, v_head_dim=4)",
                      {"conv_window", "delta_rule_scan"}),
    "HGRN-conv": (f"HGRN(x, zeros([{D}]) + 0.5, short_conv=true)", {"conv_window", "linear_scan"}),
    "HGRNStack": ("HGRNStack(x, layers=2)", {"linear_scan"}),
    "Mamba": ("Mamba(x, state_size=4)", {"conv_window", "linear_scan"}),
    "GatedAssociativeMemory": ("GatedAssociativeMemory(x, slots=8)", {"conv_window"}),
}
ATTENTION = {
    "self_attention": ("self_attention(x, heads=2)", {"kv_cache", "positions"}),
    "self_attention-gqa": ("self_attention(x, heads=4, kv_heads=2, bias=true)", {"kv_cache", "positions"}),
    "self_attention-window3": ("self_attention(x, heads=4, kv_heads=2, window=3)", {"kv_cache", "positions"}),
    "self_attention-window2": ("self_attention(x, heads=2, window=2, theta=100.0)", {"kv_cache", "positions"}),
    "gated_attention-partial-rotary": ("gated_attention(x, heads=2, kv_heads=1, head_dim=8, partial_rotary=0.5)",
                                       {"kv_cache", "positions"}),
    "gated_attention-headwise": ('gated_attention(x, heads=2, head_dim=8, gate="headwise", zero_centered=false)',
                                 {"kv_cache", "positions"}),
    "gated_attention-ungated": ('gated_attention(x, heads=4, kv_heads=2, gate="none", qk_norm=false, '
                                'partial_rotary=1.0)', {"kv_cache", "positions"}),
}
CELLS = ["GRU", "LSTM", "MGU", "GRUOriginal", "IndRNN", "RHN", "TimescaleRNN"]
EXAMPLES = {
    "gla_lm": ("examples/gla_lm.gate", None),
    "lstm_char_lm": ("examples/lstm_char_lm.gate", None),
    "lstm_char_lm-gru-2-layers": ("examples/lstm_char_lm.gate", {"cell": "GRU", "layers": 2}),
    "lstm_char_lm-rhn": ("examples/lstm_char_lm.gate", {"cell": "RHN", "d": 16}),
    "mamba_model": ("examples/mamba_model.gate", None),
    "rhn_hybrid": ("examples/rhn_hybrid.gate", None),  # RHN scan and gated attention
    "deconstruct_ablation-lstm": ("examples/deconstruct_ablation.gate", {"attention": True, "gating": "input"}),
    "deconstruct_ablation-gru": ("examples/deconstruct_ablation.gate", {"cell": "GRU", "attention": True}),
    "deconstruct_ablation-rhn": ("examples/deconstruct_ablation.gate", {"cell": "RHN", "gating": "additive"}),
    # transformers with learned absolute positions, read at each token's running count (a cumsum along T)
    "swiglu_transformer": ("examples/swiglu_transformer.gate", {"d": 16, "heads": 2}),
    "gated_attention_transformer": ("examples/gated_attention_transformer.gate", {"d": 16, "heads": 2}),
    "moe_transformer": ("examples/moe_transformer.gate", {"d": 16, "heads": 2}),
}
LEVELS = [0, 2]


def at_level(kinds: set[str], opt_level: int) -> set[str]:
    if opt_level == 2:
        return kinds
    return {"scan" if k in ("linear_scan", "delta_rule_scan") else k for k in kinds}


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("opt_level", LEVELS)
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_decodes_as_its_forward(name, opt_level):
    spec, params, kinds = ZOO[name]
    dec, state = check_decoding(build(spec, opt_level, params))
    assert carried_kinds(dec) == at_level(kinds, opt_level)
    window = (params or {}).get("sliding_window")
    if window:  # the cache keeps only the window's newest keys
        caches = [e for e in state.entries.values() if e.kind == "kv_cache"]
        assert caches and all(e.tensors[0].shape[-2] == window for e in caches)


@pytest.mark.parametrize("opt_level", LEVELS)
@pytest.mark.parametrize("name", LINEAR_RNN)
def test_linear_recurrence_block_decodes_as_its_forward(name, opt_level):
    call, kinds = LINEAR_RNN[name]
    dec, _ = check_decoding(build(wrap(call, "std.linear_rnn"), opt_level))
    assert carried_kinds(dec) == at_level(kinds, opt_level)


@pytest.mark.parametrize("opt_level", LEVELS)
@pytest.mark.parametrize("name", ATTENTION)
def test_attention_block_decodes_as_its_forward(name, opt_level):
    call, kinds = ATTENTION[name]
    dec, state = check_decoding(build(wrap(call, "std.attention"), opt_level))
    assert carried_kinds(dec) == kinds
    (cache,) = [e for e in state.entries.values() if e.kind == "kv_cache"]
    keys, values, real = cache.tensors
    window = dec.plan.carried[next(n for n, c in dec.plan.carried.items() if c.kind == "kv_cache")].window
    assert keys.shape[-2] == values.shape[-2] == real.shape[-1] == (window or T)  # a window's cache is trimmed
    assert bool(real.all())


@pytest.mark.parametrize("opt_level", LEVELS)
@pytest.mark.parametrize("spec", [
    wrap("GatedLongConv(x, 5)", "std.conv"),
    f"model Wrap() {{\n  input x: [B, T, {D}]\n  output y = conv1d(x, 4, 3, dilation=2, causal=true, groups=2)\n}}\n",
], ids=["GatedLongConv", "conv1d-dilated-grouped"])
def test_causal_convolution_decodes_as_its_forward(spec, opt_level):
    dec, state = check_decoding(build(spec, opt_level))
    assert carried_kinds(dec) == {"conv_window"}
    (window,) = state.entries.values()
    assert window.tensors[0].shape == (B, 4, D)  # the inputs its reach covers: (kernel − 1) · dilation


@pytest.mark.parametrize("opt_level", LEVELS)
@pytest.mark.parametrize("cell", CELLS)
def test_scanned_cell_decodes_as_its_forward(cell, opt_level):
    model = build(wrap(f"scan {cell}(x, H=6) over T", "std.cells"), opt_level)
    dec, _ = check_decoding(model)
    assert carried_kinds(dec) == {"scan"}
    (choice,) = [k for k in model.meta["gatedsl_report"].kernels if k["op"] == "scan"]
    native = opt_level == 2 and cell in ("GRU", "LSTM")  # -O2 runs torch's own GRU / LSTM, one call per piece
    assert choice["kernel"] == (f"torch.{cell}" if native else "loop")


@pytest.mark.parametrize("opt_level", LEVELS)
@pytest.mark.parametrize("cell", ["GRU", "LSTM"])
def test_rnn_stack_decodes_as_its_forward(cell, opt_level):
    dec, state = check_decoding(build(wrap(f"RNNStack(x, cell={cell}, H=6, layers=2)", "std.layers"), opt_level))
    assert len(state.entries) == 2  # a state per layer
    assert all(len(e.tensors) == (2 if cell == "LSTM" else 1) for e in state.entries.values())


@pytest.mark.parametrize("opt_level", LEVELS)
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_model_decodes_as_its_forward(name, opt_level):
    spec, params = EXAMPLES[name]
    check_decoding(build(spec, opt_level, params))


@pytest.mark.parametrize("call, kernel", [
    (f"GLA(x, heads=1, key_dim={4 * D}, value_dim={4 * D}, rank=4)", "chunked"),  # a [32, 32] state per row
    ("HGRN(x, zeros([8]) + 0.5)", "blocked"),  # a state of 8 per row
    ("GatedDeltaNet(x, heads=2, head_dim=4)", "chunked"),
], ids=["GLA", "HGRN", "GatedDeltaNet"])
def test_long_pieces_take_the_parallel_form_with_the_carried_state(call, kernel, monkeypatch):
    """At -O2 a long prefill runs a linear recurrence's parallel form and returns its final state, and a long step
    runs it again from the carried state: the kernel chosen for each call is recorded, not only the cost rule's."""
    chosen = []
    real_choose = registry.choose

    def recording(op, ctx, *args, **kwargs):
        choice = real_choose(op, ctx, *args, **kwargs)
        chosen.append((choice.kernel, ctx.size("T")))
        return choice

    width = 4 * D if "GLA" in call else D
    model = build(wrap(call, "std.linear_rnn", f"input x: [B, T, {width}]"), 2)
    dec = gatedsl.Decoder(model)
    inputs = inputs_for(model, length=80)
    registry.policy("cost")  # forget earlier choices, so that each call's context is chosen for again
    monkeypatch.setattr(registry, "choose", recording)
    with torch.no_grad():
        (got,), _ = decode(dec, inputs, [40, 1, 39])
        monkeypatch.undo()
        full = model(*inputs)
    registry.policy("cost")
    assert (kernel, 40) in chosen and (kernel, 39) in chosen, chosen
    torch.testing.assert_close(got, full, **TOL)
