"""Optuna runs the search over a Space: samplers, static screening, de-duplication, pruning, resumable storage, workers."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, PrivateAttr

from gatedsl.search.space import Space

SAMPLERS = ("random", "grid", "tpe", "nsga2")
BUILTIN_OBJECTIVES = ("metric", "params", "flops", "latency")  # what a task result (or the screen) gives
DEFAULT_STORAGE = "gatedsl-search.db"
MEMORY = "memory"
GRID_FLOAT_POINTS = 3

# A killed worker's trial is noticed at once on its own machine (its process is gone) and, on any
# other, once its heartbeat is this old; it is then failed and queued again, at most MAX_RETRY times
# (a candidate that kills every process that trains it must not be retried forever).
HEARTBEAT_S, GRACE_S, MAX_RETRY = 10, 60, 3
POLL_S = 0.1  # seconds between looks at the study while waiting on other workers
# A sampler that proposes only candidates it has seen, this many times in a row, has nothing new to offer: the
# search stops there rather than record duplicates forever (they cost no training, only the sampler's time).
DUPLICATE_STREAK = 100
PARENT_POLL_S = 0.5  # seconds between a worker's looks at whether the search's process is still alive
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a Linux process gets when its parent ends
STOP_WAIT_S = 30  # seconds a worker has to hand its trial back after a Ctrl-C before it is killed
MAX_GRID = 10_000  # candidates a grid may have: each worker holds the grid, and each trial stores its choices


class SearchError(ValueError):
    """A search that cannot run as asked: an unknown sampler or objective, a storage that cannot be opened."""


class Candidate(BaseModel):
    """One evaluated candidate, as the leaderboard shows it."""

    number: int  # the Optuna trial that evaluated it
    dna: dict[str, Any]
    hash: str
    values: list[float]  # one per objective, in the order of `objectives`
    metric: float | None = None
    params: int | None = None
    flops: int | None = None
    latency_s: float | None = None


class SearchResult(BaseModel):
    """What a search found, read back from its storage (so it covers every worker and every resumed run)."""

    study: str
    storage: str  # the URL, password hidden; optuna.load_study(study_name=study, storage=...) reopens it
    objectives: list[str]
    trials: int  # distinct candidates decided: the count that `trials=` asks the study to reach
    complete: int  # of those `trials`, by how each ended
    pruned: int  # stopped early by the pruner
    screened_out: int  # failed a static check (a constraint, a budget) and were never trained
    failed: int  # the candidate's evaluation raised
    reused: int  # further trials of a candidate already decided, answered from its result (not in `trials`)
    errors: dict[str, int]  # why evaluations failed: each message with how many trials it failed
    best: list[Candidate]  # the best candidate, or for several objectives the Pareto set, lowest first objective first
    leaderboard: list[Candidate]  # every distinct completed candidate, best first (the Pareto set first)
    stopped: str | None = None  # why the search ended before reaching `trials` (a finished space, a stuck sampler)

    _space: Space | None = PrivateAttr(default=None)

    def bind(self, candidate: Candidate | None = None) -> str:
        """The spec's text with every parameter fixed to `candidate`'s values; by default the first of `best`."""
        if self._space is None:
            raise SearchError("a result read back from storage has no spec: rebuild the Space to bind a candidate")
        if candidate is None:
            if not self.best:
                raise SearchError("no candidate completed: there is no best to bind")
            candidate = self.best[0]
        return self._space.bind(candidate.dna)

    def summary(self) -> dict[str, Any]:
        """`{trials, complete, best: {dna, values}}`; with several objectives `best` is the Pareto set, a list."""
        entries = [{"dna": c.dna, "values": c.values} for c in self.best]
        if len(self.objectives) == 1:
            return {"trials": self.trials, "complete": self.complete, "best": entries[0] if entries else None}
        return {"trials": self.trials, "complete": self.complete, "best": entries}


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the search: what it had decided stays in its storage, and the same search resumes it."""

    def __init__(self, study: str, storage: str, trials: int, decided: int, complete: int):
        super().__init__(f"the search of study {study} was interrupted")
        self.study, self.storage, self.trials, self.decided, self.complete = study, storage, trials, decided, complete


@dataclass
class Tally:
    """The study's trials counted the way the budget counts them: each distinct candidate once."""

    total: int = 0  # every trial in the study, in any state
    decided: int = 0  # finished trials of distinct candidates: what counts towards `trials`
    complete: int = 0
    pruned: int = 0
    screened_out: int = 0
    failed: int = 0
    reused: int = 0  # finished trials that repeated a decided candidate
    running: int = 0
    waiting: int = 0
    streak: int = 0  # the latest finished trials that all repeated a decided candidate
    covered: set[str] = field(default_factory=set)  # hashes decided (complete or pruned) or in flight
    best: float | None = None  # the lowest first objective so far

    @property
    def pending(self) -> int:
        return self.running + self.waiting


class SearchPlan(BaseModel):
    """A search's settings, every one checked, and its study's name: what each worker process rebuilds it from."""

    spec: str  # a path or the text
    spec_file: str | None  # the file it names, None for a text
    model: str | None
    fixed: dict[str, Any]
    dims: dict[str, int]
    max_params: int | None
    max_flops: int | None
    max_file_size: int | None
    task: str | None
    task_options: dict[str, Any]
    objective_ref: str | None  # "module:function" or "path.py:function", resolved in each process
    objective_fn: Any  # or the callable itself (importable by reference when workers > 1)
    objectives: list[str]
    trials: int
    sampler: str
    storage: str | None  # a SQLAlchemy URL, or None for memory
    study: str
    workers: int
    seed: int
    steps: int | None
    opt_level: int
    cwd: str

    def space(self) -> Space:
        return Space(self.spec, model=self.model, fixed=self.fixed, dims=self.dims, max_params=self.max_params,
                     max_flops=self.max_flops, max_file_size=self.max_file_size)


