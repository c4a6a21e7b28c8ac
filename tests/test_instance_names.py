"""Instance paths (the state_dict keys, the shapes' names): a reassigned name's statements are h, h_1, h_2, ...
around the names the spec takes itself, and naming them is linear in how often a name is reassigned."""

from __future__ import annotations

import sys

from gatedsl.api import analyse, load, pick_model
from gatedsl.ir.elaboration import Names
from gatedsl.ir.model import Limits, ModelIR
from gatedsl.passes import elaborate


def test_reassigned_names_take_the_first_free_suffix_around_the_spec_s_own_names():
    unit = analyse("""model M() {
  input x: [B, 4]
  h = linear(x, 4)
  h_1 = linear(x, 4)
  h = linear(h, 4) + linear(h_1, 4)
  h = linear(h, 4)
  h_2 = linear(h, 4)
  repeat 2 { h = linear(h, 4) }
  h = linear(h, 4)
  output y = h + h_2
}
""", opt_level=0)
    assert [p.path for p in unit.graph.params if p.path.endswith(".weight")] == [
        "h.x_proj.weight", "h_1.x_proj.weight", "h_2.h_proj.weight", "h_2.h_1_proj.weight", "h_3.h_proj.weight",
        "h_2_1.h_proj.weight", "repeat.0.h.h_proj.weight", "repeat.1.h.h_proj.weight", "h_4.h_proj.weight"]
    assert list(unit.shapes) == ["x", "h", "h_1", "h_2", "repeat.0.h", "repeat.1.h", "y"]


def test_names_give_the_first_free_suffix():
    names = Names(["h", "h_2", "h_1_1"])
    assert [names.fresh(b) for b in ["h", "h", "h_1", "h", "h_1", "x", "x"]] == \
        ["h_1", "h_3", "h_1_2", "h_4", "h_1_3", "x", "x_1"]
    assert names == {"h", "h_1", "h_2", "h_3", "h_4", "h_1_1", "h_1_2", "h_1_3", "x", "x_1"}


def _elaboration_steps(reassignments: int) -> int:
    """Python line events while elaborating `h = h + 1` so many times: the interpreter's work, counted."""
    program = load("model M() {\n  input x: [B, 4]\n  h = x\n" + "  h = h + 1\n" * reassignments
                   + "  output y = h\n}\n")
    unit = ModelIR(program, pick_model(program, None), {}, Limits())
    steps = 0

    def count(frame, event, arg):
        nonlocal steps
        steps += 1
        return count

    sys.settrace(count)
    try:
        elaborate(unit)
    finally:
        sys.settrace(None)
    return steps


def test_elaborating_reassignments_is_linear_in_their_number():
    # Four times the statements, four times the steps (about 240 per statement); searching for a free name from
    # the bare `h` at each statement took about 12 times as many (2.4 million steps for 1,200).
    small, large = _elaboration_steps(300), _elaboration_steps(1200)
    assert large < 4.5 * small, (small, large)
