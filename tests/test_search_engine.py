"""The search engine on Optuna: samplers within the Space, the grid, screening, duplicates, pruning, tasks, workers.

The objectives are cheap functions of the DNA that log every evaluation (process, candidate, result) to a file
beside them, so the tests see exactly which candidates were trained, by which process, and how often.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from gatedsl.search.engine import SearchError, load_result, search, storage_url, tally
from gatedsl.search.space import Space

SPEC = textwrap.dedent("""\
    model Net(
      d: int in 4..6 = 5,
      act: {relu, tanh} = relu,
      attention: bool = false,
      heads: int in 1..3 = 1,
      lr: float in 1e-3..1e-1 log = 1e-2,
    ) {
      input x: [B, T, 3]
      h = act(linear(x, d))
      if attention {
        require d % heads == 0, "heads must divide d"
        h = h + linear(h, d) * heads
      }
      output y = linear(h, 3)
    }
""")

# Lorenz-96 maps [B, T, features] to the next states: the task fixes `features`.
FORECASTER = textwrap.dedent("""\
    model Forecast(features: int = 8, d: int in 4..8 = 6, act: {relu, tanh} = tanh) {
      input x: [B, T, features]
      h = act(linear(x, d))
      output y = linear(h, features)
    }
""")

OBJECTIVES = textwrap.dedent('''\
    """Test objectives: each logs what it evaluates to calls.jsonl beside this file."""
    import json, math, os, time
    from pathlib import Path

    LOG = Path(__file__).with_name("calls.jsonl")


    def _log(event, dna, **extra):
        with open(LOG, "a") as f:
            f.write(json.dumps({"event": event, "pid": os.getpid(), "dna": dna, **extra}) + "\\n")


    def _events():
        return [json.loads(line) for line in LOG.read_text().splitlines()] if LOG.exists() else []


    def value(dna):
        return ((dna["d"] - 5) ** 2 + (0.25 if dna["act"] == "tanh" else 0.0)
                + abs(math.log10(dna.get("lr", 0.01)) + 2) + 0.1 * dna.get("heads", 0))


    def score(dna):
        if dna.get("attention") and dna["d"] % dna["heads"]:
            raise AssertionError(f"a candidate that violates `require` was trained: {dna}")
        _log("start", dna)
        hang_at = os.environ.get("GATEDSL_TEST_HANG_AT")
        if hang_at and sum(e["event"] == "start" for e in _events()) == int(hang_at):
            _log("hang", dna)
            time.sleep(120)  # the test kills the process here
        result = value(dna)
        _log("done", dna, value=result)
        return result


    def pareto(dna):
        return score(dna), float(dna["d"] * (2 if dna.get("attention") else 1))


    def parallel(dna):
        """Waits (up to 60 s) until two processes are evaluating, so that workers really overlap."""
        _log("start", dna)
        deadline = time.time() + 60
        while len({e["pid"] for e in _events() if e["event"] == "start"}) < 2 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.05)
        result = value(dna)
        _log("done", dna, value=result)
        return result


    def together(dna):
        """Evaluates once two processes hold running trials of study "dups" in s.db beside this file (up to 60 s)."""
        import optuna

        study = optuna.load_study(study_name="dups", storage=f"sqlite:///{LOG.with_name('s.db')}")
        deadline = time.time() + 60
        while time.time() < deadline and len({t.user_attrs.get("worker") for t in study.get_trials(
                states=(optuna.trial.TrialState.RUNNING,)) if "hash" in t.user_attrs}) < 2:
            time.sleep(0.05)
        return score(dna)


    def curve(dna, report):
        """A training curve that falls towards value(dna); stops when the pruner says so."""
        _log("start", dna)
        final = value(dna)
        for step in range(1, 8):
            if report(step, final * (1 + 2 / step)):
                _log("pruned", dna, step=step)
                return None
        _log("done", dna, value=final)
        return final


    def params_of(module):
        return float(sum(p.numel() for p in module.parameters()))


    def broken(dna):
        raise RuntimeError("the objective broke")


    def stall(dna):
        """score(dna), except while GATEDSL_TEST_STALL is set: then it logs "stall" and sleeps until stopped."""
        if os.environ.get("GATEDSL_TEST_STALL"):
            _log("stall", dna)
            time.sleep(600)
        return score(dna)


    def interrupt(dna):
        """score(dna) for the first two candidates; the third is cut short by a Ctrl-C."""
        if len([e for e in _events() if e["event"] == "done"]) == 2:
            raise KeyboardInterrupt
        return score(dna)


    def noisy(dna):
        """A value drawn from Python's, NumPy's and torch's generators: the evaluation's seed decides it."""
        import random

        import numpy
        import torch

        return random.random() + float(numpy.random.rand()) + torch.rand(()).item()
''')


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "net.gate"
    path.write_text(SPEC)
    return path


@pytest.fixture
def objectives(tmp_path: Path) -> Path:
    path = tmp_path / "objectives.py"
    path.write_text(OBJECTIVES)
    return path


def events(objectives: Path, kind: str | None = None) -> list[dict]:
    log = objectives.with_name("calls.jsonl")
    found = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [e for e in found if kind is None or e["event"] == kind]


def key(dna: dict) -> str:
    return json.dumps(dna, sort_keys=True)


def load(result) -> optuna.Study:
    url = result.storage
    return optuna.load_study(study_name=result.study, storage=url.replace("postgresql://", "postgresql+psycopg://"))


def check_trained_once(objectives: Path, study: optuna.Study) -> None:
    """Every completed, non-reused trial's candidate was evaluated exactly once, and nothing else was."""
    done = [key(e["dna"]) for e in events(objectives, "done")]
    assert len(done) == len(set(done)), "a candidate was trained twice"
    evaluated = [key(t.user_attrs["dna"]) for t in study.get_trials(states=(TrialState.COMPLETE,))
                 if "duplicate_of" not in t.user_attrs]
    assert sorted(evaluated) == sorted(done)


