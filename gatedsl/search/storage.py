"""Where a search's trials are kept: the storage, the lock its processes share, the study and each trial's sampler."""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from gatedsl.search.plan import MEMORY, SearchError, SearchPlan

# A killed worker's trial is noticed at once on its own machine (its process is gone) and, on any
# other, once its heartbeat is this old; it is then failed and queued again, at most MAX_RETRY times
# (a candidate that kills every process that trains it must not be retried forever).
HEARTBEAT_S, GRACE_S, MAX_RETRY = 10, 60, 3


@contextlib.contextmanager
def quiet_optuna():
    """Optuna logs every trial and warns about experimental features; the search reports for itself."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(previous)


def shown(url: str | None) -> str:
    if url is None:
        return MEMORY
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(url: str | None) -> RDBStorage | None:
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
        with StorageLock(url, "gatedsl:tables"):  # two processes creating the tables at once collide in PostgreSQL
            storage = RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                 grace_period=GRACE_S, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                     max_retry=MAX_RETRY))
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as err:
        raise SearchError(f"cannot open the storage {shown(url)}: {str(err).splitlines()[0]}") from None
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


def sampler(plan: SearchPlan, grid_size: int, slot: int, explore: bool) -> optuna.samplers.BaseSampler:
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


def open_study(plan: SearchPlan, storage: RDBStorage | None) -> optuna.Study:
    """Create the study, or load it (a resumed search, another worker); the sampler is set per trial."""
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=5) if len(plan.objectives) == 1
              else optuna.pruners.NopPruner())  # Optuna prunes single-objective trials only
    import sqlalchemy.exc

    try:
        study = optuna.create_study(study_name=plan.study, storage=storage, pruner=pruner, load_if_exists=True,
                                    directions=["minimize"] * len(plan.objectives),
                                    sampler=optuna.samplers.RandomSampler())
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise SearchError(f"cannot open the study in {shown(plan.storage)}: {str(err).splitlines()[0]}") from None
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


class StorageLock:
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
                raise SearchError(f"cannot open the storage {shown(url)}: {str(err).strip()}") from None
        self.held = False

    def __enter__(self) -> "StorageLock":
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
