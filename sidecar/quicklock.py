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


class _Quick:
    """`async with` over a trio lock or semaphore: at once when free, trio's wait when not."""

    __slots__ = ("_inner",)

    def __init__(self, inner: trio.Lock | trio.Semaphore) -> None:
        self._inner = inner

    async def __aenter__(self) -> None:
        try:
            self._inner.acquire_nowait()  # WouldBlock while held (or nothing is free), or others wait
        except trio.WouldBlock:
            await self._inner.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._inner.release()


class QuickLock(_Quick):
    """A `trio.Lock` for `async with` that does not yield when it is free."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(trio.Lock())

    def locked(self) -> bool:
        assert isinstance(self._inner, trio.Lock)
        return self._inner.locked()


class QuickSemaphore(_Quick):
    """A `trio.Semaphore` for `async with` that does not yield when a unit is free."""

    __slots__ = ()

    def __init__(self, value: int) -> None:
        super().__init__(trio.Semaphore(value))

    @property
    def value(self) -> int:
        assert isinstance(self._inner, trio.Semaphore)
        return self._inner.value
