"""The study's trials as its workers share them: counted against the budget, each tagged with the process that runs
it, and those of this machine's dead processes failed and queued again."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from gatedsl.search.storage import MAX_RETRY


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


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{started(os.getpid())}"


def started(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not mistaken for it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rpartition(")")[2].split()[19]


def alive(pid: int, started: str) -> bool:
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
        if w_host != host or not pid_text.isdigit() or int(pid_text) == me or alive(int(pid_text), started):
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
