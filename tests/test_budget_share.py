"""Batcher and budget together, as properties on a virtual clock.

A small simulated daemon: tasks are accepted, print, finish, and their result
waits for their progress (`wait_task_flushed`) as the outbox does, then takes
a lifecycle token as the link does. Everything sent (progress and lifecycle
frames) is then replayed through the dev hub's copy of the real hub's rate
limiter, the referee: nothing may be refused, and progress may never take the
hub's bucket into the reserve.
"""

from __future__ import annotations

import random
from typing import Any

import trio
import trio.testing
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sidecar.batcher import Batcher
from sidecar.budget import FRAME_COST, RateBudget
from sidecar.devhub.ratelimit import Deny, RateLimiter, RateLimits, TierLimit
from sidecar.messages import ProgressEvent

from .test_batcher import ev

WINDOW = 0.1


class SharedSink:
    """The link, as far as the batcher sees it: records progress next to lifecycle frames."""

    def __init__(self, sent: list[tuple[str, str, float]]) -> None:
        self.sent = sent

    def can_send(self) -> bool:
        return True

    async def send_progress(self, frame: dict[str, Any]) -> bool:
        await trio.lowlevel.checkpoint()
        self.sent.append(("progress", frame["task_id"], trio.current_time()))
        return True


_task = st.tuples(
    st.sampled_from([0.0, 0.0, 0.05, 0.5, 3.0]),  # start delay
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.0, 0.01, 0.04, 0.4, 1.0]),  # pause after the event
            st.sampled_from(["stdout", "stdout", "stderr"]),
        ),
        max_size=60,
    ),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Found by the search: a finishing task's second frame waited for the next window
# (the window's pace, then the budget), so its result waited two windows.
@example(
    tasks=[
        (0.0, []),
        (0.0, [(0.0, "stdout")]),
        (0.0, [(0.0, "stderr"), (0.4, "stdout")]),
        (0.0, [(0.4, "stdout"), (0.0, "stdout")]),
    ],
    shape=(24, 2.0, 12),
    spent=0,
    seed=0,
)
@example(
    tasks=[
        (0.0, []),
        (0.0, []),
        (0.0, [(0.01, "stderr"), (0.4, "stdout")]),
        (0.0, [(0.0, "stdout"), (0.0, "stderr"), (0.4, "stdout")]),
    ],
    shape=(24, 2.0, 12),
    spent=0,
    seed=0,
)
@given(
    tasks=st.lists(_task, min_size=1, max_size=6),
    shape=st.sampled_from([(60, 1.0, 12), (60, 1.0, 10), (20, 0.5, 10), (24, 2.0, 12)]),
    spent=st.sampled_from([0, 0, 20, 45]),
    seed=st.integers(0, 2**16),
)
def test_property_budget_held_results_first_final_progress_before_result(
    tasks: list[tuple[float, list[tuple[float, str]]]],
    shape: tuple[int, float, int],
    spent: int,
    seed: int,
) -> None:
    capacity, refill, reserve = shape
    rng = random.Random(seed)
    sent: list[tuple[str, str, float]] = []
    waits: list[tuple[str, float, bool, bool]] = []  # task, waited, flushed, reserve allowed it
    held = 0

    async def main() -> None:
        nonlocal held
        budget = RateBudget(capacity=capacity, refill_per_s=refill, reserve=reserve)
        b = Batcher(budget, window_s=WINDOW, held_tasks=lambda: held, max_text_bytes=64)
        send, recv = trio.open_memory_channel[ProgressEvent](rng.choice([1, 16, 1000]))
        link = trio.Lock()  # one frame on the wire at a time
        outbox = trio.Lock()  # one result in flight at a time

        async def lifecycle(tid: str, kind: str) -> None:
            async with link:
                # As `HubLink.wait_ready` does: sleep until the budget's time for a token.
                at = budget.lifecycle_at(trio.current_time())
                await trio.sleep_until(at)
                budget.spend_lifecycle(trio.current_time())
                sent.append((kind, tid, trio.current_time()))

        async def life(tid: str, start: float, events: list[tuple[float, str]]) -> None:
            nonlocal held
            await trio.sleep(start)
            held += 1
            await lifecycle(tid, "accept")
            b.task_started(tid)
            for i, (pause, kind) in enumerate(events):
                await send.send(ev(tid, f"{tid}:{i};", kind))
                if pause:
                    await trio.sleep(pause)
            await trio.sleep(0.001)  # the result is stored: the last lines are in the batcher
            b.task_finished(tid)
            async with outbox:
                now = trio.current_time()
                st_ = b._tasks.get(tid)
                frames = len(st_.segments) if st_ is not None else 0
                # Tokens enough for all of its frames above the reserve, even if every
                # other task's accept took one in the window the result waits.
                need = budget.reserve_for(held) + (frames + len(tasks)) * FRAME_COST + 1e-6
                allowed = not budget.paused(now) and budget.tokens(now) >= need
                flushed = await b.wait_task_flushed(tid, 1.0)
                waits.append((tid, trio.current_time() - now, flushed, allowed))
                await lifecycle(tid, "result")
            held -= 1

        async with trio.open_nursery() as nursery:
            await nursery.start(b.run, recv, SharedSink(sent))
            for _ in range(spent):  # other frames took part of the bucket before
                budget.spend_lifecycle(0.0)
            async with trio.open_nursery() as tasks_nursery:
                for n, (start, events) in enumerate(tasks):
                    tasks_nursery.start_soon(life, f"t{n}", start, events)
            await send.aclose()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    # 1. Every frame, progress and lifecycle, fits the hub's bucket; progress
    #    never dips into the reserve.
    hub = RateLimiter(RateLimits(normal=TierLimit(capacity, refill * 60)))
    for _ in range(spent):
        hub.check("a", "normal", 0.0)
    for kind, tid, t in sent:
        verdict = hub.check("a", "normal", t)
        assert not isinstance(verdict, Deny), (kind, tid, t)
        if kind == "progress":
            assert verdict.remaining >= reserve, (tid, t, verdict)
    # 2. A result never waits for progress beyond one window.
    assert all(waited <= WINDOW + 1e-9 for _, waited, _, _ in waits), waits
    # 3. Its final progress goes first whenever the budget had the tokens for it.
    result_at = {tid: t for kind, tid, t in sent if kind == "result"}
    for tid, _, flushed, allowed in waits:
        late = [t for kind, x, t in sent if kind == "progress" and x == tid and t > result_at[tid]]
        if allowed:
            assert flushed, (tid, waits)
        if flushed:
            assert late == [], (tid, late)