def in_space(space: Space, dna: dict) -> bool:
    """The DNA is a candidate of the space: every active dimension in its domain, inactive ones absent."""
    expected = {}
    for dim in space.dimensions:
        if dim.active(expected):
            if dim.name not in dna or not dim.contains(dna[dim.name]):
                return False
            expected[dim.name] = dna[dim.name]
    return expected == dna


@pytest.mark.parametrize("sampler, objective, names", [
    ("random", "score", ("metric",)),
    ("tpe", "score", ("metric",)),
    ("nsga2", "pareto", ("error", "size")),
])
def test_every_sampler_stays_in_the_space(spec, objectives, tmp_path, sampler, objective, names):
    result = search(spec, objective=f"{objectives}:{objective}", trials=10, sampler=sampler, objectives=names,
                    storage=str(tmp_path / "s.db"), seed=3)
    space = Space(spec)
    study = load(result)
    trials = study.get_trials()
    assert result.trials == len(trials) == 10
    assert result.complete + result.pruned + result.screened_out + result.failed == 10 and result.failed == 0
    for t in trials:
        dna = t.user_attrs["dna"]
        assert in_space(space, dna), dna
        assert t.params == dna  # a conditional dimension is suggested only where it is active
        assert t.user_attrs["hash"] == space.hash(dna)
        screened = space.screen(dna)
        assert t.user_attrs["params"] == screened.params and t.user_attrs["flops"] == screened.flops
        if t.state == TrialState.COMPLETE:
            assert len(t.values) == len(names)
    check_trained_once(objectives, study)
    assert {c.hash for c in result.leaderboard} == {t.user_attrs["hash"] for t in trials
                                                     if t.state == TrialState.COMPLETE}


def test_grid_covers_the_grid_once_and_stops(spec, objectives, tmp_path):
    space = Space(spec, fixed={"lr": 0.01})
    grid = {space.hash(d) for d in space.grid()}
    assert len(grid) == 24
    result = search(spec, objective=f"{objectives}:score", trials=100, sampler="grid", fixed={"lr": 0.01},
                    storage=str(tmp_path / "s.db"))
    study = load(result)
    assert result.trials == 24 and result.reused == 0  # the grid is exhausted before the budget
    assert {t.user_attrs["hash"] for t in study.get_trials()} == grid
    assert result.screened_out == 6  # d=4 heads=3, d=5 heads=2 or 3 break `require d % heads == 0`, either act
    assert result.complete == 18
    check_trained_once(objectives, study)
    best = min(space.grid(), key=lambda d: (math.inf if d.get("attention") and d["d"] % d["heads"] else
                                              (d["d"] - 5) ** 2 + 0.25 * (d["act"] == "tanh") + 0.1 * d.get("heads", 0)))
    assert result.best[0].dna == best


