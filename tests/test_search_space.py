"""Search spaces from specs: dimensions and their conditions, grid, sampling, mutation, hashes, bound texts, budgets."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gatedsl
import gatedsl.errors
from gatedsl.search import Space

ROOT = Path(__file__).resolve().parents[1]
FORECASTER = ROOT / "specs" / "forecaster.gate"

# Every kind of dimension and condition: a choice among cells, bounded ints (one log), a log float, a bool that
# switches a branch, a parameter only read in that branch, one in its `else` under a nested if on a non-dimension
# parameter, a parameter read in two branches, and a parameter the model never reads (a training setting).
SMALL = textwrap.dedent("""\
    import std.cells

    model Small(
      cell: {GRU, MGU} = GRU,
      d: int in 4..12 = 8,
      lr: float in 1e-4..1e-1 log = 3e-4,
      mix: bool = true,
      depth: int in 1..3 = 1,
      big = d > 8,
      scale: int in 1..2 = 1,
      mode: {"sum", "last"} = "sum",
      act: {relu, tanh} = relu,
      steps: int in 1..64 log = 8,
    ) {
      input x: [B, T, 3]
      h = scan cell(linear(x, d), H=d) over T
      if mix {
        repeat depth { h = act(linear(h, d)) }
      } else {
        if big { h = h * scale }
      }
      if mode == "sum" { y = sum(h, 1) } else { y = h[:, -1] }
      if not mix { y = act(y) }
      output out = linear(y, 2)
    }
