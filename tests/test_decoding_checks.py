"""Which specs decode: gatedsl.Decoder refuses a model that is not causal along T with a SpecError at the first
construct that prevents it (FILE:LINE:COL, the source line with a caret under the construct, the reason), and
decodes the causal constructs that carry state (a running total, rotary positions) or none (a scan over another
axis), equal to the full forward (float64, rtol = atol = 1e-10 as in tests/test_decoding.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from test_decoding import DT, TOL, build, carried_kinds, check_decoding

import gatedsl
from gatedsl import Decoder, SpecError


def model(body: str, inputs: str = "input x: [B, T, 8]", imports: str = "") -> str:
    lines = [f"import {imports}"] if imports else []
    lines += ["model M() {"] + ["  " + line for line in inputs.split("\n")]
    lines += ["  " + line for line in body.split("\n")] + ["}", ""]
    return "\n".join(lines)


HEADS = "q = split_heads(x, 2)\n"
# name: (spec, the construct the error points at (its first occurrence in the spec), the reason's words)
NOT_CAUSAL = {
    "reversed scan": (model("output y = scan GRU(x, H=4) over T reverse", imports="std.cells"),
                      "scan GRU(x, H=4) over T reverse", "a reversed scan of GRU reads the sequence from its end"),
    "bidirectional scan": (model("f = scan LSTM(x, H=4) over T\nb = scan LSTM(x, H=4) over T reverse\n"
                                 "output y = concat([f, b])", imports="std.cells"),
                           "scan LSTM(x, H=4) over T reverse", "a reversed scan of LSTM"),
    "non-causal attention": (model(HEADS + "output y = merge_heads(attention(q, q, q), 2)"),
                             "attention(q, q, q)", "a non-causal attention lets each position read the later ones"),
    "attention mask=": (model(HEADS + "output y = merge_heads(attention(q, q, q, causal=true, mask=m), 2)",
                              "input x: [B, T, 8]\ninput m: bool[B, 1, 1, T]"),
                        "attention(q, q, q, causal=true, mask=m)", "an attention given a mask="),
    "attention [T, T] mask": (model(HEADS + "output y = merge_heads(attention(q, q, q, causal=true, mask=m), 2)",
                                    "input x: [B, T, 8]\ninput m: bool[T, T]"),
                              "attention(q, q, q, causal=true, mask=m)", r"reads a value \[T, T\] with two dims"),
    "attention lengths=": (model(HEADS + "output y = merge_heads(attention(q, q, q, causal=true, lengths=n), 2)",
                                 "input x: [B, T, 8]\ninput n: int[B]"),
                           "attention(q, q, q, causal=true, lengths=n)", "an attention with lengths= pads"),
    "mean over T": (model("y = x - mean(x, 1, keepdim=true)\noutput z = sigmoid(y)"), "mean(x, 1, keepdim=true)",
                    "a mean reduction along T mixes positions"),
    "sum over T": (model("output y = x * sum(x, -2, keepdim=true)"), "sum(x, -2, keepdim=true)",
                   "a sum reduction along T"),
    "softmax over T": (model("output y = softmax(x, 1)"), "softmax(x, 1)", "a softmax along T mixes positions"),
    "flip along T": (model("output y = flip(x, 1) + x"), "flip(x, 1)", "flipping along T"),
    "slice along T": (model("last = x[:, -1]\noutput y = x + unsqueeze(last, 1)"), "x[:, -1]",
                      "indexing or slicing along T picks positions by number"),
    "concat along T": (model("output y = concat([x, x], 1)"), "concat([x, x], 1)", "a concatenation along T"),
    "cumsum reverse": (model("output y = cumsum(x, 1, reverse=true)"), "cumsum(x, 1, reverse=true)",
                       "a reversed cumulative sum along T reads later positions"),
    "same-padded conv": (model("output y = depthwise_conv1d(x, 3)"), "depthwise_conv1d(x, 3)",
                         r"a convolution padded on both sides reads later positions along T \(make it causal\)"),
    "dilated same-padded conv": (model("output y = conv1d(x, 4, 3, dilation=2)"), "conv1d(x, 4, 3, dilation=2)",
                                 "padded on both sides"),
    "matmul over T": (model("g = transpose(x) @ x\noutput y = x @ g"), "transpose(x) @ x",
                      "a matrix product's contraction along T"),
    "einsum over T": (model('output y = x * unsqueeze(einsum("btd,btd->bd", x, x), 1)'), 'einsum("btd,btd->bd", x, x)',
                      "einsum 'btd,btd->bd' sums over T"),
    "a [T, T] value": (model("a = x @ transpose(x)\noutput y = a @ x"), "x @ transpose(x)",
                       r"makes a value \[B, T, T\] with two dims along T"),
    "reshape merging T": (model("output y = reshape(reshape(x, [B, T * 8]), [B, T, 8])"), "reshape(x, [B, T * 8])",
                          "merges positions with features"),
    # T merged with the batch (B*T: row 0's positions, then row 1's): a carried op would run across rows
    "cumsum along B*T": (model("f = reshape(x, [B * T, 8])\noutput y = reshape(cumsum(f, 0), [B, T, 8])"),
                         "cumsum(f, 0)", r"a cumulative sum runs along B\*T, T merged with another axis"),
    "scan along B*T": (model("f = reshape(x, [B * T, 8])\noutput y = reshape(scan GRU(f, H=8) over -2, [B, T, 8])",
                             imports="std.cells"), "scan GRU(f, H=8) over -2", r"a scan of GRU runs along B\*T"),
    "conv along B*T": (model("f = reshape(x, [1, B * T, 8])\n"
                             "output y = reshape(depthwise_conv1d(f, 3, causal=true), [B, T, 8])"),
                       "depthwise_conv1d(f, 3, causal=true)", r"a convolution runs along B\*T"),
    "attention along B*T": (model("f = reshape(x, [1, B * T, 8])\n"
                                  "output y = reshape(attention(f, f, f, causal=true), [B, T, 8])"),
                            "attention(f, f, f, causal=true)", r"an attention runs along B\*T"),
    "shift along B*T": (model("f = reshape(x, [B * T, 8])\noutput y = reshape(shift(f, 0), [B, T, 8])"),
                        "shift(f, 0)", r"a token shift runs along B\*T"),
    "rope along B*T": (model("f = reshape(x, [B * T, 8])\noutput y = reshape(rope(f), [B, T, 8])"), "rope(f)",
                       r"rope's count of positions runs along B\*T"),
    "no symbolic T input": (model("output y = x * 2", "input x: [B, 5, 8]"), "input x: [B, 5, 8]",
                            r"no input has a dim of symbolic size T \(inputs: x: \[B, 5, 8\]\)"),
    "an output without T": (model("output y = x * 2\noutput w = linear(z, 3)", "input x: [B, T, 8]\ninput z: [B, 4]"),
                            "linear(z, 3)", r"output w \[B, 3\] has no T axis"),
}


def where(source: str, construct: str) -> tuple[int, int]:
    """The line and column (1-based) of the first occurrence of `construct` in `source`."""
    at = source.index(construct)
    return source.count("\n", 0, at) + 1, at - source.rfind("\n", 0, at)


@pytest.mark.parametrize("name", NOT_CAUSAL)
def test_a_non_causal_construct_is_a_spec_error_at_it(name):
    source, construct, reason = NOT_CAUSAL[name]
    compiled = gatedsl.compile(source, opt_level=0)  # the spec itself is fine: only decoding refuses it
    with pytest.raises(SpecError) as info:
        Decoder(compiled)
    err = info.value
    line, column = where(source, construct)
    assert (err.file, err.line, err.column) == ("<string>", line, column), err.render()
    assert re.search(reason, err.message), err.message
    assert err.message.startswith("cannot decode along T: ")
    header, quoted, caret, *rest = err.render().split("\n")
    assert header.startswith(f"<string>:{line}:{column}: error: cannot decode along T: ")
    assert quoted == f"{line:>4} | {source.split(chr(10))[line - 1]}"
    # the caret sits under the construct's first character and underlines (at least) the construct
    assert caret.index("^") == quoted.index(" | ") + 3 + column - 1
    assert caret.count("~") + 1 >= len(construct)


def test_the_error_also_comes_at_opt_level_2_and_names_the_first_construct():
    """-O2 fuses ops, but the refusal is the same, and of two non-causal constructs the first one is named."""
    source = model("a = softmax(x, 1)\nb = flip(a, 1)\noutput y = b")
    with pytest.raises(SpecError) as info:
        Decoder(gatedsl.compile(source, opt_level=2))
    assert (info.value.line, info.value.column) == where(source, "softmax(x, 1)")


def test_a_std_block_refuses_where_its_own_spec_has_the_construct():
    """A bidirectional RNNLayer: the reversed scan is in std/layers.gate, and the error quotes that line."""
    source = model("output y = RNNLayer(x, cell=GRU, H=4, bidirectional=true)", imports="std.layers")
    with pytest.raises(SpecError, match="a reversed scan of GRU") as info:
        Decoder(gatedsl.compile(source))
    assert info.value.file.endswith("specs/std/layers.gate")
    assert "scan cell(x, H=H) over -2 reverse" in info.value.render()


def test_another_sequence_axis_can_be_named():
    source = model("output y = cumsum(x, 1)", "input x: [B, S, 8]")
    with pytest.raises(SpecError, match="no input has a dim of symbolic size T"):
        Decoder(gatedsl.compile(source))
    dec = Decoder(gatedsl.compile(source).double(), seq="S")
    x = torch.randn(2, 5, 8, dtype=DT)
    out, state = dec.prefill(x[:, :3])
    rest, _ = dec.step(x[:, 3:], state=state)
    torch.testing.assert_close(torch.cat([out, rest], 1), torch.cumsum(x, 1), **TOL)


# ------------------------------------------------------------------ causal constructs
# name: (spec, what its decoding carries, whether an output reads earlier positions' inputs)
CAUSAL = {
    "cumsum along T": (model("output y = cumsum(x, 1)"), {"running_total"}, True),
    "cumprod along T, cumsum over features": (model("output y = cumprod(sigmoid(x), -2) * cumsum(x, -1)"),
                                              {"running_total"}, True),
    "rope, default positions": (model(HEADS + "output y = merge_heads(rope(q, theta=100.0), 2)"), {"positions"},
                                False),
    "rope, partial": (model(HEADS + "output y = merge_heads(rope(q, rotary_dim=2), 2)"), {"positions"}, False),
    "rope, positions given": (model(HEADS + "output y = merge_heads(rope(q, positions=p), 2)",
                                    "input x: [B, T, 8]\ninput p: int[B, T]"), set(), False),
    "scan over another axis": (model("output y = scan GRU(x, H=4) over S", "input x: [B, T, S, 8]",
                                     imports="std.cells"), set(), False),
    "scan over T, the time axis first": (model("output y = scan LSTM(x, H=4) over T", "input x: [T, B, 8]",
                                               imports="std.cells"), {"scan"}, True),
    "norms, softmax and reductions over features": (
        model("output y = softmax(layer_norm(x), -1) * mean(x, -1, keepdim=true) + rms_norm(x)"), set(), False),
    "token shift, 2 steps": (model("output y = x + shift(x, 1, 2, fill=-1.0)"), {"shift"}, True),
    "token shift, a fill given": (model("output y = x * shift(x, steps=3, fill=f)",
                                        "input x: [B, T, 8]\ninput f: [B, 8]"), {"shift"}, True),
    "T moved to the last dim": (model("output y = transpose(cumsum(x, 1))"), {"running_total"}, True),
}


@pytest.mark.parametrize("opt_level", [0, 2])
@pytest.mark.parametrize("name", CAUSAL)
def test_a_causal_construct_decodes_as_its_forward(name, opt_level):
    source, kinds, history = CAUSAL[name]
    dec, _ = check_decoding(build(source, opt_level), history=history)
    assert carried_kinds(dec) == kinds