def test_violators_are_screened_out_never_trained(spec, objectives, tmp_path):
    # `score` raises if it ever receives a candidate that breaks `require`; the run must not fail a single trial.
    result = search(spec, objective=f"{objectives}:score", trials=24, sampler="random", storage=str(tmp_path / "s.db"),
                    fixed={"lr": 0.01}, seed=1)
    study = load(result)
    screened = [t for t in study.get_trials() if "screened_out" in t.user_attrs and "duplicate_of" not in t.user_attrs]
    assert result.failed == 0 and result.errors == {}
    assert len(screened) == result.screened_out > 0
    for t in screened:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["screened_out"] == "requirement failed: heads must divide d"
        assert t.user_attrs["dna"]["d"] % t.user_attrs["dna"]["heads"] != 0
    trained = [e["dna"] for e in events(objectives, "start")]
    assert trained and all(not d.get("attention") or d["d"] % d["heads"] == 0 for d in trained)
    # Where every candidate breaks a budget, the search ends once it has seen them all, whatever the budget.
    hopeless = search(spec, objective=f"{objectives}:score", trials=500, sampler="tpe", storage="memory",
                      fixed={"lr": 0.01, "attention": False}, max_params=10)
    assert hopeless.trials == hopeless.screened_out == 6 and hopeless.best == []  # each candidate screened once
    assert hopeless.stopped == ("stopped after 6 of the 500 trials asked for: the space has 6 candidates and every "
                                "one has been evaluated")
    assert len(events(objectives, "start")) == len(trained)


def test_duplicates_reuse_the_stored_result(tmp_path, objectives):
    spec = tmp_path / "small.gate"
    spec.write_text(SPEC)
    result = search(spec, objective=f"{objectives}:score", trials=30, sampler="random", storage=str(tmp_path / "s.db"),
                    fixed={"lr": 0.01, "attention": False}, seed=0)
    study = load(result)
    trials = study.get_trials()
    # 6 candidates (3 d × 2 act): each trained once; every other trial is a reused duplicate with the same value.
    assert len(events(objectives, "done")) == 6
    check_trained_once(objectives, study)
    assert result.reused == len(trials) - 6 > 0
    first = {}
    for t in trials:
        first.setdefault(t.user_attrs["hash"], t)
    for t in trials:
        if "duplicate_of" in t.user_attrs:
            original = study.trials[t.user_attrs["duplicate_of"]]
            assert original.user_attrs["hash"] == t.user_attrs["hash"] and t.values == original.values
            assert first[t.user_attrs["hash"]].number == original.number
    assert len(trials) < 30  # the search stops once every candidate is known


def test_an_in_flight_duplicate_is_awaited_not_trained_again(spec, objectives, tmp_path):
    db = tmp_path / "s.db"
    same = {"d": 5, "act": "relu", "attention": False, "lr": 0.01}
    study = optuna.create_study(study_name="dups", storage=f"sqlite:///{db}")
    study.enqueue_trial(same)
    study.enqueue_trial(same)  # two workers take these at once: one trains, the other waits for its result
    result = search(spec, objective=f"{objectives}:together", trials=1, workers=2, storage=str(db), study="dups")
    first, second = load(result).get_trials()  # one candidate: the second trial does not count towards `trials`
    assert result.trials == 1 and result.reused == 1
    assert first.user_attrs["worker"] != second.user_attrs["worker"]
    assert first.state == second.state == TrialState.COMPLETE and first.values == second.values
    assert second.user_attrs["duplicate_of"] == first.number and "duplicate_of" not in first.user_attrs
    assert [e["dna"] for e in events(objectives, "done")] == [same]


