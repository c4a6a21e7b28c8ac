"""Screening replays calls it has elaborated before (passes/elaborate/memo.py CallMemo): every candidate's unit, counts,
verdict and error must be exactly what elaborating it afresh gives, replayed calls, limits and failures included."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from gatedsl.errors import SpecError
from gatedsl.ir.graph import Graph
from gatedsl.ir.model import Limits, ModelIR
from gatedsl.ir.ops import UnaryAttrs
from gatedsl.passes import check_budgets, count_flops, count_params, elaborate
from gatedsl.passes.elaborate import CallMemo
from gatedsl.search import Space
from gatedsl.search.space import SCREENING_PASSES

ROOT = Path(__file__).resolve().parents[1]
SPEC_FILES = sorted(str(p.relative_to(ROOT)) for p in [*(ROOT / "specs").glob("*.gate"),
                                                       *(ROOT / "examples").glob("*.gate"),
                                                       *(ROOT / "examples" / "search").glob("*.gate")])

# Calls a replay must get right: a block returning its argument under another name (renames the caller's node:
# never memoised), a block read twice with one tensor (aliasing) and with two, a scan inside a block with its
# final state (out_names), a cell stepped directly, learned tensors (one named by its statement, one moved to
# `.learned`), dropout and noise modules, aux values, a block parameter's domain read where the call stands, a
# block-valued argument, custom inits, and a block whose `require` fails at some layers only.
CALLS = textwrap.dedent("""\
    import std.cells

    block same(x: [*, D]) {
      y = x
      return y
    }

    block pair(a: [*, D], b: [*, D], act: block = tanh) {
      gate g = sigmoid(linear(a, D, init=normal(0.02)))
      w = learned([D], init=ones)
      v = learned([D]) * linear(b, D, bias=false)
      aux energy = mean(w * w)
      return g * act(v) + dropout(b, 0.1) + noise_like(b) * 0.0
    }

    block recur(x: [*, T, D], H: int in 1..lim) {
      y, h_T = scan GRU(x, H=H) over T
      return linear(h_T, D) + mean(y, -2)
    }

    block checked(x: [*, D], i: int, limit: int) {
      require i < limit, "too deep"
      return linear(x, D)
    }

    model Calls(
      d: int in 4..16 = 8,
      layers: int in 1..4 = 2,
      twice: bool = true,
      cell: {GRU, MGU} = GRU,
      act: {tanh, relu} = tanh,
      lim: int in 8..32 = 16,
      limit: int in 1..5 = 5,
    ) {
      input x: [B, T, 3]
      h = linear(x, d)
      repeat i in layers as blocks {
        h = same(h)
        if twice { h = pair(h, h, act=act) } else { h = pair(h, linear(h, d), act=act) }
        h = h + unsqueeze(recur(h, H=d), 1)
        h = scan cell(h, H=d) over T
        s = cell(h[:, 0], H=d)
        h = checked(h, i, limit=limit) + unsqueeze(s, 1) * 0.0
      }
      output y = linear(h, 2)
    }
