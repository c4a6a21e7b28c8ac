"""A search's settings, each checked before any storage is touched, as the SearchPlan every process runs from."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import itertools
import json
import os
import pickle
import sys
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from gatedsl.search.space import Space

SAMPLERS = ("random", "grid", "tpe", "nsga2")
BUILTIN_OBJECTIVES = ("metric", "params", "flops", "latency")  # what a task result (or the screen) gives
DEFAULT_STORAGE = "gatedsl-search.db"
MEMORY = "memory"
GRID_FLOAT_POINTS = 3
MAX_GRID = 10_000  # candidates a grid may have: each worker holds the grid, and each trial stores its choices


class SearchError(ValueError):
    """A search that cannot run as asked: an unknown sampler or objective, a storage that cannot be opened."""


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
        task_obj = load_task(task, task_options)
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
        grid_candidates(space)
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


def load_task(name: str, options: dict[str, Any]):
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


def grid_candidates(space: Space) -> list[dict]:
    """The grid sampler's candidates, floats at GRID_FLOAT_POINTS values; a SearchError if there are too many."""
    points = list(itertools.islice(space.grid(GRID_FLOAT_POINTS), MAX_GRID + 1))
    if len(points) > MAX_GRID:
        raise SearchError(f"the grid has more than {MAX_GRID:,} candidates (floats at {GRID_FLOAT_POINTS} values): "
                          f"fix some parameters (-p NAME=VALUE), or use the tpe or random sampler")
    return [space.canonical(d) for d in points]
