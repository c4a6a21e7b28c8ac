"""`gatedsl search`: --json, the leaderboard, --export-best, the Pareto plot, exit codes, resuming after SIGKILL,
and one study shared by several commands (machines) through PostgreSQL."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from conftest import process_running, wait_for
from optuna.trial import TrialState
from test_search_engine import FORECASTER, OBJECTIVES, SPEC, TINY, check_trained_once, events, key

import gatedsl
from gatedsl.cli.main import main
from gatedsl.search.engine import prepare_search, tally
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
    # Every option is checked before the search starts: none of these runs a trial.
    (["--task", "lorenz96", "--trials", 2, "--steps", -1], "steps must be a non-negative integer, got -1"),
    (["--objective", "OBJ:score", "--trials", 2, "--workers", 0], "workers must be a positive integer, got 0"),
    (["--objective", "OBJ:score", "--trials", 2, "--max-params", 0], "max_params must be a positive integer, got 0"),
    (["--objective", "OBJ:score", "--trials", 2, "--max-flops", -5], "max_flops must be a positive integer, got -5"),
    (["--task", "lorenz96", "--trials", 2, "--task-option", "batch=many"], "batch: Input should be a valid integer"),
    (["--task", "lorenz96", "--trials", 2, "--task-option", "colour=red"], "its options are: steps, batch"),
    (["--task", "parity", "--trials", 2], "task 'parity' needs a model of tokens int[B, T] -> logits [B, T, 2]"),
    (["--task", "lorenz96", "--trials", 2, "--objectives", "metric,beauty"], "unknown: beauty"),
    (["--objective", "OBJ:score", "--trials", 2, "--objectives", "metric,"], "distinct non-empty names"),
    (["--objective", "OBJ:score", "--trials", 2, "--storage", "postgresql://u@h:port/db"], "is not a valid URL"),
    (["--objective", "OBJ:score", "--trials", 2, "--storage", "sqlite:///"], "must name a SQLite file"),
    (["--objective", "OBJ:score", "--trials", 2, "--study", ""], "a study name is 1 to 512 printable characters"),
    (["--objective", "OBJ:score", "--trials", 2, "--study", "a\nb"], "a study name is 1 to 512 printable"),
    (["--objective", "OBJ:score", "--trials", 2, "-d", "B=-5"], "-d B=-5: a size must be a positive integer"),
    (["--objective", "OBJ:score", "--trials", 2, "-d", "t=64"],
     "-d t=64: model Net has no symbolic size 't'; its sizes are: B, T"),
    (["--objective", "OBJ:score", "--trials", 2, "-d", "B=x"], "-d B=x: a size must be a positive integer"),
    # -p and the spec file as check and compile take them
    (["--objective", "OBJ:score", "--trials", 2, "-p", "colour=red"],
     "-p colour=red: model Net has no parameter 'colour'; its parameters are:"),
    (["--objective", "OBJ:score", "--trials", 2, "--max-file-size", 0], "needs a positive integer"),
    (["--objective", "OBJ:score", "--trials", 2, "-O", 5], "invalid choice"),
])
def test_usage_errors_exit_2(spec, objectives, capsys, args, message):
    args = [str(a).replace("OBJ", str(objectives)) for a in args]
    assert main(search_cli(spec, *args)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not Path("gatedsl-search.db").exists() and events(objectives) == []  # no trial ran


def test_a_grid_too_large_to_walk_is_a_usage_error(objectives, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    forecaster = ROOT / "specs" / "forecaster.gate"  # 3 cells × 481 widths × 4 depths × (1 + 16 heads)
    assert main(search_cli(forecaster, "--objective", f"{objectives}:score", "--trials", 2, "--sampler", "grid")) == 2
    assert "gatedsl: error: the grid has more than 10,000 candidates" in capsys.readouterr().err
    assert not Path("gatedsl-search.db").exists()


def test_a_postgresql_storage_without_its_driver_names_the_extra(spec, objectives, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where psycopg is not installed
    assert main(search_cli(spec, "--objective", f"{objectives}:score", "--trials", 2,
                           "--storage", "postgresql://me@localhost/db")) == 2
    assert capsys.readouterr().err == ('gatedsl: error: a PostgreSQL storage needs the psycopg driver: '
                                       'pip install "gatedsl[postgres]"\n')


def test_a_finite_space_stops_when_every_candidate_is_evaluated(spec, objectives, capsys):
    # d × act with attention off and lr fixed is 6 candidates; 10 trials ask for more than there are.
    assert main(search_cli(spec, "--objective", f"{objectives}:score", "--trials", 10, "-p", "attention=false",
                           "-p", "lr=0.01", "--json")) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["trials"] == 6 and len(events(objectives, "done")) == 6
    assert ("note: stopped after 6 of the 10 trials asked for: the space has 6 candidates and every one has been "
            "evaluated\n") in err


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


def test_sigkill_then_the_same_command_resumes(spec, objectives, tmp_path):
    db = tmp_path / "s.db"
    command = _command(spec, objectives, str(db), 8, "-p", "attention=false")
    env = {**os.environ, "GATEDSL_TEST_HANG_AT": "4"}  # the 4th evaluation hangs until killed
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: events(objectives, "hang") or proc.poll() is not None, 120, "the 4th evaluation")
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


def test_the_same_command_gives_the_same_values_in_another_process(tmp_path):
    spec = tmp_path / "forecast.gate"
    spec.write_text(FORECASTER)
    command = [sys.executable, "-m", "gatedsl", "search", str(spec), "--task", "lorenz96", "--trials", "2",
               "--sampler", "random", "--storage", "memory", "--seed", "0", "--json",
               *[f"--task-option={name}={value}" for name, value in TINY.items()]]
    runs = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outs]
    first, second = (json.loads(out) for out, _ in outs)
    assert first == second and first["complete"] == 2  # JSON keeps every bit of a float


def _stalled_workers(objectives: Path) -> set[int]:
    return {e["pid"] for e in events(objectives, "stall")}


def _start_stalled(spec: Path, objectives: Path, db: Path, trials: int) -> tuple[subprocess.Popen, list[str]]:
    """A search with two workers, each stuck in an evaluation (the objective sleeps while GATEDSL_TEST_STALL is set)."""
    command = _command(spec, objectives, str(db), trials, "-p", "attention=false", "--workers", "2")
    command[command.index(f"{objectives}:score")] = f"{objectives}:stall"
    proc = subprocess.Popen(command, cwd=spec.parent, env={**os.environ, "GATEDSL_TEST_STALL": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(_stalled_workers(objectives)) == 2 or proc.poll() is not None, 180,
             "both workers to be evaluating")
    assert proc.poll() is None, proc.communicate()
    return proc, command


def _resume_counts_exactly(command: list[str], objectives: Path, db: Path, trials: int, cut_short: int) -> None:
    """The same command, run again, completes the study with exactly `trials` trials; the `cut_short` trials that
    were running were failed and their candidates evaluated again, once."""
    again = subprocess.run(command, cwd=db.parent, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    url = f"sqlite:///{db}"
    [name] = optuna.get_all_study_names(url)
    study = optuna.load_study(study_name=name, storage=url)
    assert json.loads(again.stdout)["trials"] == tally(study).decided == trials
    trials_ = study.get_trials()
    lost = [t for t in trials_ if t.state == TrialState.FAIL]
    assert len(lost) == cut_short and not [t for t in trials_ if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in lost:
        [retry] = [r for r in trials_ if r.system_attrs.get("failed_trial") == t.number]
        assert retry.state == TrialState.COMPLETE and retry.user_attrs["dna"] == t.user_attrs["dna"]
    check_trained_once(objectives, study)


def test_sigkill_of_a_search_ends_its_workers_and_the_same_command_resumes(spec, objectives, tmp_path):
    db = tmp_path / "s.db"
    proc, command = _start_stalled(spec, objectives, db, 6)
    workers = _stalled_workers(objectives)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    wait_for(lambda: not any(process_running(pid) for pid in workers), 30, f"the workers {workers} to end")
    _resume_counts_exactly(command, objectives, db, 6, cut_short=2)


def test_ctrl_c_of_a_search_with_workers_hands_their_trials_back(spec, objectives, tmp_path):
    db = tmp_path / "s.db"
    proc, command = _start_stalled(spec, objectives, db, 6)
    workers = _stalled_workers(objectives)
    proc.send_signal(signal.SIGINT)  # to the search's process alone: it interrupts its workers
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    [name] = optuna.get_all_study_names(f"sqlite:///{db}")
    assert err.endswith(f"interrupted: 0 of 6 trials done (0 complete); the same command resumes study {name} "
                        f"in sqlite:///{db}\n")
    assert not any(process_running(pid) for pid in workers)
    _resume_counts_exactly(command, objectives, db, 6, cut_short=2)


def test_ctrl_c_says_what_is_done_and_that_the_same_command_resumes(spec, objectives, capsys):
    args = ["--trials", 6, "--sampler", "random", "-p", "attention=false", "--study", "cut"]
    assert main(search_cli(spec, "--objective", f"{objectives}:interrupt", *args)) == 130
    assert capsys.readouterr().err.endswith(f"interrupted: 2 of 6 trials done (2 complete); the same command "
                                            f"resumes study cut in sqlite:///{Path.cwd()}/gatedsl-search.db\n")
    assert main(search_cli(spec, "--objective", f"{objectives}:score", *args, "--json")) == 0
    assert json.loads(capsys.readouterr().out)["trials"] == 6
    objectives.with_name("calls.jsonl").unlink()  # `interrupt` counts the evaluations it has logged
    assert main(search_cli(spec, "--objective", f"{objectives}:interrupt", *args, "--storage", "memory")) == 130
    assert capsys.readouterr().err.endswith("interrupted: 2 of 6 trials done (2 complete); the study was in memory, "
                                            "so its results are gone\n")


def test_the_default_plot_is_checked_before_the_search(spec, objectives, capsys):
    plan = prepare_search(spec, objective=f"{objectives}:pareto", trials=4, objectives=("error", "size"))
    Path(f"{plan.study}-pareto.png").mkdir()  # a directory in the way of the plot several objectives draw
    assert main(search_cli(spec, "--objective", f"{objectives}:pareto", "--trials", 4,
                           "--objectives", "error,size")) == 1
    assert capsys.readouterr().err == f"gatedsl: error: cannot write {plan.study}-pareto.png: it is a directory\n"
    assert events(objectives) == [] and not Path("gatedsl-search.db").exists()  # nothing was trained


def test_a_read_only_export_is_refused_before_the_search(spec, objectives, capsys, monkeypatch):
    Path("ro").mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # a read-only filesystem under ro/ (root may write anywhere else)
        if dir is not None and Path(dir).resolve() == Path("ro").resolve():
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    assert main(search_cli(spec, "--objective", f"{objectives}:score", "--trials", 3,
                           "--export-best", "ro/best.gate")) == 1
    assert capsys.readouterr().err == "gatedsl: error: cannot write ro/best.gate: Read-only file system\n"
    assert events(objectives) == [] and not Path("gatedsl-search.db").exists()


def test_a_disk_that_fills_during_the_search_leaves_the_study_saved(spec, objectives, capsys, monkeypatch):
    from matplotlib.figure import Figure

    def savefig(self, f, **kwargs):  # the disk is full by the time the plot is written
        f.write(b"\x89PNG")
        raise OSError(errno.ENOSPC, "No space left on device")

    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", savefig)
    args = search_cli(spec, "--objective", f"{objectives}:pareto", "--trials", 4, "--objectives", "error,size",
                      "--plot", "front.png", "--study", "full", "--sampler", "random")
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "leaderboard (Pareto set first)" in out
    assert err.endswith(f"gatedsl: error: cannot write front.png: No space left on device\nnote: the search itself "
                        f"finished; study full is saved in sqlite:///{Path.cwd()}/gatedsl-search.db, and the same "
                        f"command writes the files again without training\n")
    assert not [p for p in Path.cwd().iterdir() if "front" in p.name]  # no half-written plot
    trained = len(events(objectives, "done"))
    monkeypatch.setattr(Figure, "savefig", real)
    assert main(args) == 0 and Path("front.png").read_bytes()[:4] == b"\x89PNG"
    assert len(events(objectives, "done")) == trained  # the files came from the saved study