def test_resume_adds_only_the_remaining_trials(spec, objectives, tmp_path):
    db = str(tmp_path / "s.db")
    first = search(spec, objective=f"{objectives}:score", trials=6, sampler="tpe", storage=db)
    before = {t.number: (t.state, t.values, t.user_attrs["dna"]) for t in load(first).get_trials()}
    again = search(spec, objective=f"{objectives}:score", trials=10, sampler="tpe", storage=db)
    assert again.study == first.study and again.trials == 10
    after = load(again).get_trials()
    assert {t.number: (t.state, t.values, t.user_attrs["dna"]) for t in after if t.number in before} == before
    check_trained_once(objectives, load(again))
    same = search(spec, objective=f"{objectives}:score", trials=10, sampler="tpe", storage=db)
    assert same.trials == 10 and len(load(same).get_trials()) == 10  # nothing left to do


def test_pruning_stops_poor_runs(spec, objectives, tmp_path):
    result = search(spec, objective=f"{objectives}:curve", trials=24, sampler="random", storage=str(tmp_path / "s.db"),
                    seed=2)
    study = load(result)
    pruned = [t for t in study.get_trials(states=(TrialState.PRUNED,)) if "screened_out" not in t.user_attrs
              and "duplicate_of" not in t.user_attrs]
    assert result.pruned >= len(pruned) > 0
    stopped = {key(e["dna"]): e["step"] for e in events(objectives, "pruned")}
    for t in pruned:
        step = stopped[key(t.user_attrs["dna"])]
        assert max(t.intermediate_values) == step < 7  # stopped where the pruner said, before the end
        assert t.user_attrs["metric"] == t.intermediate_values[step]
    assert result.best and all(c.values[0] == c.metric for c in result.leaderboard)


def test_objective_of_the_compiled_module_and_its_errors(spec, objectives, tmp_path):
    result = search(spec, objective=f"{objectives}:params_of", trials=3, sampler="random", storage="memory", seed=4)
    for c in result.leaderboard:
        assert c.values == [float(c.params)]  # the module it received has the screened parameter count
    broken = search(spec, objective=f"{objectives}:broken", trials=3, sampler="random", storage="memory")
    assert broken.complete == 0 and broken.best == []
    assert broken.failed == 3 - broken.screened_out and broken.errors == {"RuntimeError: the objective broke":
                                                                          broken.failed}
    with pytest.raises(SearchError, match="returned 2 values for 1 objectives"):
        search(spec, objective=f"{objectives}:pareto", trials=2, storage="memory")
    with pytest.raises(SearchError, match="cannot also give size"):
        search(spec, objective=f"{objectives}:score", trials=2, storage="memory", objectives=("metric", "size"))


def test_python_callable_objective(spec, tmp_path):
    seen = []

    def objective(dna):
        seen.append(dna)
        return float(dna["d"])

    result = search(spec, objective=objective, trials=6, sampler="random", storage="memory", seed=0)
    assert len(seen) == result.complete  # a trial that repeated a candidate is counted in `reused` alone
    assert result.best[0].values == [min(float(d["d"]) for d in seen)]
    assert result.summary() == {"trials": 6, "complete": result.complete,
                                "best": {"dna": result.best[0].dna, "values": result.best[0].values}}


def test_task_records_metric_params_flops_latency(tmp_path):
    spec = tmp_path / "forecast.gate"
    spec.write_text(FORECASTER)
    options = {"steps": 6, "eval_every": 2, "train_trajectories": 2, "val_trajectories": 1, "states": 24,
               "window": 8, "spinup": 50, "batch": 4}
    result = search(spec, task="lorenz96", task_options=options, trials=2, sampler="random",
                    objectives=("metric", "latency"), storage=str(tmp_path / "s.db"), seed=0)
    study = load(result)
    space = Space(spec, fixed={"features": 8})
    assert result.trials == result.complete == 2
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        a = t.user_attrs
        assert a["metric_name"] == "val_mse" and a["steps"] == 6 and a["train_s"] > 0
        assert t.values == [a["metric"], a["latency_s"]] and a["latency_s"] > 0 and math.isfinite(a["metric"])
        assert a["params"] == space.screen(a["dna"]).params and a["flops"] > 0
    with pytest.raises(SearchError, match="cannot be fixed"):
        search(spec, task="lorenz96", trials=1, fixed={"features": 4}, storage="memory")
    with pytest.raises(SearchError, match="bad options for task 'lorenz96'"):
        search(spec, task="lorenz96", trials=1, task_options={"window": 0}, storage="memory")


