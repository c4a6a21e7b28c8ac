"""Search over the architectures a spec's parameters describe: the space and its candidates, built-in tasks to score them,
and `search`, the engine that runs a search on Optuna."""

from gatedsl.search.space import Dimension, Screened, Space
from gatedsl.search.tasks import TASKS, Task, TaskResult, get_task

__all__ = ["Space", "Dimension", "Screened", "TASKS", "Task", "TaskResult", "get_task", "search"]


def __getattr__(name: str):
    # Imported on first use: the engine needs optuna, which screening and `gatedsl check` never import.
    if name == "search":
        from gatedsl.search.engine import search

        return search
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
