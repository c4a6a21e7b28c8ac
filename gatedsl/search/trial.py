"""One trial: suggest a candidate, reuse a duplicate's result, screen it, then evaluate it from its own seed."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import time
from typing import Any, Callable

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from gatedsl.search.bookkeeping import fail_dead_trials, worker_id
from gatedsl.search.plan import SearchError, SearchPlan, load_objective, load_task
from gatedsl.search.space import Space
from gatedsl.search.storage import MAX_RETRY, StorageLock

POLL_S = 0.1  # seconds between looks at the study while waiting on other workers


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


class CandidateFailed(Exception):
    """The candidate's evaluation raised (the trial fails, the search goes on)."""


class Objective:
    """The Optuna objective: suggest a DNA, reuse a duplicate's result, screen it, then evaluate it."""

    def __init__(self, plan: SearchPlan, space: Space, grid: list[dict], study: optuna.Study,
                 storage: RDBStorage | None, lock: StorageLock):
        self.plan, self.space, self.grid, self.study, self.storage, self.lock = plan, space, grid, study, storage, lock
        self.single = len(plan.objectives) == 1
        self.task = load_task(plan.task, plan.task_options) if plan.task is not None else None
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
        trial.set_user_attr("worker", worker_id())
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
            raise CandidateFailed(f"{type(err).__name__}: {err}") from err
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
            trials = self.study.get_trials(deepcopy=False)
            same = [t for t in trials if t.number != trial.number and t.user_attrs.get("hash") == key]
            for t in same:
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                    return t
            # The lowest-numbered of several concurrent trials of one candidate evaluates it; the others wait.
            # An earlier trial that has not yet named its candidate may be this one's twin: wait for its hash,
            # or two workers could each see the other as the later trial and both evaluate the candidate.
            unnamed = any(t.state == TrialState.RUNNING and t.number < trial.number and "hash" not in t.user_attrs
                          for t in trials)
            if not unnamed and not any(t.state == TrialState.RUNNING and t.number < trial.number for t in same):
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