""")


@pytest.fixture(scope="module")
def small() -> Space:
    return Space(SMALL)


@pytest.fixture(scope="module")
def forecaster() -> Space:
    return Space(FORECASTER)


def spec_with_body(body: str, params: str) -> str:
    return f"model M({params}) {{\n  input x: [B, 4]\n{textwrap.indent(body, '  ')}\n}}\n"


# ------------------------------------------------------------- dimensions
def test_forecaster_dimensions_and_condition(forecaster):
    dims = {d.name: d for d in forecaster.dimensions}
    assert list(dims) == ["cell", "d", "layers", "attention", "heads"]
    assert (dims["cell"].kind, dims["cell"].choices) == ("choice", ["GRU", "LSTM", "MGU"])
    assert (dims["d"].kind, dims["d"].low, dims["d"].high, dims["d"].log) == ("int", 32, 512, False)
    assert (dims["layers"].low, dims["layers"].high) == (1, 4)
    assert dims["attention"].kind == "bool"
    assert (dims["heads"].low, dims["heads"].high) == (1, 16)
    # `heads` is read only inside `if attention { ... }` (twice): active exactly when attention is on.
    assert dims["heads"].condition == "attention == true"
    assert [d.condition for d in forecaster.dimensions[:4]] == [None] * 4
    assert dims["heads"].active({"attention": True}) and not dims["heads"].active({"attention": False})
    assert forecaster.size == 3 * 481 * 4 * (16 + 1)
    assert {d.name: d.default for d in forecaster.dimensions} == {
        "cell": "GRU", "d": 128, "layers": 2, "attention": True, "heads": 4}


def test_small_spec_dimensions_and_conditions(small):
    dims = {d.name: d for d in small.dimensions}
    assert list(dims) == ["cell", "d", "lr", "mix", "depth", "scale", "mode", "act", "steps"]  # `big` has no domain
    assert (dims["lr"].kind, dims["lr"].low, dims["lr"].high, dims["lr"].log) == ("float", 1e-4, 1e-1, True)
    assert (dims["steps"].kind, dims["steps"].log) == ("int", True)
    assert dims["mode"].choices == ["sum", "last"] and dims["act"].choices == ["relu", "tanh"]
    conditions = {name: d.condition for name, d in dims.items() if d.condition}
    # nested ifs conjoin, `else` negates, a condition on `big` (a parameter computed from d) narrows too;
    # `act` is read in the `mix` branch and under `not mix`: the disjunction covers both, so no condition.
    assert conditions == {"depth": "mix == true", "scale": "mix == false and big"}
    assert dims["scale"].active({"cell": "GRU", "d": 9, "mix": False})
    assert not dims["scale"].active({"cell": "GRU", "d": 8, "mix": False})
    assert not dims["scale"].active({"cell": "GRU", "d": 9, "mix": True})
    assert small.size == math.inf  # lr is a float


def test_conditions_on_choices_and_what_does_not_narrow():
    spec = "import std.cells\n" + spec_with_body(
        "h = linear(x, 8)\n"
        "if cell == GRU { h = h * k }\n"
        "use = wide > 2\n"
        "if use { h = h * a }\n"             # a value the body computes: not a condition on parameters
        "if later { h = h * b }\n"           # a parameter declared after b: not known when b is decided
        "output y = h + c",
        "cell: {GRU, MGU} = GRU, k: int in 1..3 = 1, wide: int in 1..4 = 1, a: int in 1..2 = 1, "
        "b: int in 1..2 = 1, later: bool = true, c: int in 0..1 = 0")
    dims = {d.name: d for d in Space(spec).dimensions}
    assert dims["k"].condition == "cell == GRU"
    assert dims["k"].active({"cell": "GRU"}) and not dims["k"].active({"cell": "MGU"})
    assert dims["a"].condition is None and dims["b"].condition is None and dims["c"].condition is None


def test_a_condition_says_each_clause_once():
    # `attention` and `attention == true` are different sources that read the same: one clause, not two.
    spec = spec_with_body(
        "h = linear(x, 8)\n"
        "if attention { h = h * heads }\n"
        "if attention == true { h = h + heads }\n"               # the same clause again, in another `if`
        "if attention { if attention == true { h = h * k } }\n"  # and nested: `a and a`
        "if attention { if mix { h = h * j } }\n"
        "if attention == true { if mix == true { h = h + j } }\n"
        "if mix { h = h * m } else { if wide > 2 { h = h * m } }\n"
        "output y = h",
        "attention: bool = true, mix: bool = false, wide: int in 1..4 = 1, heads: int in 1..4 = 2, "
        "k: int in 1..3 = 1, j: int in 1..3 = 1, m: int in 1..3 = 1")
    conditions = {d.name: d.condition for d in Space(spec).dimensions if d.condition}
    assert conditions == {"wide": "mix == false", "heads": "attention == true", "k": "attention == true",
                          "j": "attention == true and mix == true", "m": "mix == true or (mix == false and wide > 2)"}


def test_what_is_not_a_dimension():
    spec = "import std.mlp\n" + spec_with_body(
        "output y = ffn(linear(x, n * plain * k))",
        'n: int in 1..4 = 2, plain: int = 3, k = 2, ffn: block = SwiGLU, name: str = "x", w: float = 0.5')
    space = Space(spec)
    assert [d.name for d in space.dimensions] == ["n"]
    assert Space(spec, fixed={"n": 3}).dimensions == [] and Space(spec, fixed={"n": 3}).size == 1


@pytest.mark.parametrize("params,where", [
    ("d: int in 1..8 = 4, e: int in 1..d = 2", "e: int in 1..d"),       # a bound that depends on another parameter
    ("d: float in 0.0..1e400 = 1.0", "d: float in 0.0..1e400"),         # a bound that is not finite
    ("d: {1, 2 + 3} = 1", "d: {1, 2 + 3}"),                             # a choice that is an expression
    ("d: int in 8..4 = 4", "d: int in 8..4"),                           # an empty domain
    ("d: float in 0.0..1.0 log = 0.5", "d: float in 0.0..1.0 log"),     # a log domain from zero
])
def test_a_domain_the_search_cannot_sample_is_refused_at_the_parameter(params, where):
    spec = spec_with_body("output y = x", params)
    with pytest.raises(gatedsl.SpecError) as err:
        Space(spec)
    line = spec.splitlines()[err.value.line - 1]
    assert err.value.line == 1 and where in line, err.value.render()


def test_fixed_and_dims_are_checked():
    with pytest.raises(gatedsl.SpecError, match="no parameter 'features'"):
        Space(FORECASTER, fixed={"features": 8})
    with pytest.raises(gatedsl.SpecError, match="'d' must be a static int"):
        Space(FORECASTER, fixed={"d": [64]})
    with pytest.raises(gatedsl.SpecError, match="outside its domain"):
        Space(FORECASTER, fixed={"d": 1024})
    # text, as `-p attention=false` gives it, is read as the parameter's type: then heads is never active
    off = Space(FORECASTER, fixed={"attention": "false", "d": "64", "cell": "MGU"})
    assert off.fixed == {"attention": False, "d": 64, "cell": "MGU"}
    assert [d.name for d in off.dimensions] == ["layers", "heads"] and off.size == 4
    assert off.hash({"layers": 2}) == Space(FORECASTER, fixed={"attention": False, "d": 64, "cell": "MGU"}).hash(
        {"layers": 2, "heads": 3})
    with pytest.raises(gatedsl.errors.SizeError, match="T=0: a size must be a positive integer"):
        Space(FORECASTER, dims={"T": 0})


# ------------------------------------------------------------- candidates
def test_canonical_drops_inactive_types_values_and_refuses_bad_dnas(forecaster):
    dna = {"cell": "LSTM", "d": 64.0, "layers": 2, "attention": False, "heads": 3}
    assert forecaster.canonical(dna) == {"cell": "LSTM", "d": 64, "layers": 2, "attention": False}
    assert type(forecaster.canonical(dna)["d"]) is int
    assert forecaster.hash(dna) == forecaster.hash({**dna, "heads": 16}) == forecaster.hash(
        {"attention": False, "layers": 2, "d": 64, "cell": "LSTM"})
    assert forecaster.hash(dna) != forecaster.hash({**dna, "attention": True})
    with pytest.raises(ValueError, match="no value for the active dimension 'heads'"):
        forecaster.canonical({"cell": "GRU", "d": 64, "layers": 2, "attention": True})
    for bad in ({**dna, "d": 513}, {**dna, "d": 64.5}, {**dna, "cell": "RHN"}, {**dna, "attention": 1},
                {**dna, "layers": True}, {**dna, "width": 3}):
        with pytest.raises(ValueError):
            forecaster.canonical(bad)


def test_grid_is_every_candidate_once_and_its_length_is_size():
    space = Space(FORECASTER, fixed={"d": 64})
    grid = list(space.grid())
    assert len(grid) == space.size == 3 * 4 * (16 + 1)
    assert len({json.dumps(d, sort_keys=True) for d in grid}) == len(grid)
    assert len({space.hash(d) for d in grid}) == len(grid)
    assert all(space.canonical(d) == d for d in grid)
    assert sum(1 for d in grid if not d["attention"]) == 3 * 4 and all("heads" not in d for d in grid
                                                                      if not d["attention"])


def test_grid_of_a_space_with_nested_conditions():
    finite = Space(SMALL, fixed={"lr": 0.01, "steps": 4})
    grid = list(finite.grid())
    # Counted by hand: cell 2 × d 9 × mode 2 × act 2 × (mix: depth 3 | no mix: scale 2 where d > 8, else 1)
    expected = 2 * 2 * 2 * sum(3 + (2 if d > 8 else 1) for d in range(4, 13))
    assert len(grid) == finite.size == expected
    assert len({finite.hash(d) for d in grid}) == expected
    with_floats = Space(SMALL, fixed={"steps": 4})
    floats = list(with_floats.grid(float_points=3))
    assert len(floats) == 3 * expected and len({with_floats.hash(d) for d in floats}) == len(floats)
    assert with_floats.size == math.inf
    assert sorted({d["lr"] for d in floats}) == pytest.approx([1e-4, math.sqrt(1e-4 * 1e-1), 1e-1])


def test_inactive_dimensions_do_not_change_the_model(small):
    """The conditions are sound: a model built with any value of an inactive dimension is the same model."""
    checked = 0
    for space, candidates in ((Space(SMALL, fixed={"lr": 0.01, "steps": 4}), None),
                              (Space(FORECASTER), [{"cell": "MGU", "d": 48, "layers": 2, "attention": False}])):
        for dna in candidates or itertools.islice(space.grid(), 0, None, 7):
            base = gatedsl.check(space.program, params=space.params(dna))  # the parsed spec, reused
            for dim in space.dimensions:
                if dim.name in dna:
                    continue
                for value in dim.grid_values():
                    other = gatedsl.check(space.program, params={**space.params(dna), dim.name: value})
                    assert (other.params, other.flops_expr, other.shapes) == \
                        (base.params, base.flops_expr, base.shapes)
                    checked += 1
    assert checked > 20


def test_sampling_is_seeded_and_in_the_domain(small):
    draws = [small.sample(seed) for seed in range(300)]
    assert draws == [small.sample(seed) for seed in range(300)]
    assert draws[:5] == [small.sample(random.Random(seed)) for seed in range(5)]
    assert len({small.hash(d) for d in draws}) > 290
    for dna in draws:
        assert small.canonical(dna) == dna
    # log domains are sampled log-uniformly: a third of lr's draws fall below 1e-3, one in 1e-4..1e-3
    below = sum(d["lr"] < 1e-3 for d in draws) / len(draws)
    assert 0.25 < below < 0.42
    assert {d["mix"] for d in draws} == {False, True} and {d["cell"] for d in draws} == {"GRU", "MGU"}


def test_mutation_changes_an_active_dimension_and_stays_in_the_domain(small):
    rng = random.Random(0)
    moved: set[str] = set()
    for seed in range(200):
        parent = small.sample(seed)
        child = small.mutate(parent, rng)
        assert small.canonical(child) == child != parent
        assert small.hash(child) != small.hash(parent)
        assert small.mutate(parent, seed) == small.mutate(parent, seed)
        moved |= {k for k in child if child.get(k) != parent.get(k)}
    assert moved == {d.name for d in small.dimensions}
    one = Space(spec_with_body("output y = x * a", "a: int in 2..2 = 2"))
    with pytest.raises(ValueError, match="can change"):
        one.mutate({"a": 2}, 0)


def test_mutation_that_switches_a_branch_on_samples_what_it_activates(forecaster):
    off = {"cell": "GRU", "d": 64, "layers": 2, "attention": False}
    switched = [c for c in (forecaster.mutate(off, seed, rate=0.0) for seed in range(200)) if c["attention"]]
    assert switched and all(1 <= c["heads"] <= 16 for c in switched)
    assert len({c["heads"] for c in switched}) > 3


HASH_SCRIPT = """
import json, sys
from gatedsl.search import Space
space = Space(sys.argv[1])
print(json.dumps([space.hash(space.sample(seed)) for seed in range(20)]))
"""


def test_hash_is_the_same_in_another_process_and_names_content_not_paths(forecaster, tmp_path):
    here = [forecaster.hash(forecaster.sample(seed)) for seed in range(20)]
    copy = tmp_path / "elsewhere.gate"
    copy.write_text(FORECASTER.read_text())
    for spec in (FORECASTER, copy):
        done = subprocess.run([sys.executable, "-c", HASH_SCRIPT, str(spec)], capture_output=True, text=True,
                              check=True, cwd=tmp_path)
        assert json.loads(done.stdout) == here
    assert len(set(here)) == 20 and all(len(h) == 64 for h in here)
    dna = forecaster.sample(0)
    assert Space(FORECASTER, fixed={"d": dna["d"]}).hash({k: v for k, v in dna.items() if k != "d"}) != \
        forecaster.hash(dna)  # fixing a parameter makes another search
    assert Space(FORECASTER.read_text().replace("8)", "7)")).hash(dna) != forecaster.hash(dna)


# ------------------------------------------------------------ bound texts
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1),
       lr=st.floats(1e-4, 1e-1, allow_nan=False, allow_infinity=False))
def test_dna_of_bind_is_canonical_floats_included(small, seed, lr):
    dna = {**small.sample(seed), "lr": lr}
    text = small.bind(dna)
    assert small.dna_of(text) == small.canonical(dna)
    assert small.dna_of(text)["lr"] == lr  # the float is written repr-exact


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_a_bound_text_checks_to_the_model_of_its_dna(forecaster, seed):
    dna = forecaster.sample(seed)
    text = forecaster.bind(dna)
    assert forecaster.dna_of(text) == forecaster.canonical(dna)
    screened = forecaster.screen(dna)
    try:
        bound = gatedsl.check(text)
    except gatedsl.SpecError as err:
        assert not screened.ok and err.message == screened.reason
        return
    direct = gatedsl.check(FORECASTER, params=forecaster.params(dna))
    assert screened.ok and (screened.params, screened.flops) == (bound.params, bound.flops)
    keep = ("params", "params_by_block", "flops_expr", "shapes", "outputs", "parameters")
    assert {k: getattr(bound, k) for k in keep} == {k: getattr(direct, k) for k in keep}
    assert [(g.name, g.kind, g.line) for g in bound.gates] == [(g.name, g.kind, g.line) for g in direct.gates]


def test_a_bound_text_compiles_to_the_same_module(forecaster):
    import torch

    dna = {"cell": "LSTM", "d": 32, "layers": 2, "attention": True, "heads": 4}
    from_dna = forecaster.compile(dna)
    from_text = gatedsl.compile(forecaster.bind(dna))
    assert {k: v.shape for k, v in from_dna.state_dict().items()} == \
        {k: v.shape for k, v in from_text.state_dict().items()}
    from_text.load_state_dict(from_dna.state_dict())
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_text(x), from_dna(x), rtol=0, atol=0)
    assert sum(p.numel() for p in from_dna.parameters()) == forecaster.screen(dna).params


def test_bind_keeps_the_file_and_makes_relative_imports_absolute(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "blocks.gate").write_text("block Mix(x: [*, D]) {\n  return relu(linear(x, D))\n}\n")
    spec = tmp_path / "net.gate"
    spec.write_text('import lib.blocks   # local\nimport std.cells\n\n' + spec_with_body(
        "h = linear(x, d)\nif mix { h = Mix(h) }\noutput y = h * k", "d: int in 2..8, mix: bool, k = 2"))
    space = Space(spec, fixed={"k": 3})
    dna = {"d": 5, "mix": True}
    text = space.bind(dna)
    assert text.splitlines()[0] == f'import "{(tmp_path / "lib" / "blocks.gate").resolve()}"   # local'
    assert text.splitlines()[1:3] == ["import std.cells", ""]
    assert "model M(d: int in 2..8 = 5, mix: bool = true, k = 3) {" in text  # defaults given where there were none
    monkeypatch.chdir(ROOT)
    assert gatedsl.check(text).params == gatedsl.check(spec, params={"d": 5, "mix": True, "k": 3}).params
    assert space.dna_of(text) == dna


def test_dna_of_reads_the_active_dimensions_literally(forecaster):
    text = FORECASTER.read_text()
    with pytest.raises(gatedsl.SpecError, match="'d' is not set to a literal"):
        forecaster.dna_of(text.replace("= 128", "= 64 * 2"))
    with pytest.raises(gatedsl.SpecError, match="not in the domain of 'd'"):
        forecaster.dna_of(text.replace("= 128", "= 1024"))
    off = text.replace("attention: bool = true", "attention: bool = false").replace("16 = 4", "16 = 2 * 2")
    assert forecaster.dna_of(off) == {"cell": "GRU", "d": 128, "layers": 2, "attention": False}  # heads unread


# --------------------------------------------------------------- budgets
BUDGETED = textwrap.dedent("""\
    import std.cells
    model Budgeted(d: int in 8..256 = 32, layers: int in 1..4 = 1) {
      require param_count() <= 20_000, "at most 20k parameters"
      require flop_count(B=1, T=64) <= 2_000_000, "at most 2 MFLOPs per sequence of 64"
      input x: [B, T, 4]
      h = linear(x, d)
      repeat layers { h = scan GRU(h, H=d) over T }
      output y = linear(h, 4)
    }
