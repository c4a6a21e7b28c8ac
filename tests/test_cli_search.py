"""`gatedsl search`: --json, the leaderboard, --export-best, the Pareto plot, exit codes, resuming after SIGKILL,
and one study shared by several commands (machines) through PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_search_engine import OBJECTIVES, SPEC, check_trained_once, events, key

import gatedsl
from gatedsl.cli.main import main
from gatedsl.search.engine import tally
from gatedsl.search.space import Space

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def spec(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the default storage and plot land here
    path = tmp_path / "net.gate"
    path.write_text(SPEC)
    return path


@pytest.fixture
def objectives(tmp_path: Path) -> Path:
    path = tmp_path / "objectives.py"
    path.write_text(OBJECTIVES)
    return path


def search_cli(*args: str) -> list[str]:
    return ["search", *map(str, args)]


def test_json_prints_trials_complete_and_the_best(spec, objectives, capsys):
    assert main(search_cli(spec, "--objective", f"{objectives}:score", "--trials", 6, "--sampler", "random",
                           "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"trials", "complete", "best"} and set(out["best"]) == {"dna", "values"}
    assert out["trials"] == 6 and 0 < out["complete"] <= 6
    done = {key(e["dna"]): e["value"] for e in events(objectives, "done")}
    assert out["best"]["values"] == [min(done.values())] and done[key(out["best"]["dna"])] == min(done.values())
    assert Path("gatedsl-search.db").is_file()  # the default storage, in the current directory


def test_json_for_several_objectives_is_the_pareto_set(spec, objectives, capsys):
    assert main(search_cli(spec, "--objective", f"{objectives}:score", "--trials", 12, "--sampler", "nsga2",
                           "--objectives", "metric,params", "--json")) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"trials", "complete", "best"} and isinstance(out["best"], list) and out["best"]
    space = Space(spec)
    points = {key(e["dna"]): (e["value"], space.screen(e["dna"]).params) for e in events(objectives, "done")}
    front = [tuple(entry["values"]) for entry in out["best"]]
    for entry in out["best"]:
        assert set(entry) == {"dna", "values"} and tuple(entry["values"]) == points[key(entry["dna"])]
    for candidate in points.values():  # nothing evaluated dominates a member of the front
        assert not any(candidate[0] <= a and candidate[1] <= b and candidate != (a, b) for a, b in front)
    assert {p for p in points.values() if not any(q[0] <= p[0] and q[1] <= p[1] and q != p
                                                  for q in points.values())} == set(front)
    plots = list(Path.cwd().glob("*-pareto.png"))
    assert len(plots) == 1 and plots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_and_plot_files(spec, objectives, capsys):
    assert main(search_cli(spec, "--objective", f"{objectives}:pareto", "--trials", 10, "--sampler", "nsga2",
                           "--objectives", "error,size", "--plot", "front.png", "--top", 3)) == 0
    out = capsys.readouterr().out
    assert "leaderboard (Pareto set first)" in out and "wrote front.png" in out and "the same command resumes" in out
    assert "10 trials:" in out
    import matplotlib.image

    image = matplotlib.image.imread("front.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert main(search_cli(spec, "--objective", f"{objectives}:score", "--trials", 4, "--plot", "history.png")) == 0
    assert "best first" in capsys.readouterr().out
    assert Path("history.png").read_bytes()[:4] == b"\x89PNG"


def test_export_best_round_trips_through_dna_of(spec, objectives, capsys):
    assert main(search_cli(spec, "--objective", f"{objectives}:score", "--trials", 8, "--sampler", "tpe",
                           "--json", "--export-best", "best.gate")) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    text = Path("best.gate").read_text()
    assert Space(spec).dna_of(text) == best["dna"]
    bound = Space("best.gate")
    assert bound.canonical(bound.dna_of(text)) == best["dna"]
    rep = gatedsl.check(Path("best.gate"))  # every parameter fixed: the defaults are the candidate
    assert all(rep.parameters[name] == value for name, value in best["dna"].items())


def test_fixed_parameters_from_the_command_line(spec, objectives, capsys):
    # -p values are text, as for `gatedsl compile`: attention=false leaves heads inactive, hence out of every DNA.
    assert main(search_cli(spec, "--objective", f"{objectives}:score", "--trials", 5, "--sampler", "random",
                           "-p", "attention=false", "-p", "lr=0.05", "--json", "--export-best", "fixed.gate")) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    assert set(best["dna"]) == {"d", "act"}
    assert all(set(e["dna"]) == {"d", "act"} for e in events(objectives))
    rep = gatedsl.check(Path("fixed.gate"))
    assert rep.parameters["attention"] is False and rep.parameters["lr"] == 0.05
    assert Space(spec, fixed={"attention": False, "lr": 0.05}).dna_of(Path("fixed.gate").read_text()) == best["dna"]


def test_export_best_never_overwrites_when_nothing_completes(spec, objectives, capsys):
    Path("best.gate").write_text("keep me\n")
    code = main(search_cli(spec, "--objective", f"{objectives}:score", "--trials", 3, "--max-params", 1,
                           "--export-best", "best.gate"))
    assert code == 1
    assert "no candidate completed" in capsys.readouterr().err
    assert Path("best.gate").read_text() == "keep me\n"
    assert events(objectives) == []  # every candidate was over the budget: none was trained


@pytest.mark.parametrize("args, message", [
    (["--trials", 2], "one of the arguments --task --objective is required"),
    (["--task", "parity", "--objective", "m:f", "--trials", 2], "not allowed with argument"),
    (["--objective", "OBJ:score", "--trials", 2, "--export-best", "x.txt"], "path ending in .gate"),
    (["--objective", "OBJ:score", "--trials", 2, "--plot", "x.jpg"], "path ending in .png"),
    (["--task", "sudoku", "--trials", 2], "unknown task 'sudoku'"),
    (["--objective", "OBJ:score", "--trials", 2, "--storage", "mysql://h/db"], "PostgreSQL URL"),
    (["--objective", "OBJ:score", "--trials", 2, "--workers", 2, "--storage", "memory"], "workers share"),
    (["--objective", "OBJ:missing", "--trials", 2], "has no function 'missing'"),
    (["--objective", "OBJ:score", "--trials", 0], "trials must be a positive integer"),
    (["--objective", "OBJ:score", "--trials", 2, "--sampler", "anneal"], "invalid choice"),
    (["--objective", "OBJ:score", "--trials", 2, "-p", "lr"], "-p must look like NAME=VALUE"),
    (["--objective", "OBJ:score", "--trials", 2, "--top", 0], "--top must be at least 1"),
    (["--task", "parity", "--trials", 2, "--task-option", "length=0"], "bad options for task 'parity'"),
])
def test_usage_errors_exit_2(spec, objectives, capsys, args, message):
    args = [str(a).replace("OBJ", str(objectives)) for a in args]
    assert main(search_cli(spec, *args)) == 2
    assert message in capsys.readouterr().err


def test_spec_errors_exit_1_and_missing_files_2(spec, objectives, tmp_path, capsys):
    bad = tmp_path / "bad.gate"
    bad.write_text("model Bad(d: int in 8..2 = 4) {\n  input x: [B, 3]\n  output y = linear(x, d)\n}\n")
    assert main(search_cli(bad, "--objective", f"{objectives}:score", "--trials", 2)) == 1
    assert "bad.gate:1:" in capsys.readouterr().err
    assert main(search_cli(tmp_path / "none.gate", "--objective", f"{objectives}:score", "--trials", 2)) == 2
    assert "no such file" in capsys.readouterr().err


def _command(spec: Path, objectives: Path, storage: str, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gatedsl", "search", str(spec), "--objective", f"{objectives}:score",
            "--trials", str(trials), "--sampler", "random", "--storage", storage, "--json", *extra]


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_then_the_same_command_resumes(spec, objectives, tmp_path):
    db = tmp_path / "s.db"
    command = _command(spec, objectives, str(db), 8, "-p", "attention=false")
    env = {**os.environ, "GATEDSL_TEST_HANG_AT": "4"}  # the 4th evaluation hangs until killed
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: events(objectives, "hang") or proc.poll() is not None, 120, "the 4th evaluation")
        assert proc.poll() is None, proc.communicate()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    url = f"sqlite:///{db}"
    [name] = optuna.get_all_study_names(url)
    killed = optuna.load_study(study_name=name, storage=url).get_trials()
    running = [t for t in killed if t.state == TrialState.RUNNING]
    assert len(running) == 1 and running[0].user_attrs["dna"] == events(objectives, "hang")[0]["dna"]
    before = {t.number: (t.state, t.values, t.user_attrs["dna"]) for t in killed if t.state.is_finished()}
    assert len([s for s, _, _ in before.values() if s == TrialState.COMPLETE]) == 3

    env.pop("GATEDSL_TEST_HANG_AT")
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    study = optuna.load_study(study_name=name, storage=url)
    trials = study.get_trials()
    assert out["trials"] == tally(study).decided == 8
    assert {t.number: (t.state, t.values, t.user_attrs["dna"]) for t in trials if t.number in before} == before
    lost = study.trials[running[0].number]
    assert lost.state == TrialState.FAIL  # failed as its process is gone, and queued again:
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == lost.number]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["dna"] == lost.user_attrs["dna"]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    check_trained_once(objectives, study)  # no finished candidate ran again
    log = events(objectives)
    hang = next(i for i, e in enumerate(log) if e["event"] == "hang")
    finished_before = {key(e["dna"]) for e in log[:hang] if e["event"] == "done"}
    started_after = {key(e["dna"]) for e in log[hang + 1:] if e["event"] == "start"}
    assert len(finished_before) == 3 and not finished_before & started_after
    assert key(log[hang]["dna"]) in started_after  # the killed trial's candidate ran again, to completion


def test_commands_on_two_machines_share_a_postgresql_study(spec, objectives, tmp_path, postgres_url):
    # Two commands, as two machines would run them (one with two workers), on one study in PostgreSQL.
    command = _command(spec, objectives, postgres_url, 12, "-p", "attention=false", "--study", "shared")
    command[command.index(f"{objectives}:score")] = f"{objectives}:parallel"
    procs = [subprocess.Popen(command + extra, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for extra in (["--workers", "2"], [])]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert all(json.loads(out)["trials"] == 12 for out, _ in outs)
    study = optuna.load_study(study_name="shared", storage=postgres_url.replace("postgresql://",
                                                                               "postgresql+psycopg://"))
    trials = study.get_trials()
    assert len(trials) == 12 and tally(study).decided == 12
    assert all(t.state == TrialState.COMPLETE for t in trials)
    check_trained_once(objectives, study)  # no two workers evaluated the same trial or the same candidate
    assert len(events(objectives, "start")) == len(events(objectives, "done"))
    assert len({e["pid"] for e in events(objectives, "start")}) >= 2
    assert len({t.user_attrs["worker"] for t in trials}) <= 3