""")


def _dump_graph(graph: Graph) -> tuple:
    nodes = []
    for n in graph.order():
        data = dict(graph.node(n))
        attrs = data["attrs"]
        fields = {k: (_dump_graph(v) if isinstance(v, Graph) else v) for k, v in attrs.__dict__.items()}
        data["attrs"] = (type(attrs).__name__, fields)
        nodes.append((n, data))
    edges = sorted(graph.g.edges(data=True), key=lambda e: (e[0], e[1]))
    return (graph.name, nodes, edges, list(graph.g.nodes), graph.inputs, graph.outputs,
            [vars(p) for p in graph.params], [vars(m) for m in graph.modules], graph.aux, graph._next)


def _dump_error(err: SpecError) -> tuple:
    return (type(err), err.message, err.span, [(note.message, note.span) for note in err.notes], err.help)


def _analyse(space: Space, dna: dict, memo: CallMemo | None, limits: Limits | None = None):
    """Everything the screening passes leave in the unit (or the error they raise), elaborating with `memo`."""
    unit = ModelIR(space.program, space.model, space.params(dna), limits or space.limits, opt_level=0)
    try:
        unit = elaborate(unit, memo)
        for compiler_pass in (count_params, count_flops, check_budgets):
            unit = compiler_pass(unit)
    except SpecError as err:
        return _dump_error(err)
    return (_dump_graph(unit.graph), list(unit.shapes.items()), unit.parameters,
            [(id(stmt), env) for stmt, env in unit.budget_requires], unit.param_count, unit.params_by_block,
            unit.flops.terms)


def _candidates(space: Space, count: int) -> list[dict]:
    if space.size <= count:
        return list(space.grid())
    return [space.sample(seed) for seed in range(count)]


@pytest.mark.parametrize("spec", SPEC_FILES + ["CALLS"])
def test_units_with_the_memo_are_those_of_a_fresh_elaboration(spec):
    space = Space(CALLS if spec == "CALLS" else ROOT / spec)
    memo = CallMemo(space.program)
    # A call's record serves its own elaboration (the later layers); the memo keeps it once the call is seen
    # again, in the second pass, and the third replays it.
    for dna in _candidates(space, 20) * 3:
        assert _analyse(space, dna, memo) == _analyse(space, dna, None), dna
    assert memo.hits > 0 or len(memo) == 0


def test_the_calls_spec_replays_and_fails_as_elaborating_does():
    space = Space(CALLS)
    memo = CallMemo(space.program)
    failing = {"d": 6, "layers": 4, "twice": False, "cell": "MGU", "act": "relu", "lim": 8, "limit": 2}
    passing = dict(failing, limit=5)
    assert _analyse(space, passing, memo) == _analyse(space, passing, None)
    hits = memo.hits
    assert hits > 0  # layers 1 to 3 replay layer 0's calls
    # `checked` raises at layer 2, after layers 0 and 1 replayed every call (that one included).
    error = _analyse(space, failing, memo)
    assert error == _analyse(space, failing, None)
    assert error[1] == "requirement failed: too deep" and memo.hits > hits
    # A domain read where the call stands: `lim` bounds `recur`'s H, and d must lie within it.
    over = dict(passing, d=9, lim=8)
    assert _analyse(space, over, memo) == _analyse(space, over, None)
    assert "outside its domain" in _analyse(space, over, None)[1]


@pytest.mark.parametrize("limit", ["max_params", "max_nodes"])
def test_a_limit_crossed_inside_a_replayed_call_is_reported_where_elaborating_reports_it(limit):
    space = Space(ROOT / "specs" / "forecaster.gate")
    dna = {"cell": "LSTM", "d": 64, "layers": 4, "attention": True, "heads": 4}
    memo = CallMemo(space.program)
    complete = _analyse(space, dna, memo)  # records every call
    sizes = (complete[4], len(complete[0][1]) + sum(len(d["attrs"][1]["body"][1]) for _, d in complete[0][1]
                                                    if d["op"] == "scan"))
    for fraction in (0.3, 0.45, 0.6, 0.75, 0.9):  # in a later layer than the first: its calls would be replayed
        limits = (Limits(max_params=int(sizes[0] * fraction)) if limit == "max_params"
                  else Limits(max_nodes=int(sizes[1] * fraction)))
        error = _analyse(space, dna, memo, limits)
        assert error == _analyse(space, dna, None, limits)
        assert error[0].__name__ == "LimitError"


def test_screen_gives_the_verdicts_of_the_passes_run_without_the_memo():
    space = Space(ROOT / "specs" / "forecaster.gate", dims={"B": 4, "T": 32}, max_flops=2 * 10**9)
    rng = random.Random(0)
    candidates = [space.sample(rng) for _ in range(150)]
    for dna in candidates + candidates[:40]:
        unit = ModelIR(space.program, space.model, space.params(dna), space.limits, opt_level=0)
        try:
            for compiler_pass in SCREENING_PASSES:
                unit = compiler_pass(unit)
            flops = unit.flops.evaluate(space.dims)
            expected = (flops <= space.max_flops, unit.param_count, flops)
        except SpecError as err:
            expected = (False, None, None, err.message)
        screened = space.screen(dna)
        got = (screened.ok, screened.params, screened.flops) + ((screened.reason,) if screened.params is None else ())
        assert got == expected, dna
        if screened.params is not None and not screened.ok:
            assert screened.reason.startswith(f"the model has {flops:,} FLOPs")


def test_a_memo_serves_only_its_own_program_and_keeps_its_size():
    space, other = Space(ROOT / "specs" / "forecaster.gate"), Space(ROOT / "specs" / "forecaster.gate")
    dna = {"cell": "GRU", "d": 48, "layers": 3, "attention": True, "heads": 4}
    foreign = CallMemo(other.program)
    assert _analyse(space, dna, foreign) == _analyse(space, dna, None)
    assert len(foreign) == 0 and foreign.hits == foreign.misses == 0
    small = CallMemo(space.program, max_entries=1)
    for dna in [space.sample(seed) for seed in range(30)]:
        assert _analyse(space, dna, small) == _analyse(space, dna, None)
        assert len(small) <= 1


def test_the_networkx_view_follows_the_nodes_before_and_after_it_is_built():
    space = Space(CALLS)
    unit = elaborate(ModelIR(space.program, space.model, space.params(space.sample(1)), space.limits, opt_level=0))
    graph = unit.graph
    reads = {(src, n) for n in graph.order() for src, _ in graph.node(n)["inputs"]}
    assert set(graph.g.edges) == reads and list(graph.g.nodes) == graph.order()
    first = graph.order()[1]  # linear(x, d)
    node = graph.add("unary", UnaryAttrs(fn="tanh"), [(first, 0)], graph.node(first)["types"],
                     graph.node(first)["span"], "late")
    assert graph.g.has_edge(first, node) and node in graph and graph.g.edges[first, node]["type"] \
        == graph.type_of((first, 0))
    assert graph.g is graph.g  # built once


def test_a_call_is_kept_past_its_own_elaboration_once_seen_in_two():
    space = Space(ROOT / "specs" / "forecaster.gate")
    memo = CallMemo(space.program)
    dna = {"cell": "MGU", "d": 40, "layers": 3, "attention": True, "heads": 5}
    _analyse(space, dna, memo)
    assert (len(memo), memo.misses, memo.hits) == (0, 2, 4)  # layers 1 and 2 replay layer 0's scan and block
    _analyse(space, dna, memo)
    assert (len(memo), memo.misses, memo.hits) == (2, 4, 8)  # seen again: kept
    _analyse(space, dna, memo)
    assert (len(memo), memo.misses, memo.hits) == (2, 4, 14)  # every call replayed