# ---------------------------------------------------------------------------------------------------------------
# The public entry point


def search(spec: str | Path, *, task: str | None = None, objective: str | Callable | None = None, trials: int,
           sampler: str = "tpe", storage: str | None = None, study: str | None = None, workers: int = 1,
           objectives: tuple[str, ...] = ("metric",), seed: int = 0, model: str | None = None,
           fixed: dict[str, Any] | None = None, dims: dict[str, int] | None = None, max_params: int | None = None,
           max_flops: int | None = None, steps: int | None = None, task_options: dict[str, Any] | None = None,
           opt_level: int = 2, max_file_size: int | None = None,
           progress: Callable[[Tally, int], None] | None = None) -> SearchResult:
    """Search `spec`'s space until the study holds `trials` distinct candidates (a resumed study only runs the rest).

    `task` names a built-in task (`gatedsl.search.tasks`); `objective` is a callable (or "module:function")
    that takes the compiled module, or the DNA when its first parameter is named `dna`, and returns a float
    or a tuple (one value per name in `objectives`); it may take `report(step, value) -> bool` to be pruned.
    Every objective is minimised. `storage` is a SQLite path or URL, a PostgreSQL URL, or "memory"; by
    default `gatedsl-search.db` in the current directory, under a study name derived from the spec and task.
    Each candidate is evaluated from a seed derived from `seed` and its hash, so its value does not depend on
    the process, worker or order it is evaluated in. Ctrl-C raises SearchInterrupted (a KeyboardInterrupt).
    """
    return run_search(prepare_search(
        spec, task=task, objective=objective, trials=trials, sampler=sampler, storage=storage, study=study,
        workers=workers, objectives=objectives, seed=seed, model=model, fixed=fixed, dims=dims,
        max_params=max_params, max_flops=max_flops, steps=steps, task_options=task_options,
        opt_level=opt_level, max_file_size=max_file_size), progress=progress)


def run_search(plan: SearchPlan, *, progress: Callable[[Tally, int], None] | None = None) -> SearchResult:
    """Run a prepared search (see `search`) until its study holds `plan.trials` distinct candidates."""
    with _quiet_optuna():
        storage_obj = _open_storage(plan.storage)
        study_obj = _open_study(plan, storage_obj)  # created once, before any worker loads it
        try:
            if plan.workers == 1:
                _work(plan, study_obj, storage_obj, progress=progress)
            else:
                _spawn(plan, study_obj, progress)
        except KeyboardInterrupt:
            counts = tally(study_obj)
            raise SearchInterrupted(plan.study, _shown(plan.storage), plan.trials, counts.decided,
                                    counts.complete) from None
        space = plan.space()
        result = _result_of(study_obj, plan.storage, plan.objectives)
        result.stopped = _stopped(plan, tally(study_obj), space)
    result._space = space
    return result


def load_result(study: str, storage: str | None = None) -> SearchResult:
    """The result of an existing search, read from its storage (default: `gatedsl-search.db` here)."""
    url = storage_url(storage)
    if url is None:
        raise SearchError("an in-memory study ends with its process; give the storage it was saved in")
    with _quiet_optuna():
        storage_obj = _open_storage(url)
        try:
            study_obj = optuna.load_study(study_name=study, storage=storage_obj)
        except KeyError:
            names = optuna.get_all_study_names(storage_obj)
            raise SearchError(f"no study named {study!r} in {_shown(url)}; studies there: "
                              f"{', '.join(names) or 'none'}") from None
        meta = study_obj.user_attrs.get("gatedsl", {})
        objectives = meta.get("objectives") or [f"objective{i}" for i in range(len(study_obj.directions))]
        return _result_of(study_obj, url, objectives)


# ---------------------------------------------------------------------------------------------------------------
# Settings


def storage_url(storage: str | None) -> str | None:
    """The SQLAlchemy URL for a `--storage` value: None -> gatedsl-search.db here, a path -> SQLite, "memory" -> None.

    A SearchError says what is wrong with a malformed URL, or names the package a PostgreSQL URL needs.
    """
    if storage is None:
        return f"sqlite:///{Path.cwd() / DEFAULT_STORAGE}"
    if not isinstance(storage, str) or not storage:
        raise SearchError(f"storage must be a SQLite file or URL, a PostgreSQL URL or 'memory', got {storage!r}")
    if storage in (MEMORY, ":memory:", "sqlite://", "sqlite:///:memory:"):
        return None
    for scheme in ("postgresql://", "postgres://"):
        if storage.startswith(scheme):  # SQLAlchemy's default PostgreSQL driver is psycopg2; psycopg 3 is ours
            storage = "postgresql+psycopg://" + storage[len(scheme):]
    if "://" not in storage:
        url = f"sqlite:///{Path(storage).expanduser().resolve()}"
    elif storage.startswith(("sqlite:///", "postgresql+psycopg://")):
        url = storage
    else:
        raise SearchError(f"--storage must be a SQLite file or URL, or a PostgreSQL URL, got {storage!r}")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as err:
        raise SearchError(f"--storage {storage!r} is not a valid URL: {err}") from None
    if parsed.drivername == "sqlite":
        if not parsed.database or Path(parsed.database).is_dir():
            raise SearchError(f"--storage {storage!r} must name a SQLite file, not a directory")
    else:
        try:
            import psycopg  # noqa: F401  (SQLAlchemy and the storage's lock connect through it)
        except ImportError:
            raise SearchError('a PostgreSQL storage needs the psycopg driver: '
                              'pip install "gatedsl[postgres]"') from None
    return url


