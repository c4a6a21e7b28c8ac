"""Optuna runs the search over a Space (samplers, static screening, de-duplication, pruning, resumable storage,
workers): the entry points, and what a search found, read back from its storage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, PrivateAttr

from gatedsl.search.bookkeeping import Tally, tally
from gatedsl.search.plan import (BUILTIN_OBJECTIVES, SAMPLERS, SearchError, SearchPlan, load_objective,
                                 prepare_search, storage_url)
from gatedsl.search.plan import MEMORY  # noqa: F401  (re-exported: the CLI names the in-memory storage by it)
from gatedsl.search.space import Space
from gatedsl.search.storage import open_storage, open_study, quiet_optuna, shown
from gatedsl.search.workers import spawn, stopped, work


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
    with quiet_optuna():
        storage_obj = open_storage(plan.storage)
        study_obj = open_study(plan, storage_obj)  # created once, before any worker loads it
        try:
            if plan.workers == 1:
                work(plan, study_obj, storage_obj, progress=progress)
            else:
                spawn(plan, study_obj, progress)
        except KeyboardInterrupt:
            counts = tally(study_obj)
            raise SearchInterrupted(plan.study, shown(plan.storage), plan.trials, counts.decided,
                                    counts.complete) from None
        space = plan.space()
        result = _result_of(study_obj, plan.storage, plan.objectives)
        result.stopped = stopped(plan, tally(study_obj), space)
    result._space = space
    return result


def load_result(study: str, storage: str | None = None) -> SearchResult:
    """The result of an existing search, read from its storage (default: `gatedsl-search.db` here)."""
    url = storage_url(storage)
    if url is None:
        raise SearchError("an in-memory study ends with its process; give the storage it was saved in")
    with quiet_optuna():
        storage_obj = open_storage(url)
        try:
            study_obj = optuna.load_study(study_name=study, storage=storage_obj)
        except KeyError:
            names = optuna.get_all_study_names(storage_obj)
            raise SearchError(f"no study named {study!r} in {shown(url)}; studies there: "
                              f"{', '.join(names) or 'none'}") from None
        meta = study_obj.user_attrs.get("gatedsl", {})
        objectives = meta.get("objectives") or [f"objective{i}" for i in range(len(study_obj.directions))]
        return _result_of(study_obj, url, objectives)


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
    return SearchResult(study=study.study_name, storage=shown(url), objectives=list(objectives),
                        trials=counts.decided, complete=counts.complete, pruned=counts.pruned,
                        screened_out=counts.screened_out, failed=counts.failed, reused=counts.reused, errors=errors,
                        best=best, leaderboard=board)


__all__ = ["search", "prepare_search", "run_search", "load_result", "SearchPlan", "SearchResult", "Candidate", "Tally",
           "SearchError", "SearchInterrupted", "storage_url", "load_objective", "SAMPLERS", "BUILTIN_OBJECTIVES"]