""")


def gru_params(d: int, layers: int) -> int:
    """The model's learned elements, from the equations: an embedding, `layers` GRU cells, a head."""
    return (4 * d + d) + layers * 3 * (2 * d * d + 2 * d) + (d * 4 + 4)


def test_budgets_are_required_statically_with_the_requirement_message():
    assert gatedsl.check(BUDGETED, params={"d": 32}).params == gru_params(32, 1) <= 20_000
    with pytest.raises(gatedsl.SpecError) as err:
        gatedsl.check(BUDGETED, params={"d": 64})
    assert gru_params(64, 1) > 20_000
    assert err.value.message == "requirement failed: at most 20k parameters" and err.value.line == 3
    assert f"param_count() = {gru_params(64, 1):,}" in err.value.render()
    rep = gatedsl.check(BUDGETED, params={"d": 16, "layers": 4})
    assert rep.params <= 20_000
    flops = gatedsl.check(BUDGETED, params={"d": 16, "layers": 4}, dims={"B": 1, "T": 64}).flops
    assert flops > 2_000_000 / 4  # the budget below is then the binding one
    with pytest.raises(gatedsl.SpecError) as err:
        gatedsl.check(BUDGETED.replace("2_000_000", str(flops - 1)), params={"d": 16, "layers": 4})
    assert err.value.line == 4 and f"flop_count(B=1, T=64) = {flops:,}" in err.value.render()
    gatedsl.check(BUDGETED.replace("2_000_000", str(flops)), params={"d": 16, "layers": 4})  # at the limit: ok