def prepare_search(spec: str | Path, *, task: str | None = None, objective: str | Callable | None = None,
                   trials: int, sampler: str = "tpe", storage: str | None = None, study: str | None = None,
                   workers: int = 1, objectives: tuple[str, ...] = ("metric",), seed: int = 0,
                   model: str | None = None, fixed: dict[str, Any] | None = None, dims: dict[str, int] | None = None,
                   max_params: int | None = None, max_flops: int | None = None, steps: int | None = None,
                   task_options: dict[str, Any] | None = None, opt_level: int = 2,
                   max_file_size: int | None = None) -> SearchPlan:
    """Check every setting of `search` and name the study, touching no storage: a SearchError says what is wrong."""
    if (task is None) == (objective is None):
        raise SearchError("give exactly one of a task (--task) and an objective (--objective module:function)")
    if sampler not in SAMPLERS:
        raise SearchError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    _check_int("trials", trials, low=1)
    _check_int("workers", workers, low=1)
    _check_int("seed", seed)
    _check_int("opt_level", opt_level, low=0, high=2)
    for name, value, low in (("steps", steps, 0), ("max_params", max_params, 1), ("max_flops", max_flops, 1),
                             ("max_file_size", max_file_size, 1)):
        if value is not None:
            _check_int(name, value, low=low)
    objectives = list(objectives)
    if not objectives or len(set(objectives)) != len(objectives) or not all(objectives):
        raise SearchError(f"objectives must be distinct non-empty names, got {objectives!r}")
    if task is None and (steps is not None or task_options):
        raise SearchError("steps and task options set how a task trains; an objective function trains as it likes")
    if task is not None:
        unknown = [o for o in objectives if o not in BUILTIN_OBJECTIVES]
        if unknown:
            raise SearchError(f"a task gives the objectives {', '.join(BUILTIN_OBJECTIVES)}; unknown: "
                              f"{', '.join(unknown)}")
    if study is not None:
        _check_study_name(study)
    url = storage_url(storage)
    if url is None and workers > 1:
        raise SearchError("workers share the study through its storage: give a SQLite file or PostgreSQL URL, "
                          "not memory")

    fixed = dict(fixed or {})
    task_options = dict(task_options or {})
    objective_ref, objective_fn, label, task_obj = None, None, task, None
    if task is not None:
        from gatedsl.api import load, pick_model

        declared = {p.name for p in pick_model(load(spec, max_file_size=max_file_size), model).params}
        task_obj = _task(task, task_options)
        for name, value in task_obj.fixed.items():
            if name not in declared:  # a spec may write the size out instead: the task checks its shapes
                continue
            if name in fixed and str(fixed[name]) != str(value):
                raise SearchError(f"task {task} needs {name}={value}; it cannot be fixed to {fixed[name]}")
            fixed[name] = value
    elif isinstance(objective, str):
        objective_ref = _absolute_ref(objective)
        label = load_objective(objective_ref).__name__
    elif callable(objective):
        objective_fn, label = objective, getattr(objective, "__name__", "objective")
        if workers > 1:
            try:
                pickle.dumps(objective)
            except Exception:
                raise SearchError("with workers > 1 each process imports the objective: pass a module-level "
                                  "function, or 'module:function'") from None
    else:
        raise SearchError(f"objective must be a callable or 'module:function', got {objective!r}")

    plan = SearchPlan(spec=str(spec), spec_file=None, model=model, fixed=fixed, dims=dict(dims or {}),
                      max_params=max_params, max_flops=max_flops, max_file_size=max_file_size, task=task,
                      task_options=task_options,
                      objective_ref=objective_ref, objective_fn=objective_fn, objectives=objectives, trials=trials,
                      sampler=sampler, storage=url, study="", workers=workers, seed=seed, steps=steps,
                      opt_level=opt_level, cwd=os.getcwd())
    space = plan.space()  # a spec error surfaces here, as a SpecError, before any storage is touched
    _check_model(space, task_obj)
    if sampler == "grid":
        _grid(space)
    if space.program.main.file != "<string>":
        plan.spec_file = space.program.main.file
    identity = json.dumps({"spec": space.identity, "model": model, "fixed": {k: str(v) for k, v in fixed.items()},
                           "dims": plan.dims, "max_params": max_params, "max_flops": max_flops, "task": task,
                           "task_options": task_options, "objective": objective_ref or label,
                           "objectives": objectives, "sampler": sampler, "seed": seed, "steps": steps},
                          sort_keys=True, default=str)
    stem = Path(plan.spec_file).stem if plan.spec_file else "spec"
    plan.study = study or f"{stem}-{label}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"
    return plan


def _check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low) \
            or (high is not None and value > high):
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(low, "an integer") if high is None \
            else f"an integer from {low} to {high}"
        raise SearchError(f"{name} must be {what}, got {value!r}")


def _check_study_name(name: Any) -> None:
    # Optuna keeps names of up to 512 characters; the default plot's file is named after the study.
    if not isinstance(name, str) or not name.strip() or len(name) > 512 or not name.isprintable():
        raise SearchError(f"a study name is 1 to 512 printable characters, got {name!r}")


