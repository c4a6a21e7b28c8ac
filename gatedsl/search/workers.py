"""The workers: each starts trials while the budget and the space last, deciding and creating one under the
storage's lock; with several, each is a process that ends with the search's."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing import get_context
from multiprocessing.connection import wait
from typing import Callable

import optuna
from optuna.storages import RDBStorage

from gatedsl.search.bookkeeping import Tally, alive, fail_dead_trials, started, tally
from gatedsl.search.plan import SearchError, SearchPlan, grid_candidates
from gatedsl.search.space import Space
from gatedsl.search.storage import StorageLock, open_storage, open_study, quiet_optuna, sampler
from gatedsl.search.trial import POLL_S, CandidateFailed, Objective

# A sampler that proposes only candidates it has seen, this many times in a row, has nothing new to offer: the
# search stops there rather than record duplicates forever (they cost no training, only the sampler's time).
DUPLICATE_STREAK = 100
PARENT_POLL_S = 0.5  # seconds between a worker's looks at whether the search's process is still alive
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a Linux process gets when its parent ends
STOP_WAIT_S = 30  # seconds a worker has to hand its trial back after a Ctrl-C before it is killed


def stopped(plan: SearchPlan, counts: Tally, space: Space) -> str | None:
    """Why a search ended short of `plan.trials` distinct candidates, or None if it reached them."""
    if counts.decided >= plan.trials:
        return None
    limit = _limit(plan, space, grid_candidates(space) if plan.sampler == "grid" else [])
    short = f"stopped after {counts.decided} of the {plan.trials} trials asked for"
    if len(counts.covered) >= limit:
        where = "grid" if plan.sampler == "grid" else "space"
        return f"{short}: the {where} has {limit:,} candidates and every one has been evaluated"
    if counts.streak >= DUPLICATE_STREAK:
        return (f"{short}: its last {counts.streak} trials proposed only candidates evaluated before, so few or "
                f"none are left to find")
    return None


def _limit(plan: SearchPlan, space: Space, grid: list[dict]) -> float:
    """How many distinct candidates the sampler can propose."""
    return len(grid) if plan.sampler == "grid" else space.size


def work(plan: SearchPlan, study: optuna.Study, storage: RDBStorage | None, *,
         progress: Callable[[Tally, int], None] | None = None) -> None:
    """One worker: start trials while the budget and the space last, then wait for the others' trials to end."""
    space = plan.space()
    grid = grid_candidates(space) if plan.sampler == "grid" else []
    limit = _limit(plan, space, grid)
    lock = StorageLock(plan.storage, plan.study)
    objective = Objective(plan, space, grid, study, storage, lock)
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
                    study.sampler = sampler(plan, len(grid), now.total, explore=now.streak > 0)
                    try:
                        study.optimize(objective, n_trials=1, catch=(CandidateFailed,))
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


def spawn(plan: SearchPlan, study: optuna.Study, progress) -> None:
    """Run `plan.workers` worker processes on the study until they are done; Ctrl-C interrupts them too."""
    # Workers fork from a fresh server process that has imported the engine once: unlike a plain fork they
    # inherit no threads or connections of this process (torch's thread pool, the storage's pool), and unlike
    # spawn they do not each import Optuna, SQLAlchemy and gatedsl again.
    context = get_context("forkserver")
    context.set_forkserver_preload(["gatedsl.search.engine", "alembic.migration", "optuna.storages._rdb.alembic"])
    failures = context.SimpleQueue()
    me = (os.getpid(), started(os.getpid()))
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
    with quiet_optuna():
        try:
            storage = open_storage(plan.storage)
            work(plan, open_study(plan, storage), storage)
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
        while alive(pid, started):
            time.sleep(PARENT_POLL_S)
        # Its trial stays RUNNING: the next search on this machine sees its process gone, fails it and retries it.
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="gatedsl-search-parent-watch", daemon=True).start()
