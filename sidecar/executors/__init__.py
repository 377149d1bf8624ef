"""Executors: one module each. An executor is an async callable
`(task, progress) -> Outcome`, built once with an `ExecContext`.

Executors do not retry, price, or time themselves: the dispatcher retries and
prices, and the supervisor's cancel scope bounds the time. On cancellation an
executor cleans up (shielded, bounded) and lets `trio.Cancelled` propagate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import attrs
import httpx

from ..config import Config
from ..messages import Outcome, Task
from ..progress import ProgressSender

Executor = Callable[[Task, ProgressSender], Awaitable[Outcome]]


@attrs.frozen
class ExecContext:
    """What every executor may use: config, the shared HTTP client, the state dir."""

    config: Config
    http: httpx.AsyncClient
    state_dir: Path

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def log_path(self, task_id: str) -> Path:
        """Per-task output log (full output; the result's output is capped)."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id)[:150]
        return self.log_dir / f"{safe}.log"

    def workdir(self) -> Path:
        return Path(self.config.repo_dir) if self.config.repo_dir else self.state_dir