def _check_model(space: Space, task) -> None:
    """The sizes given for counting FLOPs name symbolic sizes of the model's inputs, and the task can train it.

    Both are the same for every candidate, so one that builds answers for all (none builds: nothing to check).
    """
    if not space.dims and task is None:
        return
    candidate = next((dna for dna in itertools.islice(space.grid(GRID_FLOAT_POINTS), 64) if space.screen(dna).ok),
                     None)
    if candidate is None:
        return
    from gatedsl.api import analyse, check_dims, report

    rep = report(analyse(space.program, space.params(candidate), model=space.model.name, opt_level=0))
    check_dims(space.dims, list(rep.sizes), space.model.name)  # a SizeError: the CLI's usage error naming -d
    if task is not None:
        try:
            task.check_signature(rep.inputs, rep.input_dtypes, rep.outputs)
        except ValueError as err:
            raise SearchError(str(err)) from None


def _task(name: str, options: dict[str, Any]):
    from gatedsl.search.tasks import TASKS, get_task

    if name not in TASKS:
        raise SearchError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    try:
        return get_task(name, **options)
    except ValueError as err:  # bad options, as the task's own message says
        raise SearchError(str(err)) from None


def _absolute_ref(ref: str) -> str:
    module, sep, attr = ref.rpartition(":")
    if not sep or not module or not attr:
        raise SearchError(f"an objective is given as module:function or path.py:function, got {ref!r}")
    if module.endswith(".py"):
        return f"{Path(module).resolve()}:{attr}"
    return ref