@pytest.mark.parametrize("body,message", [
    ("h = x * param_count()", "param_count() is known only once the whole model is built"),
    ("require flop_count(B=1) < 10", "flop_count needs a size for T"),
    ("require flop_count(B=1, T=2, Q=3) < 10", "no symbolic size 'Q'"),
    ("require flop_count(1, 2) < 10", "takes the symbolic sizes by name"),
    ("require param_count(1) < 10", "at most 0 arguments"),
    ("h = Budget(x)", "known only for a whole model"),
])
def test_budget_misuse_is_a_spec_error(body, message):
    spec = ("block Budget(x: [*, D]) {\n  require param_count() < 5\n  return x\n}\n"
            "model M() {\n  input x: [B, T, 4]\n  h = x\n  " + body + "\n  output y = linear(h, 2)\n}\n")
    with pytest.raises(gatedsl.SpecError, match=re.escape(message)):
        gatedsl.check(spec)


def test_screen_flags_violations_with_their_message():
    space = Space(BUDGETED)
    ok = space.screen({"d": 16, "layers": 1})
    assert ok.ok and ok.reason is None and ok.params == gru_params(16, 1)
    assert ok.flops == gatedsl.check(BUDGETED, params={"d": 16, "layers": 1}).flops
    over = space.screen({"d": 64, "layers": 1})
    assert (over.ok, over.reason, over.params) == (False, "requirement failed: at most 20k parameters", None)
    capped = Space(BUDGETED, max_params=gru_params(16, 1) - 1)
    assert not capped.screen({"d": 16, "layers": 1}).ok and "parameters" in capped.screen({"d": 16, "layers": 1}).reason
    sized = Space(BUDGETED, dims={"B": 2, "T": 10}, max_flops=ok.flops * 20 - 1)
    verdict = sized.screen({"d": 16, "layers": 1})
    assert not verdict.ok and verdict.flops == ok.flops * 20 and "over the limit" in verdict.reason


