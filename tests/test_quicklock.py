"""QuickLock and QuickSemaphore: no scheduler round when free, trio's fairness and exclusion when not."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sidecar.quicklock import QuickLock, QuickSemaphore


async def test_a_free_lock_is_taken_without_a_checkpoint() -> None:
    lock = QuickLock()
    with trio.testing.assert_no_checkpoints():
        async with lock:
            assert lock.locked()
    assert not lock.locked()


async def test_a_free_semaphore_unit_is_taken_without_a_checkpoint() -> None:
    sem = QuickSemaphore(1)
    with trio.testing.assert_no_checkpoints():
        async with sem:
            assert sem.value == 0
    assert sem.value == 1


async def test_a_plain_trio_lock_does_checkpoint_which_is_what_quicklock_saves() -> None:
    """The premise: `async with trio.Lock()` yields to the scheduler even when free."""
    with trio.testing.assert_checkpoints():
        async with trio.Lock():
            pass


async def test_a_held_lock_is_waited_for_with_a_checkpoint() -> None:
    lock = QuickLock()
    entered = trio.Event()

    async def second() -> None:
        with trio.testing.assert_checkpoints():
            async with lock:
                entered.set()

    async with trio.open_nursery() as nursery:
        async with lock:
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert not entered.is_set()  # it waits while the lock is held
    assert entered.is_set()


async def test_a_held_lock_makes_the_others_wait_in_order() -> None:
    lock = QuickLock()
    order: list[int] = []
    inside = 0

    async def worker(i: int) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1
            for _ in range(3):
                await trio.lowlevel.checkpoint()  # others run meanwhile
            order.append(i)
            inside -= 1

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(worker, i)
            await trio.testing.wait_all_tasks_blocked()  # each one queued behind the last
    assert order == [0, 1, 2, 3, 4]
    assert not lock.locked()


async def test_the_semaphore_admits_at_most_its_value() -> None:
    sem = QuickSemaphore(2)
    inside = peak = 0

    async def worker() -> None:
        nonlocal inside, peak
        async with sem:
            inside += 1
            peak = max(peak, inside)
            for _ in range(3):
                await trio.lowlevel.checkpoint()  # others run meanwhile
            inside -= 1

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(worker)
    assert peak == 2
    assert sem.value == 2


async def test_a_task_cancelled_while_waiting_leaves_the_lock_to_the_next() -> None:
    lock = QuickLock()
    got: list[str] = []

    async def wants(name: str, scope_out: list[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            scope_out.append(scope)
            async with lock:
                got.append(name)

    async with trio.open_nursery() as nursery:
        async with lock:
            scopes: list[trio.CancelScope] = []
            nursery.start_soon(wants, "a", scopes)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(wants, "b", scopes)
            await trio.testing.wait_all_tasks_blocked()
            scopes[0].cancel()  # "a" gives up while queued
            await trio.testing.wait_all_tasks_blocked()
    assert got == ["b"]
    assert not lock.locked()


async def test_leaving_on_an_exception_releases_the_lock() -> None:
    lock = QuickLock()
    with pytest.raises(RuntimeError):
        async with lock:
            raise RuntimeError("boom")
    assert not lock.locked()