def load_objective(ref: str) -> Callable:
    """The callable named by "package.module:function" (importable from here) or "path/to/file.py:function"."""
    module_name, _, attr = _absolute_ref(ref).rpartition(":")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise SearchError(f"no such file: {module_name}")
            name = "gatedsl_objective_" + hashlib.sha256(module_name.encode()).hexdigest()[:8]
            module = sys.modules.get(name)
            if module is None:
                loader = importlib.util.spec_from_file_location(name, module_name)
                module = importlib.util.module_from_spec(loader)
                sys.modules[name] = module  # pickle finds its functions by this name
                loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # as `python -m` would: modules beside the user are importable
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except SearchError:
        raise
    except Exception as err:  # the user's module failed to import: their error, shown cleanly
        raise SearchError(f"cannot import the objective's module {module_name}: {type(err).__name__}: {err}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SearchError(f"{module_name} has no function {attr!r}")
    return fn


# ---------------------------------------------------------------------------------------------------------------
# Storage and study


@contextlib.contextmanager
def _quiet_optuna():
    """Optuna logs every trial and warns about experimental features; the search reports for itself."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(previous)


def _shown(url: str | None) -> str:
    if url is None:
        return MEMORY
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _open_storage(url: str | None) -> RDBStorage | None:
    if url is None:
        return None
    import sqlalchemy.event
    import sqlalchemy.exc

    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        if not path.parent.is_dir():
            raise SearchError(f"cannot create the storage {path}: no such directory {path.parent}")
        _sqlite_wal(path)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # workers queue for the write lock, not fail on it
    else:
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        with _StorageLock(url, "gatedsl:tables"):  # two processes creating the tables at once collide in PostgreSQL
            storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                 grace_period=GRACE_S, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                     max_retry=MAX_RETRY))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as err:
        raise SearchError(f"cannot open the storage {_shown(url)}: {str(err).splitlines()[0]}") from None
    if url.startswith("sqlite:///"):
        # In WAL mode, synchronous=NORMAL keeps every commit through a crash of the process (SIGKILL included)
        # and skips an fsync per commit; only a power cut may lose the last ones.
        sqlalchemy.event.listen(storage.engine, "connect",
                                lambda conn, _: conn.execute("PRAGMA synchronous=NORMAL"))
        storage.engine.dispose()  # the connections opened so far predate the listener
    return storage


def _sqlite_wal(path: Path) -> None:
    # Write-ahead logging lets workers read the study while one of them writes; the mode is kept in the file.
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
            db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as err:
        raise SearchError(f"cannot open the storage {path}: {err}") from None


def _seed(plan: SearchPlan, slot: int) -> int:
    # Seeded by the trial's place in the study, not by the process: workers on any machine draw different
    # candidates, a resumed run draws new ones, and an uninterrupted one-worker run is reproducible.
    digest = hashlib.sha256(f"{plan.seed}:{slot}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _candidate_seed(seed: int, key: str) -> int:
    # From the search's seed and the candidate's hash alone: the same in any process, worker, retry or order.
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:4], "little")


@contextlib.contextmanager
def _reproducible(seed: int):
    """Evaluate a candidate from `seed` alone: torch's, Python's and NumPy's generators seeded with it (weights,
    batch order, dropout, noise), torch on one thread; what the caller had is put back after."""
    import random

    import numpy as np
    import torch

    threads = torch.get_num_threads()
    python_state, numpy_state = random.getstate(), np.random.get_state()
    # A matmul splits its sums by thread, so with another thread count a result differs in its last bits, and
    # after training so does the error: a value would depend on --workers and on the machine's cores.
    torch.set_num_threads(1)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            yield seed
    finally:
        torch.set_num_threads(threads)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _sampler(plan: SearchPlan, grid_size: int, slot: int, explore: bool) -> optuna.samplers.BaseSampler:
    """The sampler for the study's trial number `slot` (Optuna's samplers keep their state in the study).

    `explore` (the latest trial repeated a candidate) draws at random instead: a model-based sampler that has
    settled on its best candidates proposes them again and again, and a duplicate does not count as a trial.
    """
    seed = _seed(plan, slot)
    if plan.sampler == "random" or (explore and plan.sampler != "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    if plan.sampler == "grid":
        # One categorical over the grid's candidates: Space.grid() knows which parameters each one has
        # (conditional ones are absent where inactive), which a Cartesian product of parameters cannot say.
        # Its seed shuffles the grid, so it must be the same for every trial.
        return optuna.samplers.GridSampler({"grid_point": list(range(grid_size))}, seed=_seed(plan, 0))
    if plan.sampler == "tpe":
        # `group` models each set of parameters that occur together: the conditional ones are only sometimes there.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
    # A population of a fifth of the budget (8 to 50) leaves NSGA-II some generations on a small budget.
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(8, plan.trials // 5)))


def _open_study(plan: SearchPlan, storage: RDBStorage | None) -> optuna.Study:
    """Create the study, or load it (a resumed search, another worker); the sampler is set per trial."""
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=5) if len(plan.objectives) == 1
              else optuna.pruners.NopPruner())  # Optuna prunes single-objective trials only
    import sqlalchemy.exc

    try:
        study = optuna.create_study(study_name=plan.study, storage=storage, pruner=pruner, load_if_exists=True,
                                    directions=["minimize"] * len(plan.objectives),
                                    sampler=optuna.samplers.RandomSampler())
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise SearchError(f"cannot open the study in {_shown(plan.storage)}: {str(err).splitlines()[0]}") from None
    except ValueError as err:  # an existing study with another number of objectives
        raise SearchError(f"study {plan.study}: {err}") from None
    meta = study.user_attrs.get("gatedsl")
    if meta is None:
        study.set_user_attr("gatedsl", {"spec": plan.spec_file or "<text>",
                                        "task": plan.task, "objective": plan.objective_ref,
                                        "objectives": plan.objectives, "sampler": plan.sampler})
    elif meta.get("objectives") != plan.objectives:
        raise SearchError(f"study {plan.study} optimises {', '.join(meta['objectives'])}, not "
                          f"{', '.join(plan.objectives)}: name another study")
    return study


# ---------------------------------------------------------------------------------------------------------------
# Budget: one worker at a time decides whether to start a trial and creates it


class _StorageLock:
    """A lock every process using the storage shares: around "count the trials, then create one" (keyed by the
    study), so a study stops at exactly `trials`, and around creating Optuna's tables in a new database.

    SQLite studies live on one machine: an flock on a file beside the database. PostgreSQL studies may be
    shared by many machines: a session-level advisory lock on the server. Both are released if the holder dies.
    """

    def __init__(self, url: str | None, name: str):
        self._fd: int | None = None
        self._conn = None
        self._path: str | None = None
        self._key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        if url is not None and url.startswith("sqlite:///"):
            self._path = url[len("sqlite:///"):] + ".lock"
        elif url is not None:
            import psycopg
            from sqlalchemy.engine import make_url

            conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
            try:
                self._conn = psycopg.connect(conninfo, autocommit=True, connect_timeout=10)
            except psycopg.Error as err:
                raise SearchError(f"cannot open the storage {_shown(url)}: {str(err).strip()}") from None
        self.held = False

    def __enter__(self) -> "_StorageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def acquire(self) -> None:
        if self._path is not None:
            import fcntl

            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        elif self._conn is not None:
            self._conn.execute("SELECT pg_advisory_lock(%s)", (self._key,))
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._fd is not None:
            import fcntl

            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        elif self._conn is not None:
            self._conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))

    def close(self) -> None:
        self.release()
        if self._conn is not None:
            self._conn.close()


def tally(study: optuna.Study) -> Tally:
    """Count the study's trials: a trial failed by an interruption and queued again counts once, as its retry;
    a trial that repeated a decided candidate (`duplicate_of`) counts as reused, not towards the budget."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    out = Tally(total=len(trials))
    for t in trials:  # in the order of their numbers: the streak is the run of duplicates at the end
        key = t.user_attrs.get("hash")
        if t.state == TrialState.RUNNING:
            out.running += 1
        elif t.state == TrialState.WAITING:
            out.waiting += 1
        elif t.number in retried:
            continue
        elif "duplicate_of" in t.user_attrs:
            out.reused += 1
            out.streak += 1
            if t.state == TrialState.COMPLETE and (out.best is None or t.values[0] < out.best):
                out.best = t.values[0]
        else:
            out.decided += 1
            out.streak = 0
            if t.state == TrialState.COMPLETE:
                out.complete += 1
                if out.best is None or t.values[0] < out.best:
                    out.best = t.values[0]
            elif t.state == TrialState.PRUNED:
                out.screened_out += "screened_out" in t.user_attrs
                out.pruned += "screened_out" not in t.user_attrs
            else:
                out.failed += 1
                continue  # a failed evaluation may be tried again: it does not cover its candidate
        if key is not None:
            out.covered.add(key)
    return out


def _stopped(plan: SearchPlan, counts: Tally, space: Space) -> str | None:
    """Why a search ended short of `plan.trials` distinct candidates, or None if it reached them."""
    if counts.decided >= plan.trials:
        return None
    limit = _limit(plan, space, _grid(space) if plan.sampler == "grid" else [])
    short = f"stopped after {counts.decided} of the {plan.trials} trials asked for"
    if len(counts.covered) >= limit:
        where = "grid" if plan.sampler == "grid" else "space"
        return f"{short}: the {where} has {limit:,} candidates and every one has been evaluated"
    if counts.streak >= DUPLICATE_STREAK:
        return (f"{short}: its last {counts.streak} trials proposed only candidates evaluated before, so few or "
                f"none are left to find")
    return None


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_started(os.getpid())}"


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by another user
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return not Path("/proc/self/stat").exists()  # no /proc: trust kill(pid, 0)
    return fields[0] != "Z" and (not started or fields[19] == started)