def test_forecaster_screening_agrees_with_check(forecaster):
    for seed in range(12):
        dna = forecaster.sample(seed)
        verdict = forecaster.screen(dna)
        try:
            rep = gatedsl.check(FORECASTER, params=forecaster.params(dna))
        except gatedsl.SpecError as err:
            assert (verdict.ok, verdict.reason) == (False, err.message)
        else:
            assert (verdict.ok, verdict.params, verdict.flops) == (True, rep.params, rep.flops)


SCREEN_SCRIPT = """
import sys
from gatedsl.search import Space
space = Space(sys.argv[1])
verdicts = [space.screen(space.sample(seed)) for seed in range(40)]
assert any(v.ok for v in verdicts) and any(not v.ok for v in verdicts)
assert "torch" not in sys.modules, "screening imported torch"
print(sum(v.ok for v in verdicts))
"""


def test_screening_allocates_nothing_and_never_imports_torch(tmp_path):
    spec = tmp_path / "budgeted.gate"
    spec.write_text(BUDGETED)
    subprocess.run([sys.executable, "-c", SCREEN_SCRIPT, str(spec)], check=True, capture_output=True, text=True)
    subprocess.run([sys.executable, "-c", SCREEN_SCRIPT, str(FORECASTER)], check=True, capture_output=True,
                   text=True)


