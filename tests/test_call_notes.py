"""An error inside a called block or cell (a std one, or the user's) carries a note at each call that led there,
the user's own call site first, as rustc shows macro expansions; the call memo gives the same notes."""

from __future__ import annotations

from pathlib import Path

import pytest

from gatedsl.api import load, pick_model
from gatedsl.cli.main import main
from gatedsl.errors import SpecError
from gatedsl.ir.model import Limits, ModelIR
from gatedsl.passes.elaborate import CallMemo, elaborate
from gatedsl.passes.elaborate.interpreter import CallNote

STD_CALL = """import std.attention

model M() {
  input x: [B, T, 8]
  y = gated_attention(x, heads=3)
  output out = y
}
"""

NESTED = """block inner(x: [*, D], k: int) {
  require D % k == 0, "k must divide D"
  return x
}

block middle(x: [*, D]) {
  y = inner(x, k=3)
  return y
}

model M() {
  input x: [B, 8]
  output y = middle(x)
}
"""


def _error(path: Path, overrides: dict | None = None, memo: CallMemo | None = None) -> SpecError:
    program = load(path)
    unit = ModelIR(program, pick_model(program, None), overrides or {}, Limits(), opt_level=0)
    with pytest.raises(SpecError) as caught:
        elaborate(unit, memo)
    return caught.value


def _call_notes(err: SpecError) -> list[tuple[str, int]]:
    return [(note.message, note.span.line) for note in err.notes if type(note) is CallNote]


def test_a_requirement_failing_in_a_std_block_notes_the_user_s_call(tmp_path, capsys):
    spec = tmp_path / "model.gate"
    spec.write_text(STD_CALL)
    std = load(spec).definitions["gated_attention"].file
    assert main(["check", str(spec)]) == 1
    lines = capsys.readouterr().err.splitlines()
    source = Path(std).read_text().splitlines()
    start = next(i for i, text in enumerate(source, 1) if text.startswith("block gated_attention"))
    line = next(i for i, text in enumerate(source, 1) if i > start and "heads must divide D" in text)
    column = source[line - 1].index("D % heads") + 1
    assert lines == [
        f"{std}:{line}:{column}: error: requirement failed: heads must divide D (or give head_dim)",
        f"{line:>4} | {source[line - 1]}",
        "     | " + " " * (column - 1) + "^" + "~" * (len("D % heads == 0") - 1),
        "note: D = 8, heads = 3",
        f"{spec}:5:7: note: in this call to gated_attention",
        "   5 |   y = gated_attention(x, heads=3)",
        "     |       ^~~~~~~~~~~~~~~~~~~~~~~~~~~",
    ]


def test_a_chain_of_user_blocks_is_noted_from_the_model_down(tmp_path):
    spec = tmp_path / "nested.gate"
    spec.write_text(NESTED)
    assert _error(spec).render().splitlines() == [
        f"{spec}:2:11: error: requirement failed: k must divide D",
        "   2 |   require D % k == 0, \"k must divide D\"",
        "     |           ^~~~~~~~~~",
        "note: D = 8, k = 3",
        f"{spec}:13:14: note: in this call to middle",
        "  13 |   output y = middle(x)",
        "     |              ^~~~~~~~~",
        f"{spec}:7:7: note: in this call to inner",
        "   7 |   y = inner(x, k=3)",
        "     |       ^~~~~~~~~~~~~",
    ]


def test_an_argument_that_does_not_fit_is_noted_from_the_caller_s_callers(tmp_path):
    spec = tmp_path / "argument.gate"
    spec.write_text("""block inner(x: [*, 4]) {
  return x
}

block outer(x: [*, D]) {
  return inner(x)
}

model M() {
  input x: [B, 8]
  output y = outer(x)
  output z = inner(x)
}
""")
    err = _error(spec)
    assert (err.line, err.column) == (6, 16)  # the argument, in outer: it lies in outer, not in inner
    assert _call_notes(err) == [("in this call to outer", 11)]
    spec.write_text(spec.read_text().replace("  output y = outer(x)\n", ""))
    err = _error(spec)
    assert err.line == 11 and _call_notes(err) == []  # in the model itself: no call to note


def test_a_scan_of_a_cell_passed_as_a_block_is_noted_by_both_names(tmp_path):
    spec = tmp_path / "scan.gate"
    spec.write_text("""cell C(x: [*, D], state h: [*, D], k: int) {
  require D % k == 0, "k must divide D"
  h = h + x
}

block run(x: [*, T, D], c: block) {
  y = scan c(x, k=3) over T
  return y
}

model M() {
  input x: [B, T, 8]
  output y = run(x, c=C)
}
""")
    err = _error(spec)
    assert (err.message, err.line) == ("requirement failed: k must divide D", 2)
    assert _call_notes(err) == [("in this call to run", 13), ("in this scan of c (cell C)", 7)]


def test_the_call_memo_gives_the_same_notes(tmp_path):
    spec = tmp_path / "layers.gate"
    spec.write_text("""import std.attention

block layer(x: [*, T, D], heads: int) {
  y = rms_norm(x)
  return x + gated_attention(y, heads=heads)
}

model M(d: int in 4..16 = 12, layers: int in 1..4 = 4) {
  input x: [B, T, 3]
  h = linear(x, d)
  repeat i in layers {
    h = layer(h, heads=2 ** i)
  }
  output y = h
}
""")
    memo = CallMemo(load(spec))
    fresh = _error(spec)
    assert fresh.message == "requirement failed: heads must divide D (or give head_dim)"
    assert _call_notes(fresh) == [("in this call to layer", 12), ("in this call to gated_attention", 5)]
    program = memo.program
    for _ in range(3):  # a record is kept once its call is seen twice; the third elaboration replays layers 0-2
        unit = ModelIR(program, pick_model(program, None), {}, Limits(), opt_level=0)
        with pytest.raises(SpecError) as caught:
            elaborate(unit, memo)
        assert caught.value.render() == fresh.render()
    assert memo.hits > 0
