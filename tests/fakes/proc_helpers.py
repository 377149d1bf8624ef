"""Helpers for the process-helper, shell and wake tests."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any, cast

import trio

from sidecar import procs
from sidecar.config import Config
from sidecar.executors import ExecContext
from sidecar.messages import ProgressEvent, Task
from sidecar.progress import ProgressSender
from sidecar.taskrun import TaskRun


class RecordingProgress(ProgressSender):
    """A ProgressSender that keeps every event with the Trio time it was emitted."""

    def __init__(self, task_id: str = "t1") -> None:
        send, _recv = trio.open_memory_channel[ProgressEvent](0)
        super().__init__(send, task_id)
        self.events: list[tuple[float, str, str]] = []
        self._waiters: list[tuple[str, trio.Event]] = []

    async def emit(
        self,
        event_type: str,
        text: str,
        *,
        tokens_so_far: int | None = None,
        model: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.events.append((trio.current_time(), event_type, text))
        for prefix, event in self._waiters:
            if text.startswith(prefix):
                event.set()
        await trio.lowlevel.checkpoint()

    async def wait_for(self, prefix: str) -> None:
        """Wait until an event whose text starts with `prefix` is emitted."""
        if any(text.startswith(prefix) for _, _, text in self.events):
            return
        event = trio.Event()
        self._waiters.append((prefix, event))
        await event.wait()

    def texts(self, event_type: str) -> list[str]:
        return [text for _, kind, text in self.events if kind == event_type]

    def joined(self, event_type: str) -> str:
        return "".join(self.texts(event_type))


def make_ctx(config: Config) -> ExecContext:
    """An ExecContext without an HTTP client (these executors never use it)."""
    state = Path(config.resolved_state_dir())
    state.mkdir(parents=True, exist_ok=True)
    return ExecContext(config=config, http=cast(Any, None), state_dir=state)


def alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    state = raw[raw.rfind(b")") + 2 :].split()[0]
    return state not in (b"Z", b"X")


async def wait_dead(pid: int, limit_s: float = 5.0) -> bool:
    """Poll until `pid` is gone (SIGKILL is delivered asynchronously).

    Bounded in real time, so that it also works under a MockClock.
    """
    end = time.monotonic() + limit_s
    while True:
        if not alive(pid):
            return True
        if time.monotonic() > end:
            return False
        await trio.sleep(0.005)


def catches_sigterm(pid: int) -> bool | None:
    """Whether `pid` has a handler for SIGTERM (`SigCgt` in /proc/<pid>/status); None when it is gone.

    Until `sidecar/entry.py` runs, a SIGTERM ends `python -m sidecar` by the signal.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
    except OSError:
        return None
    caught = next((line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), "0")
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


async def wait_catching_sigterm(pid: int, limit_s: float = 10.0) -> None:
    """Until `pid` catches SIGTERM, or it is gone, or `limit_s` (real time) has passed."""
    end = time.monotonic() + limit_s
    while True:
        if catches_sigterm(pid) is not False or time.monotonic() >= end:
            return
        await trio.sleep(0.005)


async def wait_marked(marker: str, pids: list[int], *, at_least: int = 0, limit_s: float = 5.0) -> list[int]:
    """`procs.find_marked(marker)` once it holds every pid in `pids` and at least `at_least` pids.

    A process in the middle of an exec (`setsid sleep` is two) has an unreadable
    environment for a moment, so one scan right after a script said "started"
    can miss it. Polled, bounded in real time (it also works under a MockClock);
    what the last scan found is returned either way, for the caller to assert on.
    """
    end = time.monotonic() + limit_s
    while True:
        marked = procs.find_marked(marker)
        if (set(pids) <= set(marked) and len(marked) >= at_least) or time.monotonic() > end:
            return marked
        await trio.sleep(0.005)


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, 9)
    except OSError:
        pass


def task_run(ctx: ExecContext, task: Task, progress: ProgressSender, marker: str | None = None) -> TaskRun:
    """The TaskRun the supervisor would hand an executor for `task` (default working directory)."""
    return ctx.new_run(task, progress, marker or procs.task_marker(ctx.config.agent_id, task.task_id))
