"""One run of one task: what its executor is handed, and the one way to run it.

A `TaskRun` carries everything per task that an executor (and, after it,
verification and delivery) needs: the task, its progress sender, the process
marker every child must carry, the task's log file, its working directory and
its deadline. It replaces a context variable with a silent fallback: a child
started without the supervisor's marker would escape the sweeps that find
leftovers after a crash.

`run_and_sweep` is the single home of "run one task, then kill what it left",
used by the daemon's supervisor and by `sidecar exec` alike.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import attrs
import trio

from . import procs
from .messages import Task
from .progress import ProgressSender

T = TypeVar("T")


def safe_file_name(task_id: str) -> str:
    """A file name derived from any task id (at most 150 characters)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id)[:150]


@attrs.define
class Spend:
    """What a run spent that no result will report: a Claude session cut short by a
    cancel or the task's limit still cost money (its final `result` line says how
    much). The metrics count it; nothing on the wire carries it."""

    model: str | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float = 0.0


@attrs.frozen
class TaskRun:
    """The per-task context handed to an executor.

    `deadline` is the Trio time at which the task's limit expires (math.inf when
    unbounded); the task's cancel scope enforces it, and tools that set their
    own limits (a verification check, an agentic `run_command`) stay within it
    through `time_left`.
    """

    task: Task
    progress: ProgressSender
    marker: str
    log_path: Path
    workdir: Path
    deadline: float = math.inf
    # Shared by every copy of the run (`attrs.evolve` keeps the same object).
    spent: Spend = attrs.Factory(Spend)

    @property
    def task_id(self) -> str:
        return self.task.task_id

    def time_left(self) -> float:
        return max(0.0, self.deadline - trio.current_time())

    def with_workdir(self, workdir: Path) -> TaskRun:
        return attrs.evolve(self, workdir=workdir)


async def run_and_sweep(fn: Callable[[TaskRun], Awaitable[T]], run: TaskRun) -> T:
    """Run `fn(run)`; whatever happens, kill every process still carrying the marker
    and wait (shielded, bounded) until they are gone, so the task's end means it.

    The caller's late sweep (a process caught mid-exec) stays its own.
    """
    try:
        return await fn(run)
    finally:
        await procs.sweep_marked(run.marker)