def test_workers_share_a_sqlite_study(spec, objectives, tmp_path):
    result = search(spec, objective=f"{objectives}:parallel", trials=8, sampler="random", workers=2,
                    storage=str(tmp_path / "s.db"), fixed={"attention": False}, seed=5)
    check_workers(result, objectives, workers=2, trials=8)


def test_workers_share_a_postgresql_study(spec, objectives, postgres_url):
    result = search(spec, objective=f"{objectives}:parallel", trials=8, sampler="tpe", workers=2,
                    storage=postgres_url, fixed={"attention": False}, seed=6)
    assert result.storage.startswith("postgresql")
    check_workers(result, objectives, workers=2, trials=8)


def check_workers(result, objectives: Path, *, workers: int, trials: int) -> None:
    """Exactly `trials` trials, none left running, each evaluated by one process once; the workers overlapped."""
    study = load(result)
    everything = study.get_trials()
    assert result.trials == len(everything) == trials
    assert not [t for t in everything if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    starts = events(objectives, "start")
    assert len({e["pid"] for e in starts}) >= 2
    assert len({t.user_attrs["worker"] for t in everything}) <= workers
    check_trained_once(objectives, study)
    assert len(starts) == len(events(objectives, "done"))  # every evaluation that began finished
    assert tally(study).decided == trials


# The tiny Lorenz-96 of these tests: a few trajectories, short windows, a handful of steps.
TINY = {"steps": 6, "eval_every": 2, "train_trajectories": 2, "val_trajectories": 1, "states": 24, "window": 8,
        "spinup": 50, "batch": 4}


def _values_by_hash(result) -> dict[str, list[float]]:
    return {t.user_attrs["hash"]: t.values for t in load(result).get_trials(states=(TrialState.COMPLETE,))}


def test_a_candidates_value_does_not_depend_on_what_ran_before(tmp_path):
    # The same candidate, trained first in one study and third in another, in this one process: the trainings
    # before it leave torch's generator elsewhere, and its weights, batches and result must not follow it.
    spec = tmp_path / "forecast.gate"
    spec.write_text(FORECASTER)
    target = {"d": 6, "act": "tanh"}
    values = []
    for name, before in (("first", []), ("third", [{"d": 4, "act": "relu"}, {"d": 8, "act": "tanh"}])):
        db = tmp_path / f"{name}.db"
        study = optuna.create_study(study_name=name, storage=f"sqlite:///{db}")
        for dna in [*before, target]:
            study.enqueue_trial(dna)
        result = search(spec, task="lorenz96", task_options=TINY, trials=len(before) + 1, storage=str(db),
                        study=name, seed=3)
        [trial] = [t for t in load(result).get_trials() if t.params == target]
        assert trial.state == TrialState.COMPLETE and trial.number == len(before)
        values.append(trial.values)
    assert values[0] == values[1]


def test_workers_give_each_candidate_the_value_one_process_gives(tmp_path):
    spec = tmp_path / "forecast.gate"
    spec.write_text(FORECASTER)
    common = dict(task="lorenz96", task_options=TINY, trials=4, sampler="random", seed=5)  # too few to prune
    alone = _values_by_hash(search(spec, storage=str(tmp_path / "one.db"), **common))
    shared = _values_by_hash(search(spec, storage=str(tmp_path / "two.db"), workers=2, **common))
    both = alone.keys() & shared.keys()
    assert len(both) >= 3 and all(alone[h] == shared[h] for h in both), (alone, shared)


def test_every_generator_is_seeded_by_the_candidate(spec, objectives, tmp_path):
    import random

    random.seed(1)
    first = _values_by_hash(search(spec, objective=f"{objectives}:noisy", trials=3, sampler="random",
                                   storage=str(tmp_path / "a.db"), fixed={"attention": False}, seed=7))
    random.random()  # what the caller's generators hold does not reach the evaluations, nor do they change it
    state = random.getstate()
    again = _values_by_hash(search(spec, objective=f"{objectives}:noisy", trials=3, sampler="random",
                                   storage=str(tmp_path / "b.db"), fixed={"attention": False}, seed=7))
    assert first == again and len(first) == 3 and random.getstate() == state


def test_a_pruned_trial_leaves_the_next_ones_alone(tmp_path, monkeypatch):
    # The pruner stops trial 0 at its first report and nothing else: the later trials train to the end.
    spec = tmp_path / "forecast.gate"
    spec.write_text(FORECASTER)
    monkeypatch.setattr(optuna.pruners.MedianPruner, "prune", lambda self, study, trial: trial.number == 0)
    result = search(spec, task="lorenz96", task_options=TINY, trials=3, sampler="random",
                    storage=str(tmp_path / "s.db"), seed=0)
    trials = [t for t in load(result).get_trials() if "duplicate_of" not in t.user_attrs]
    assert [t.state for t in trials] == [TrialState.PRUNED, TrialState.COMPLETE, TrialState.COMPLETE]
    assert [t.user_attrs["steps"] for t in trials[1:]] == [6, 6]


def test_trials_counts_distinct_candidates(spec, objectives, tmp_path):
    # TPE proposes the candidates it rates best again and again: those trials are recorded as duplicates, and
    # `trials` distinct candidates are evaluated all the same.
    result = search(spec, objective=f"{objectives}:score", trials=16, sampler="tpe", storage=str(tmp_path / "s.db"),
                    fixed={"lr": 0.01}, seed=0)
    trials = load(result).get_trials()
    counted = [t for t in trials if "duplicate_of" not in t.user_attrs]
    assert result.trials == len(counted) == len({t.user_attrs["hash"] for t in counted}) == 16
    assert result.reused == len(trials) - 16 > 0 and result.stopped is None
    assert result.complete + result.pruned + result.screened_out + result.failed == 16
    check_trained_once(objectives, load(result))


def test_trials_counts_distinct_candidates_across_workers_and_resumes(spec, objectives, tmp_path):
    db = str(tmp_path / "s.db")
    common = dict(objective=f"{objectives}:score", sampler="tpe", storage=db, fixed={"lr": 0.01}, seed=1)
    first = search(spec, trials=8, workers=2, **common)
    again = search(spec, trials=14, workers=2, **common)
    assert (first.trials, again.trials) == (8, 14)
    counted = [t for t in load(again).get_trials() if "duplicate_of" not in t.user_attrs]
    assert len(counted) == len({t.user_attrs["hash"] for t in counted}) == 14 and tally(load(again)).decided == 14
    check_trained_once(objectives, load(again))


def test_a_trial_waits_for_an_earlier_trial_to_name_its_candidate():
    # Two workers' trials of one candidate: the later one must not evaluate while the earlier has not yet set its
    # hash, or each would take the other for the later trial and both would train the candidate.
    import threading

    from gatedsl.search.trial import Objective

    study = optuna.create_study()
    earlier, later = study.ask(), study.ask()
    later.set_user_attr("hash", "h")
    objective = Objective.__new__(Objective)
    objective.study, objective.storage = study, None
    found = []
    looking = threading.Thread(target=lambda: found.append(objective._earlier(later, "h")))
    looking.start()
    time.sleep(0.5)
    assert looking.is_alive() and not found  # still waiting: trial 0 has not said what it evaluates
    earlier.set_user_attr("hash", "h")
    study.tell(earlier, 1.0)
    looking.join(timeout=10)
    assert [t.number for t in found] == [0]


def test_a_search_stops_when_its_sampler_only_repeats(spec, objectives, tmp_path, monkeypatch):
    import gatedsl.search.workers as workers

    monkeypatch.setattr(workers, "DUPLICATE_STREAK", 2)
    result = search(spec, objective=f"{objectives}:score", trials=6, sampler="random", storage=str(tmp_path / "s.db"),
                    fixed={"lr": 0.01, "attention": False}, seed=0)
    trials = load(result).get_trials()
    assert [("duplicate_of" in t.user_attrs) for t in trials[-2:]] == [True, True] and result.trials < 6
    assert result.stopped == (f"stopped after {result.trials} of the 6 trials asked for: its last 2 trials proposed "
                              f"only candidates evaluated before, so few or none are left to find")


def test_bad_settings_are_search_errors(spec, objectives, tmp_path):
    ref = f"{objectives}:score"
    cases = [
        (dict(objective=ref, trials=2, sampler="annealing"), "unknown sampler"),
        (dict(objective=ref, trials=0), "trials must be a positive integer"),
        (dict(objective=ref, trials=2, workers=0), "workers must be a positive integer"),
        (dict(objective=ref, trials=2, workers=2, storage="memory"), "workers share the study"),
        (dict(objective=ref, trials=2, storage="mysql://x/y"), "SQLite file or URL, or a PostgreSQL URL"),
        (dict(objective=ref, trials=2, storage=str(tmp_path / "no" / "such" / "s.db")), "no such directory"),
        (dict(objective=ref, task="parity", trials=2), "exactly one of a task"),
        (dict(trials=2), "exactly one of a task"),
        (dict(task="sudoku", trials=2), "unknown task 'sudoku'"),
        (dict(task="parity", trials=2, objectives=("metric", "beauty")), "unknown: beauty"),
        (dict(objective="no_such_module_here:f", trials=2), "cannot import the objective's module"),
        (dict(objective=f"{objectives}:nothing", trials=2), "has no function 'nothing'"),
        (dict(objective="score", trials=2), "module:function"),
        (dict(objective=ref, trials=2, objectives=("a", "a")), "distinct"),
        (dict(objective=ref, trials=2, steps=5), "steps and task options set how a task trains"),
        (dict(objective=lambda dna: 0.0, trials=2, workers=2, storage=str(tmp_path / "w.db")), "module-level"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SearchError, match=message):
            search(spec, **kwargs)


def test_a_study_keeps_its_objectives(spec, objectives, tmp_path):
    db = str(tmp_path / "s.db")
    search(spec, objective=f"{objectives}:score", trials=2, storage=db, study="mine")
    with pytest.raises(SearchError, match="optimises metric, not metric, params"):
        search(spec, objective=f"{objectives}:score", trials=2, storage=db, study="mine",
               objectives=("metric", "params"))
    back = load_result("mine", db)
    assert back.trials == 2 and back.objectives == ["metric"]
    with pytest.raises(SearchError, match="no study named 'other'"):
        load_result("other", db)


def test_a_dead_machines_trial_is_failed_by_its_heartbeat_and_retried(spec, objectives, tmp_path, monkeypatch):
    import gatedsl.search.storage as search_storage

    monkeypatch.setattr(search_storage, "HEARTBEAT_S", 1)
    monkeypatch.setattr(search_storage, "GRACE_S", 1)
    db = str(tmp_path / "s.db")
    first = search(spec, objective=f"{objectives}:score", trials=2, sampler="random", storage=db, study="shared")
    # A worker on another machine took a trial, beat once, and died: no process here can say it is gone.
    lost_dna = {"d": 6, "act": "relu", "attention": False, "lr": 0.01}
    with warnings.catch_warnings():  # Optuna's notes on using its heartbeat by hand, as this test does
        warnings.simplefilter("ignore")
        storage = search_storage.open_storage(storage_url(db))
        study = optuna.load_study(study_name="shared", storage=storage)
        study.enqueue_trial(lost_dna)
        lost = study.ask()
        lost.set_user_attr("worker", "elsewhere:4242:1")
        storage.record_heartbeat(lost._trial_id)
    assert first.trials == 2 and tally(study).running == 1
    time.sleep(2.5)
    result = search(spec, objective=f"{objectives}:score", trials=4, sampler="random", storage=db, study="shared")
    trials = load(result).get_trials()
    assert result.trials == 4 and trials[lost.number].state == TrialState.FAIL
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["dna"] == lost_dna
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