def fail_dead_trials(study: optuna.Study, storage: RDBStorage | None) -> int:
    """Fail the running trials of this machine's dead processes and queue their candidates again; return how many.

    Other machines' dead trials are found by Optuna's heartbeat once it is older than the grace period.
    """
    if storage is None:
        return 0
    host, me = socket.gethostname(), os.getpid()
    study_id = storage.get_study_id_from_name(study.study_name)
    count = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w_host, _, rest = t.user_attrs.get("worker", "").partition(":")
        pid_text, _, started = rest.partition(":")
        if w_host != host or not pid_text.isdigit() or int(pid_text) == me or _alive(int(pid_text), started):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, storage.get_trial(trial_id))
        count += 1
    return count


def _grid(space: Space) -> list[dict]:
    """The grid sampler's candidates, floats at GRID_FLOAT_POINTS values; a SearchError if there are too many."""
    points = list(itertools.islice(space.grid(GRID_FLOAT_POINTS), MAX_GRID + 1))
    if len(points) > MAX_GRID:
        raise SearchError(f"the grid has more than {MAX_GRID:,} candidates (floats at {GRID_FLOAT_POINTS} values): "
                          f"fix some parameters (-p NAME=VALUE), or use the tpe or random sampler")
    return [space.canonical(d) for d in points]


def _limit(plan: SearchPlan, space: Space, grid: list[dict]) -> float:
    """How many distinct candidates the sampler can propose."""
    return len(grid) if plan.sampler == "grid" else space.size


def _work(plan: SearchPlan, study: optuna.Study, storage: RDBStorage | None, *,
          progress: Callable[[Tally, int], None] | None = None) -> None:
    """One worker: start trials while the budget and the space last, then wait for the others' trials to end."""
    space = plan.space()
    grid = _grid(space) if plan.sampler == "grid" else []
    limit = _limit(plan, space, grid)
    lock = _StorageLock(plan.storage, plan.study)
    objective = _Objective(plan, space, grid, study, storage, lock)
    try:
        while True:
            lock.acquire()
            try:
                fail_dead_trials(study, storage)
                now = tally(study)
                room = (now.decided + now.pending < plan.trials and len(now.covered) < limit
                        and now.streak < DUPLICATE_STREAK)
                if now.decided >= plan.trials or (now.pending == 0 and not room):
                    break
                start = room or now.waiting > 0  # a queued retry holds budget already counted
                if start:
                    study.sampler = _sampler(plan, len(grid), now.total, explore=now.streak > 0)
                    try:
                        study.optimize(objective, n_trials=1, catch=(_CandidateFailed,))
                    except KeyboardInterrupt:
                        objective.requeue_interrupted()
                        raise
                    objective.current = None
            finally:
                lock.release()
            if progress is not None:
                progress(tally(study), plan.trials)
            if not start:  # what is left of the budget is in other workers' hands: wait for them
                if storage is not None:
                    optuna.storages.fail_stale_trials(study)
                time.sleep(POLL_S)
    finally:
        lock.close()


def _spawn(plan: SearchPlan, study: optuna.Study, progress) -> None:
    """Run `plan.workers` worker processes on the study until they are done; Ctrl-C interrupts them too."""
    # Workers fork from a fresh server process that has imported the engine once: unlike a plain fork they
    # inherit no threads or connections of this process (torch's thread pool, the storage's pool), and unlike
    # spawn they do not each import Optuna, SQLAlchemy and gatedsl again.
    context = get_context("forkserver")
    context.set_forkserver_preload(["gatedsl.search.engine", "alembic.migration", "optuna.storages._rdb.alembic"])
    failures = context.SimpleQueue()
    me = (os.getpid(), _started(os.getpid()))
    workers = [context.Process(target=_worker_main, args=(plan, i, me, failures), name=f"gatedsl-search-{i}")
               for i in range(plan.workers)]
    try:
        for w in workers:
            w.start()
        while failures.empty():
            running = [w.sentinel for w in workers if w.exitcode is None]
            if not running:
                break
            wait(running, timeout=0.5)
            if progress is not None:
                progress(tally(study), plan.trials)
    except KeyboardInterrupt:
        _stop(workers)
        raise
    if not failures.empty():
        _stop(workers)
        index, usage, message = failures.get()
        if usage:
            raise SearchError(message)
        raise RuntimeError(f"search worker {index} failed: {message}")
    for w in workers:
        w.join()
    dead = [w for w in workers if w.exitcode != 0]
    if dead:
        raise RuntimeError(f"search worker {workers.index(dead[0])} died (exit status {dead[0].exitcode})")


