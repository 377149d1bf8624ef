"""Progress and lifecycle frames share the hub's normal bucket: progress gives way."""

from __future__ import annotations

import trio

from sidecar.batcher import Batcher

from .test_batcher import RecordingSink, ev, max_in_span, running


async def test_lifecycle_frames_are_taken_from_the_progress_budget(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(budget_per_min=40)
    sink = RecordingSink()
    lifecycle: list[float] = []
    async with running(b, sink) as send:

        async def produce() -> None:
            for i in range(2400):  # 2 virtual minutes of 20 events a second
                await send.send(ev("A", f"line {i}\n"))
                await trio.sleep(0.05)

        async def results() -> None:
            for _ in range(60):  # a result or accept every 2 s: 30 a minute
                b.note_lifecycle_frame()
                lifecycle.append(trio.current_time())
                await trio.sleep(2)

        async with trio.open_nursery() as n:
            n.start_soon(produce)
            n.start_soon(results)
    both = sorted(sink.times + lifecycle)
    # Without sharing, progress alone would use 40 a minute: 70 with the results.
    assert max_in_span(both) <= 40 + b.burst
    assert max_in_span(sink.times) <= 40
    assert len(sink.times) > 0  # progress still flows in what is left
