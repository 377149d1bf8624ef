"""An executor built on its first task, in a worker thread.

For a kind whose module is costly to load: Ollama's needs httpx (~5 MiB of RSS;
~0.3 s with the HTTP client and its CA bundle). A daemon that never runs such a
task never pays; one that does pays once, off the event loop. The build is the
import plus the executor's constructor, which must not touch Trio.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..messages import Outcome
from ..taskrun import TaskRun
from . import ExecContext, Executor


class Deferred:
    """`build(ctx)` on the first call (one build, however many tasks start at once), then that executor."""

    def __init__(self, ctx: ExecContext, build: Callable[[ExecContext], Executor]) -> None:
        self._ctx = ctx
        self._build = build
        self._lock = trio.Lock()
        self.built: Executor | None = None

    async def __call__(self, run: TaskRun) -> Outcome:
        executor = self.built
        if executor is None:
            async with self._lock:
                if self.built is None:
                    self.built = await trio.to_thread.run_sync(self._build, self._ctx)
                executor = self.built
        return await executor(run)
