"""Search over the architectures a spec's parameters describe: the space and its candidates, built-in tasks to score them."""

from gatedsl.search.space import Dimension, Screened, Space
from gatedsl.search.tasks import TASKS, Task, TaskResult, get_task

__all__ = ["Space", "Dimension", "Screened", "TASKS", "Task", "TaskResult", "get_task"]
