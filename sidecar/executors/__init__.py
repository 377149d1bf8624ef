"""Executors: one module each. An executor is an async callable
`(run: TaskRun) -> Outcome`, built once with an `ExecContext`.

Executors do not retry, price, or time themselves: the dispatcher retries and
prices, and the supervisor's cancel scope bounds the time. On cancellation an
executor cleans up (shielded, bounded) and lets `trio.Cancelled` propagate.
Every kind is one entry of the registry (`registry.SPECS`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ..config import Config
from ..messages import Outcome, Task
from ..output import OffLoop, in_worker_thread
from ..progress import ProgressSender
from ..sharedhttp import SharedHTTP
from ..taskrun import TaskRun, safe_file_name

if TYPE_CHECKING:
    import httpx

Executor = Callable[[TaskRun], Awaitable[Outcome]]


def work_dir(state_dir: Path) -> Path:
    """Where tasks work when no `repo_dir` is set (see `ExecContext.workdir`)."""
    return state_dir / "work"


def make_state_subdirs(state_dir: Path) -> None:
    """The state dir's `logs/` and `work/`, made if missing."""
    for sub in (state_dir / "logs", work_dir(state_dir)):
        sub.mkdir(parents=True, exist_ok=True)


@attrs.frozen
class ExecContext:
    """What every executor may use: config, the shared HTTP client, the state dir.

    `http`: a client, or the daemon's `SharedHTTP` that makes one on first use
    (`http_client()`), so that httpx is loaded only by a kind that needs it.
    `notify`: send an informational frame to the hub (`wake_result`), only if
    the hub accepts its type; it never waits for the link to come back.
    `off_loop`: where a short blocking call of an executor runs (a task log's
    open): the daemon's store thread (`Store.run_blocking`), else a worker thread.
    `handoff`: start work the task does not wait for (its log's open, which may
    outlast a short task) in a nursery that outlives it; False if there is none
    now (`sidecar exec`, or the daemon stopping): then the caller awaits it.
    """

    config: Config
    http: httpx.AsyncClient | SharedHTTP
    state_dir: Path
    notify: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    off_loop: OffLoop = in_worker_thread
    handoff: Callable[[Callable[[], Awaitable[None]]], bool] | None = None

    def http_client(self) -> httpx.AsyncClient:
        """The HTTP client; made now if `http` is a `SharedHTTP` not used yet (imports httpx)."""
        return self.http.client() if isinstance(self.http, SharedHTTP) else self.http

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def log_path(self, task_id: str) -> Path:
        """Per-task output log (full output; the result's output is capped)."""
        return self.log_dir / f"{safe_file_name(task_id)}.log"

    def workdir(self) -> Path:
        """The default working directory: `repo_dir`, else the state dir's `work/`.

        Not the state dir itself: a task that cleans its directory (`rm -rf ./*`,
        ordinary in a build script) would delete the database, its journal and
        every log there.
        """
        return Path(self.config.repo_dir) if self.config.repo_dir else work_dir(self.state_dir)

    def new_run(
        self, task: Task, progress: ProgressSender, marker: str, *, deadline: float = math.inf
    ) -> TaskRun:
        """The `TaskRun` for one run of `task` in the default working directory.

        Without a `repo_dir` that is `work/` in the state dir, made again if a
        task removed it (`rm -rf "$PWD"`): one `mkdir` (2 us) a run.
        """
        if not self.config.repo_dir:
            with contextlib.suppress(OSError):  # there already; else the executor says what is wrong
                os.mkdir(work_dir(self.state_dir))
        return TaskRun(
            task=task,
            progress=progress,
            marker=marker,
            log_path=self.log_path(task.task_id),
            workdir=self.workdir(),
            deadline=deadline,
        )
