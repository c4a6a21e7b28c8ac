"""Search over the architectures a spec's parameters describe: the space and its candidates, built-in tasks to score them,
and `search`, the engine that runs a search on Optuna."""

from gatedsl.search.space import Dimension, Screened, Space
from gatedsl.search.tasks import TASKS, Task, TaskResult, get_task

__all__ = ["Space", "Dimension", "Screened", "TASKS", "Task", "TaskResult", "get_task", "search", "load_result"]


def __getattr__(name: str):
    # Imported on first use: the engine needs optuna, which screening and `gatedsl check` never import.
    if name in ("search", "load_result"):
        from gatedsl.search import engine

        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