def _stop(workers: list) -> None:
    """Interrupt the workers still running (each hands its trial back to the study); kill any that hangs."""
    for w in workers:
        if w.pid is not None and w.exitcode is None:
            os.kill(w.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_WAIT_S
    for w in workers:
        if w.pid is not None:
            w.join(max(0.0, deadline - time.monotonic()))
            if w.exitcode is None:
                w.kill()
                w.join()


def _worker_main(plan: SearchPlan, index: int, parent: tuple[int, str], failures) -> None:
    _exit_with(*parent)
    signal.signal(signal.SIGINT, _interrupt_once)
    os.chdir(plan.cwd)
    with _quiet_optuna():
        try:
            storage = _open_storage(plan.storage)
            _work(plan, _open_study(plan, storage), storage)
        except KeyboardInterrupt:
            return  # its trial is back in the study; the search's process says what was interrupted
        except SearchError as err:
            failures.put((index, True, str(err)))
        except Exception as err:  # sent to the parent as text: not every exception survives pickling
            failures.put((index, False, f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))


def _interrupt_once(signum, frame) -> None:
    # Ctrl-C in a terminal reaches a worker twice, from the terminal and from the search's process: the second
    # must not cut short the first's handing back of the trial.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _exit_with(pid: int, started: str) -> None:
    """End this worker within a second of the search's process `pid`, however that ends (SIGKILL included)."""
    if sys.platform.startswith("linux"):
        # The kernel kills a worker when the thread that forked it ends: the forkserver's only thread, which ends
        # when the search's process does. Unlike the thread below, this stops a worker that C code keeps from
        # running Python.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def watch() -> None:
        while _alive(pid, started):
            time.sleep(PARENT_POLL_S)
        # Its trial stays RUNNING: the next search on this machine sees its process gone, fails it and retries it.
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="gatedsl-search-parent-watch", daemon=True).start()


# ---------------------------------------------------------------------------------------------------------------
# One trial


class _CandidateFailed(Exception):
    """The candidate's evaluation raised (the trial fails, the search goes on)."""


class _Objective:
    """The Optuna objective: suggest a DNA, reuse a duplicate's result, screen it, then evaluate it."""

    def __init__(self, plan: SearchPlan, space: Space, grid: list[dict], study: optuna.Study,
                 storage: RDBStorage | None, lock: _StorageLock):
        self.plan, self.space, self.grid, self.study, self.storage, self.lock = plan, space, grid, study, storage, lock
        self.single = len(plan.objectives) == 1
        self.task = _task(plan.task, plan.task_options) if plan.task is not None else None
        fn = plan.objective_fn or (load_objective(plan.objective_ref) if plan.objective_ref else None)
        self.fn = fn
        if fn is not None:
            try:
                names = list(inspect.signature(fn).parameters)
            except (TypeError, ValueError):
                names = []
            self.takes_dna = bool(names) and names[0] == "dna"
            self.takes_report = "report" in names
        self.current: int | None = None
        self.prune_requested, self.last_reported = False, math.nan

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        self.lock.release()  # the trial exists: other workers may start theirs
        self.current = trial.number
        trial.set_user_attr("worker", _worker_id())
        dna = self._suggest(trial)
        key = self.space.hash(dna)
        trial.set_user_attr("dna", dna)
        trial.set_user_attr("hash", key)
        earlier = self._earlier(trial, key)
        if earlier is not None:
            return self._reuse(trial, earlier)
        screened = self.space.screen(dna)
        trial.set_user_attr("params", screened.params)
        trial.set_user_attr("flops", screened.flops)
        if not screened.ok:
            trial.set_user_attr("screened_out", screened.reason)
            raise optuna.TrialPruned(f"screened out: {screened.reason}")
        try:
            with _reproducible(_candidate_seed(self.plan.seed, key)) as seed:
                values, attrs = self._evaluate(trial, dna, screened, seed)
        except (optuna.TrialPruned, SearchError):
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            raise _CandidateFailed(f"{type(err).__name__}: {err}") from err
        pruned = attrs.pop("pruned", False)
        for name, value in attrs.items():
            trial.set_user_attr(name, value)
        if pruned:
            raise optuna.TrialPruned("stopped early by the pruner")
        return values[0] if self.single else values

    def _suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        if self.plan.sampler == "grid":
            return dict(self.grid[trial.suggest_categorical("grid_point", list(range(len(self.grid))))])
        dna: dict[str, Any] = {}
        for dim in self.space.dimensions:
            if not dim.active(dna):  # a conditional parameter is suggested only where it exists
                continue
            if dim.kind == "int":
                dna[dim.name] = trial.suggest_int(dim.name, int(dim.low), int(dim.high), log=dim.log)
            elif dim.kind == "float":
                dna[dim.name] = trial.suggest_float(dim.name, float(dim.low), float(dim.high), log=dim.log)
            elif dim.kind == "bool":
                dna[dim.name] = trial.suggest_categorical(dim.name, [False, True])
            else:
                dna[dim.name] = trial.suggest_categorical(dim.name, list(dim.choices))
        return self.space.canonical(dna)

    def _earlier(self, trial: optuna.Trial, key: str) -> FrozenTrial | None:
        """The earlier trial of the same candidate whose result stands, waiting for it if it is still running."""
        while True:
            same = [t for t in self.study.get_trials(deepcopy=False)
                    if t.number != trial.number and t.user_attrs.get("hash") == key]
            for t in same:
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    return t
            # The lowest-numbered of several concurrent trials of one candidate evaluates it; the others wait.
            if not any(t.state == TrialState.RUNNING and t.number < trial.number for t in same):
                return None
            time.sleep(POLL_S)
            fail_dead_trials(self.study, self.storage)
            if self.storage is not None:
                optuna.storages.fail_stale_trials(self.study)

    def _reuse(self, trial: optuna.Trial, earlier: FrozenTrial) -> float | list[float]:
        for name, value in earlier.user_attrs.items():
            if name not in ("worker", "dna", "hash", "duplicate_of"):
                trial.set_user_attr(name, value)
        trial.set_user_attr("duplicate_of", earlier.user_attrs.get("duplicate_of", earlier.number))
        if earlier.state == TrialState.PRUNED:
            if self.single:  # the pruned curve, so TPE ranks the copy where it ranks the original
                for step, value in sorted(earlier.intermediate_values.items()):
                    trial.report(value, step)
            raise optuna.TrialPruned(f"same candidate as trial {earlier.number}")
        return earlier.values[0] if self.single else list(earlier.values)

    def _reporter(self, trial: optuna.Trial) -> Callable[[int, float], bool]:
        """`report(step, value)` for the evaluation: True once the pruner stops the trial (one objective only)."""

        def report(step: int, value: float) -> bool:
            if not self.single:
                return False
            trial.report(float(value), int(step))
            self.last_reported = float(value)
            self.prune_requested = self.prune_requested or trial.should_prune()
            return self.prune_requested

        return report

    def _evaluate(self, trial: optuna.Trial, dna: dict, screened, seed: int) -> tuple[list[float], dict[str, Any]]:
        self.prune_requested, self.last_reported = False, math.nan  # not the verdict on an earlier trial
        if self.task is not None:
            module = self.space.compile(dna, opt_level=self.plan.opt_level)
            result = self.task.evaluate(module, seed=seed, steps=self.plan.steps,
                                        report=self._reporter(trial) if self.single else None)
            attrs = {"metric": result.metric, "metric_name": result.metric_name, "params": result.params,
                     "flops": result.flops if result.flops is not None else screened.flops,
                     "latency_s": result.latency_s, "train_s": result.train_s, "steps": result.steps,
                     "pruned": result.pruned}
            return [self._builtin(name, attrs) for name in self.plan.objectives], attrs

        module = None if self.takes_dna else self.space.compile(dna, opt_level=self.plan.opt_level)
        kwargs = {"report": self._reporter(trial)} if self.takes_report else {}
        started = time.perf_counter()
        out = self.fn(dna if self.takes_dna else module, **kwargs)
        attrs: dict[str, Any] = {"params": screened.params, "flops": screened.flops,
                                 "train_s": time.perf_counter() - started, "pruned": self.prune_requested}
        if self.prune_requested:  # whatever it returned after being stopped, its metric is the last it reported
            attrs["metric"] = self.last_reported
            return [], attrs
        if isinstance(out, (tuple, list)):
            if len(out) != len(self.plan.objectives):
                raise SearchError(f"the objective returned {len(out)} values for {len(self.plan.objectives)} "
                                  f"objectives ({', '.join(self.plan.objectives)}): name one per value")
            values = [float(v) for v in out]
            attrs["metric"] = values[0]
            for name, value in zip(self.plan.objectives, values):
                if name in ("params", "flops"):
                    attrs[name] = int(value)
                elif name == "latency":
                    attrs["latency_s"] = value
            return values, attrs
        attrs["metric"] = float(out)
        extra = [n for n in self.plan.objectives if n not in ("metric", "params", "flops")]
        if extra:  # the screen gives params and FLOPs; latency and anything else only the objective knows
            raise SearchError(f"the objective returned one value, so it cannot also give {', '.join(extra)}: "
                              f"return a tuple, one value per objective")
        return [self._builtin(name, attrs) for name in self.plan.objectives], attrs

    @staticmethod
    def _builtin(name: str, attrs: dict[str, Any]) -> float:
        value = attrs["latency_s" if name == "latency" else name]
        if value is None:
            raise SearchError(f"no {name} is known for this candidate, so it cannot be an objective")
        return float(value)

    def requeue_interrupted(self) -> None:
        """Queue again the candidate a Ctrl-C cut short (Optuna failed its trial), so a resumed search runs it
        (and an in-memory study's count does not take the interrupted trial for a decided one)."""
        if self.current is None:
            return
        trial = self.study.get_trials(deepcopy=False)[self.current]
        if trial.state == TrialState.FAIL and "error" not in trial.user_attrs:
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(self.study, trial)


