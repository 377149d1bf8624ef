"""Locks whose uncontended acquire does not yield to the scheduler.

`async with trio.Lock()` always yields once after taking the lock (trio's
rule that every async operation is a checkpoint). On the task path that yield
is a scheduler round before the guarded work starts: the store's lock is taken
before each SQLite call is handed to the store thread, so with a plain lock the
task row waited for every other runnable task before the thread even heard of
it. These wrappers take a free lock at once and wait (fairly, as trio does)
only when it is held. Entering one is therefore not a checkpoint when the lock
is free: the guarded code yields soon enough (it always awaits something).
"""

from __future__ import annotations

from types import TracebackType

import trio


class QuickLock:
    """A `trio.Lock` for `async with` that does not yield when it is free."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    def locked(self) -> bool:
        return self._lock.locked()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()  # WouldBlock while held or while others wait
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._lock.release()


class QuickSemaphore:
    """A `trio.Semaphore` for `async with` that does not yield when a unit is free."""

    __slots__ = ("_sem",)

    def __init__(self, value: int) -> None:
        self._sem = trio.Semaphore(value)

    @property
    def value(self) -> int:
        return self._sem.value

    async def __aenter__(self) -> None:
        try:
            self._sem.acquire_nowait()  # WouldBlock when none is free
        except trio.WouldBlock:
            await self._sem.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._sem.release()