def test_gatedsl_check_reports_a_budget_violation(tmp_path):
    spec = tmp_path / "budgeted.gate"
    spec.write_text(BUDGETED)
    done = subprocess.run([sys.executable, "-m", "gatedsl", "check", str(spec), "-p", "d=64"], capture_output=True,
                          text=True)
    assert done.returncode == 1
    assert f"{spec}:3:11: error: requirement failed: at most 20k parameters" in done.stderr + done.stdout


def test_the_search_engine_is_exported_lazily():
    script = ("import sys\n"
              "import gatedsl.search\n"
              "assert 'optuna' not in sys.modules and 'torch' not in sys.modules\n"
              "from gatedsl.search import search\n"
              "from gatedsl.search import load_result\n"
              "from gatedsl.search.engine import search as engine_search, load_result as engine_load_result\n"
              "assert search is engine_search and load_result is engine_load_result\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        gatedsl.search.nothing  # noqa: B018


@pytest.mark.parametrize("odd", ["\f", "\v", "\x85", "\u2028", "\x1c"])
def test_bind_edits_where_the_parser_counted_with_a_bom_and_odd_line_breaks(tmp_path, odd):
    # str.splitlines() breaks lines where the lexer does not, and a byte-order mark is not part of the spec:
    # both once moved every edit of bind() off its parameter.
    spec = tmp_path / "net.gate"
    spec.write_text("\ufeff" + f"# a comment{odd}with a break the lexer does not count\n" + spec_with_body(
        "output y = linear(x, d) * k", "d: int in 2..8 = 4, k = 2"), encoding="utf-8")
    space = Space(spec, fixed={"k": 3})
    text = space.bind({"d": 7})
    assert "model M(d: int in 2..8 = 7, k = 3) {" in text
    assert not text.startswith("\ufeff") and odd in text
    assert space.dna_of(text) == {"d": 7}


def test_fixing_a_parameter_the_model_lacks_is_an_override_error_listing_its_parameters():
    with pytest.raises(gatedsl.errors.OverrideError) as caught:
        Space(spec_with_body("output y = linear(x, d)", "d: int in 2..8 = 4"), fixed={"colour": "red"})
    assert caught.value.reason == "model M has no parameter 'colour'; its parameters are: d"


def test_a_spec_over_the_file_size_limit_is_refused_before_the_search(tmp_path):
    spec = tmp_path / "net.gate"
    spec.write_text(spec_with_body("output y = linear(x, d)", "d: int in 2..8 = 4"))
    with pytest.raises(gatedsl.errors.LimitError, match="the limit for a spec file"):
        Space(spec, max_file_size=16)
