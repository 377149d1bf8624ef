"""The one thread that runs the store's SQLite calls (and task logs' opens), fed through a queue.

SQLite blocks, so the store's calls leave the event loop. `trio.to_thread`
hands each call to a cached worker through a capacity limiter and a lock
hand-off; the store makes several calls a task, in order, on one connection,
so one long-lived thread reading a queue does the same work with less on
the way. The waiting trio task is rescheduled with the call's outcome
through the run's token. A call cannot be abandoned half-way (the store
shields its callers): cancellation waits for the call to finish.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], None]]


class StoreThread:
    def __init__(self, name: str = "sidecar-store") -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._stopped = False
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, deliver = job
            result = outcome.capture(fn)
            try:
                self._token.run_sync_soon(deliver, result)
            except trio.RunFinishedError:  # the trio run ended while we worked: no one waits
                pass

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the store thread and return (or raise) what it did."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._stopped:
            # Queued now, the call would never run, and its caller cannot be cancelled.
            raise RuntimeError("the store thread has stopped")
        task = trio.lowlevel.current_task()

        def deliver(result: outcome.Outcome[Any]) -> None:
            trio.lowlevel.reschedule(task, result)

        self._jobs.put((fn, deliver))

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            return trio.lowlevel.Abort.FAILED  # the call is under way: wait for it

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    async def stop(self) -> None:
        """Let queued calls finish, then end the thread."""
        self._stopped = True
        self._jobs.put(None)
        await trio.to_thread.run_sync(self._thread.join)