# ---------------------------------------------------------------------------------------------------------------
# Results


def _candidate(t: FrozenTrial) -> Candidate:
    a = t.user_attrs
    return Candidate(number=t.number, dna=a.get("dna", {}), hash=a.get("hash", ""), values=list(t.values),
                     metric=a.get("metric"), params=a.get("params"), flops=a.get("flops"),
                     latency_s=a.get("latency_s"))


def _result_of(study: optuna.Study, url: str | None, objectives: list[str]) -> SearchResult:
    counts = tally(study)
    seen: set[str] = set()
    distinct = []
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        if t.user_attrs.get("hash") not in seen:
            seen.add(t.user_attrs.get("hash"))
            distinct.append(t)
    pareto = {t.user_attrs.get("hash") for t in study.best_trials} if distinct else set()
    ranked = sorted(distinct, key=lambda t: (t.user_attrs.get("hash") not in pareto, list(t.values), t.number))
    board = [_candidate(t) for t in ranked]
    best = [c for c in board if c.hash in pareto]
    if len(objectives) == 1:
        best = best[:1]
    errors: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if "error" in t.user_attrs:
            errors[t.user_attrs["error"]] = errors.get(t.user_attrs["error"], 0) + 1
    return SearchResult(study=study.study_name, storage=_shown(url), objectives=list(objectives),
                        trials=counts.decided, complete=counts.complete, pruned=counts.pruned,
                        screened_out=counts.screened_out, failed=counts.failed, reused=counts.reused, errors=errors,
                        best=best, leaderboard=board)


__all__ = ["search", "prepare_search", "run_search", "load_result", "SearchPlan", "SearchResult", "Candidate", "Tally",
           "SearchError", "SearchInterrupted", "storage_url", "load_objective", "SAMPLERS", "BUILTIN_OBJECTIVES"]
