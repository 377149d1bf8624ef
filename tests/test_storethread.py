"""The store's own thread: results and errors come back, calls run in order, a cancel waits."""

from __future__ import annotations

import threading

import pytest
import trio

from sidecar.storethread import StoreThread


async def test_results_errors_and_order() -> None:
    st = StoreThread()
    try:
        seen: list[int] = []
        names: set[str] = set()

        def job(i: int) -> int:
            seen.append(i)
            names.add(threading.current_thread().name)
            return i * 2

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(st.run, lambda i=i: job(i))
        assert sorted(seen) == list(range(50)) and names == {"sidecar-store"}
        assert await st.run(lambda: job(7)) == 14

        def boom() -> None:
            raise ValueError("from the thread")

        with pytest.raises(ValueError, match="from the thread"):
            await st.run(boom)
        assert seen[-1] == 7  # still serving after an error
    finally:
        await st.stop()


async def test_a_cancelled_caller_waits_for_its_call() -> None:
    st = StoreThread()
    started, release = threading.Event(), threading.Event()
    done: list[str] = []

    def slow() -> str:
        started.set()
        release.wait(10)
        done.append("slow")
        return "ok"

    try:
        with trio.CancelScope() as scope:

            async def go() -> None:
                await st.run(slow)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(go)
                await trio.to_thread.run_sync(started.wait, 10)  # the call is in the thread
                scope.cancel()
                release.set()
        # The cancel could not abandon the call half-way: it finished first.
        assert done == ["slow"]
    finally:
        await st.stop()


async def test_a_call_after_stop_is_refused_not_left_waiting_forever() -> None:
    """A call queued to a stopped thread would never run, and its caller cannot be
    cancelled (the call may be under way): it is refused at once instead."""
    st = StoreThread()
    assert await st.run(lambda: 1) == 1
    await st.stop()
    with trio.fail_after(5), pytest.raises(RuntimeError, match="stopped"):
        await st.run(lambda: 2)
