"""The progress batcher: coalescing, windows, the budget's word, keep-alive, bounded memory.

All time is virtual (MockClock with autojump): `trio.sleep` here advances the
mock clock, it does not wait.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.batcher import Batcher
from sidecar.budget import RateBudget
from sidecar.messages import ProgressEvent


class RecordingSink:
    """An in-memory sink that records frames with the (virtual) time they were sent."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.up = True
        self.fail_sends = False  # can_send() True but the send fails (socket died)
        self.can_send_calls = 0
        self.send_calls = 0

    def can_send(self) -> bool:
        self.can_send_calls += 1
        return self.up

    async def send_progress(self, frame: dict[str, Any]) -> bool:
        self.send_calls += 1
        await trio.lowlevel.checkpoint()
        if not self.up or self.fail_sends:
            return False
        self.frames.append(frame)
        self.times.append(trio.current_time())
        return True

    def of(self, task_id: str) -> list[dict[str, Any]]:
        return [f["execution_event"] for f in self.frames if f["task_id"] == task_id]

    def times_of(self, task_id: str) -> list[float]:
        return [t for f, t in zip(self.frames, self.times, strict=True) if f["task_id"] == task_id]


def ev(task_id: str, text: str, event_type: str = "stdout", **kw: Any) -> ProgressEvent:
    return ProgressEvent(task_id, event_type, text, timestamp=kw.pop("timestamp", 0), **kw)


@asynccontextmanager
async def running(
    b: Batcher, sink: RecordingSink, size: int = 256
) -> AsyncIterator[trio.MemorySendChannel[ProgressEvent]]:
    send, recv = trio.open_memory_channel[ProgressEvent](size)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, recv, sink)
        yield send
        nursery.cancel_scope.cancel()


def roomy() -> RateBudget:
    """A budget so large that the window is what limits the frame rate."""
    return RateBudget(capacity=1_000_000, refill_per_s=100_000.0)


def max_in_span(times: list[float], span: float = 60.0) -> int:
    """The largest number of times inside any closed interval of length `span`."""
    best = j = 0
    for i, t in enumerate(times):
        while times[j] < t - span:
            j += 1
        best = max(best, i - j + 1)
    return best


def utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


async def test_coalesces_consecutive_events_per_task_and_type(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher()
    sink = RecordingSink()
    send, recv = trio.open_memory_channel[ProgressEvent](64)
    for e in [
        ev("A", "a", tokens_so_far=1, model="m1"),
        ev("B", "x", "token", tokens_so_far=5),
        ev("A", "b", tokens_so_far=2, timestamp=7),
        ev("A", "c", "stderr"),
        ev("B", "y", "token", tokens_so_far=6, model="m2"),
        ev("A", "d"),
    ]:
        send.send_nowait(e)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run, recv, sink)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    a = sink.of("A")
    assert [(e["event_type"], e["text"], e["seq"]) for e in a] == [
        ("stdout", "ab", 1),
        ("stderr", "c", 2),
        ("stdout", "d", 3),
    ]
    assert a[0]["tokens_so_far"] == 2 and a[0]["model"] == "m1" and a[0]["timestamp"] == 7
    bb = sink.of("B")
    assert [(e["event_type"], e["text"], e["tokens_so_far"], e["model"]) for e in bb] == [
        ("token", "xy", 6, "m2")
    ]
    assert all(set(f) == {"type", "task_id", "execution_event"} for f in sink.frames)
    assert all(f["type"] == "task_progress" for f in sink.frames)
    assert "dropped_events" not in a[0]
    assert b.stats.events_coalesced == 2 and b.stats.frames_sent == 4


async def test_coalesced_status_lines_stay_lines(autojump_clock: trio.abc.Clock) -> None:
    """Status and error events are lines without their newline: coalesced, each stays a
    line (found from outside: "verification 1/2: …verification 1/2 fail: …" ran on).
    Also after a failed send is put back in front of newer ones; stdout runs on as printed."""
    b = Batcher(roomy(), sink_poll_s=0.5)
    sink = RecordingSink()
    send, recv = trio.open_memory_channel[ProgressEvent](64)
    for e in [ev("A", "one", "status"), ev("A", "two", "status"), ev("A", "x", "stdout")]:
        send.send_nowait(e)
    send.send_nowait(ev("A", "y", "stdout"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run, recv, sink)
        await trio.sleep(1)
        sink.fail_sends = True
        await send.send(ev("A", "three", "status"))
        await trio.sleep(0.05)
        await send.send(ev("A", "four", "status"))
        await send.send(ev("A", "five", "error"))
        await trio.sleep(2)
        sink.fail_sends = False
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    assert [(e["event_type"], e["text"]) for e in sink.of("A")] == [
        ("status", "one\ntwo"),
        ("stdout", "xy"),
        ("status", "three\nfour"),
        ("error", "five"),
    ]
    assert b.pending_bytes == 0


async def test_one_frame_per_task_per_window_and_seq_plus_one(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(roomy(), window_s=0.1)
    sink = RecordingSink()
    async with running(b, sink) as send:

        async def produce(tid: str) -> None:
            for i in range(400):
                await send.send(ev(tid, f"{i},", "stdout" if (i // 50) % 2 else "stderr"))
                await trio.sleep(0.013)

        async with trio.open_nursery() as n:
            for tid in "ABC":
                n.start_soon(produce, tid)
        await trio.sleep(5)
    for tid in "ABC":
        times = sink.times_of(tid)
        assert len(times) > 30
        assert all(t2 - t1 >= 0.1 - 1e-9 for t1, t2 in itertools.pairwise(times))
        assert [e["seq"] for e in sink.of(tid)] == list(range(1, len(times) + 1))
        text = "".join(e["text"] for e in sink.of(tid))
        assert text.rstrip(",").split(",") == [str(i) for i in range(400)]
    assert b.stats.events_dropped == 0


async def test_progress_spends_only_above_the_reserve(autojump_clock: trio.abc.Clock) -> None:
    budget = RateBudget(capacity=60, refill_per_s=1.0, reserve=12)
    b = Batcher(budget)
    sink = RecordingSink()
    async with running(b, sink) as send:

        async def produce(tid: str) -> None:
            for i in range(6000):  # 5 virtual minutes of 20 events a second
                await send.send(ev(tid, f"line {i}\n"))
                await trio.sleep(0.05)

        for tid in "ABCDE":
            b.task_started(tid)
        async with trio.open_nursery() as n:
            for tid in "ABCDE":
                n.start_soon(produce, tid)
    # The bucket above the reserve (60 - 12 - 5 held - 2 for final flushes) at
    # once, then the refill.
    t0 = sink.times[0]
    assert all(n <= 41 + (t - t0) for n, t in enumerate(sink.times, 1))
    assert len([t for t in sink.times if t < t0 + 1]) >= 41  # live while the bucket has tokens
    assert len(sink.times) == pytest.approx(41 + 300, abs=3)
    for tid in "ABCDE":
        assert [e["seq"] for e in sink.of(tid)] == list(range(1, len(sink.of(tid)) + 1))


async def test_rate_limited_pauses_then_resumes(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher()
    sink = RecordingSink()
    async with running(b, sink) as send:

        async def produce() -> None:
            for i in range(2000):
                await send.send(ev("A", f"{i} "))
                await trio.sleep(0.1)

        async with trio.open_nursery() as n:
            n.start_soon(produce)
            await trio.sleep(20)
            t0 = trio.current_time()
            before = len(sink.times)
            b.budget.on_rate_limited(t0, 30.0)
            await trio.sleep(100)
            n.cancel_scope.cancel()
    assert before > 5
    assert not [t for t in sink.times if t0 < t < t0 + 30]
    after = [t for t in sink.times if t >= t0 + 30]
    assert after and after[0] < t0 + 33


async def test_rate_limited_waits_for_the_bucket_to_refill_above_the_reserve(
    autojump_clock: trio.abc.Clock,
) -> None:
    b = Batcher(RateBudget(capacity=60, refill_per_s=1.0, reserve=12), finish_grace_s=60)
    sink = RecordingSink()
    async with running(b, sink) as send:
        await trio.sleep(100)  # idle: the bucket is full
        t0 = trio.current_time()
        b.budget.on_rate_limited(t0, 1.0)  # empty, and half the refill for a while
        for tid in "ABCDEF":
            await send.send(ev(tid, "x"))
        await trio.sleep(29)
        assert sink.frames == []  # paused 1 s, then 12 + 2 + 1 tokens at 0.5 a second
        await trio.sleep(2)
        assert len(sink.frames) == 1 and sink.times[0] == pytest.approx(t0 + 15.001 / 0.5, abs=0.11)


async def test_keepalive_for_a_silent_task(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(keepalive_s=120.0)
    sink = RecordingSink()
    async with running(b, sink):
        t0 = trio.current_time()
        b.task_started("quiet")
        await trio.sleep(119)
        assert sink.frames == []
        await trio.sleep(2)
        assert len(sink.frames) == 1
        e = sink.of("quiet")[0]
        assert (e["event_type"], e["text"], e["seq"]) == ("status", "still running (120 s)", 1)
        assert sink.times[0] == pytest.approx(t0 + 120, abs=0.11)
        await trio.sleep(120)
        assert [e["text"] for e in sink.of("quiet")] == ["still running (120 s)", "still running (240 s)"]
        b.task_finished("quiet")
        await trio.sleep(600)
    assert len(sink.frames) == 2
    assert b.stats.keepalives_sent == 2
    assert b.tracked_tasks() == []


async def test_keepalive_for_a_queued_task_then_for_its_run(autojump_clock: trio.abc.Clock) -> None:
    """A task waiting for a slot is kept alive as well ("queued"), and its seq
    carries on once it starts, with the clock of its run starting again."""
    b = Batcher(keepalive_s=120.0)
    sink = RecordingSink()
    async with running(b, sink):
        b.task_queued("Q")
        await trio.sleep(250)
        assert [e["text"] for e in sink.of("Q")] == ["queued (120 s)", "queued (240 s)"]
        b.task_started("Q")
        await trio.sleep(121)
        b.task_finished("Q")
        await trio.sleep(600)
    events = sink.of("Q")
    assert [e["text"] for e in events] == ["queued (120 s)", "queued (240 s)", "still running (120 s)"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert b.tracked_tasks() == []


async def test_a_queued_task_that_ends_unstarted_is_no_longer_kept_alive(
    autojump_clock: trio.abc.Clock,
) -> None:
    b = Batcher(keepalive_s=120.0)
    sink = RecordingSink()
    async with running(b, sink):
        b.task_queued("C")
        await trio.sleep(121)
        b.task_finished("C")  # cancelled while it waited
        await trio.sleep(600)
    assert [e["text"] for e in sink.of("C")] == ["queued (120 s)"]
    assert b.tracked_tasks() == []


class _StepCounter(trio.abc.Instrument):
    def __init__(self, fragment: str) -> None:
        self.fragment = fragment
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.fragment in task.name:
            self.steps += 1


async def test_a_silent_task_starting_and_ending_costs_the_send_loop_no_step(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Every task starts and ends: with nothing to send, the sleeping send loop is
    only told when to look again (the keep-alive), not run, on either. It still
    sends the keep-alive of a task that starts while it sleeps with nothing due."""
    b = Batcher(keepalive_s=120.0)
    sink = RecordingSink()
    async with running(b, sink):
        await trio.testing.wait_all_tasks_blocked()
        counter = _StepCounter("sidecar.batcher.Batcher.run")
        trio.lowlevel.add_instrument(counter)
        try:
            for i in range(5):
                b.task_started(f"short-{i}")
                await trio.testing.wait_all_tasks_blocked()
                b.task_finished(f"short-{i}")
                await trio.testing.wait_all_tasks_blocked()
        finally:
            trio.lowlevel.remove_instrument(counter)
        assert counter.steps == 0
        assert sink.frames == []
        t0 = trio.current_time()
        b.task_started("quiet")
        await trio.sleep(121)
        assert [e["text"] for e in sink.of("quiet")] == ["still running (120 s)"]
        assert sink.times[0] == pytest.approx(t0 + 120, abs=0.11)


async def test_keepalive_clock_restarts_on_real_progress(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(keepalive_s=120.0)
    sink = RecordingSink()
    async with running(b, sink) as send:
        b.task_started("T")
        await trio.sleep(100)
        await send.send(ev("T", "hello"))
        await trio.sleep(119)
        assert [e["text"] for e in sink.of("T")] == ["hello"]
        await trio.sleep(2)
        assert [e["text"] for e in sink.of("T")] == ["hello", "still running (220 s)"]


async def test_flood_beyond_caps_is_dropped_and_counted(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(max_text_bytes=100, max_segments=4)
    sink = RecordingSink()
    sink.up = False
    total = 0
    async with running(b, sink) as send:
        for i in range(1000):
            text = f"<{i}>"
            total += len(text)
            await send.send(ev("A", text, ("stdout", "stdout", "stderr")[i % 3]))
        await trio.sleep(1)
        assert sink.send_calls == 0
        assert b.pending_bytes <= 4 * 100
        sink.up = True
        b.notify_sink_ready()
        await trio.sleep(30)
    frames = sink.of("A")
    assert len(frames) == 4
    assert frames[0]["dropped_events"] > 900 and frames[0]["dropped_bytes"] > 0
    assert all("dropped_events" not in e for e in frames[1:])
    sent = sum(len(e["text"]) for e in frames)
    assert sent + frames[0]["dropped_bytes"] == total
    assert b.stats.bytes_dropped == frames[0]["dropped_bytes"]
    assert b.stats.events_dropped == frames[0]["dropped_events"]
    # What survived is the newest data.
    assert frames[-1]["text"].endswith("<999>")


async def test_big_event_keeps_its_newest_bytes_on_a_utf8_boundary(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(max_text_bytes=10)
    sink = RecordingSink()
    async with running(b, sink) as send:
        sink.up = False
        await send.send(ev("A", "abc" + "é" * 10))  # 3 + 20 bytes
        await trio.sleep(1)
        sink.up = True
        await trio.sleep(1)
    (e,) = sink.of("A")
    assert e["text"] == "é" * 5
    assert (e["dropped_events"], e["dropped_bytes"]) == (0, 13)


async def test_memory_bounded_for_a_million_events(autojump_clock: trio.abc.Clock) -> None:
    caps = {"max_text_bytes": 4096, "max_segments": 8}
    b = Batcher(max_text_bytes=caps["max_text_bytes"], max_segments=caps["max_segments"])
    sink = RecordingSink()
    sink.up = False  # the worst case: nothing leaves
    bound = 4 * caps["max_text_bytes"] * caps["max_segments"]
    types = ("token", "token", "token", "stdout", "stderr")
    async with running(b, sink, size=1024) as send:
        for i in range(1_000_000):
            e = ev("ABCD"[i % 4], "xyzé"[: i % 5] + "0123456789"[: i % 11], types[(i // 4) % 5])
            try:  # fill the channel without a scheduling round per event (keeps the test fast)
                send.send_nowait(e)
            except trio.WouldBlock:
                await send.send(e)
            if i % 50_000 == 0:
                assert b.pending_bytes <= bound
                held = sum(utf8(seg.text()) for state in b._tasks.values() for seg in state.segments)
                assert held == b.pending_bytes
        await trio.sleep(1)
    assert b.stats.events_in == 1_000_000
    assert b.stats.peak_pending_bytes <= bound
    assert b.stats.events_dropped > 900_000
    assert len(b.tracked_tasks()) == 4
    assert all(len(st.segments) <= caps["max_segments"] for st in b._tasks.values())


async def test_executor_never_waits_on_a_stalled_sink(autojump_clock: trio.abc.Clock) -> None:
    class StalledSink(RecordingSink):
        async def send_progress(self, frame: dict[str, Any]) -> bool:
            self.send_calls += 1
            await trio.sleep_forever()
            raise AssertionError("unreachable")

    b = Batcher()
    sink = StalledSink()
    async with running(b, sink, size=16) as send:
        t0 = trio.current_time()
        with trio.fail_after(0.01):  # virtual: any wait for the clock would trip it
            for i in range(20_000):
                await send.send(ev("A", f"{i}\n"))
        assert trio.current_time() == t0
        await trio.testing.wait_all_tasks_blocked()
        assert sink.send_calls == 1
        assert b.stats.events_in == 20_000


async def test_disconnected_sink_no_sends_no_spin_then_resumes(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(max_text_bytes=1000, sink_poll_s=0.5)
    sink = RecordingSink()
    async with running(b, sink) as send:
        b.task_started("A")
        await send.send(ev("A", "before "))
        await trio.sleep(1)
        assert [e["text"] for e in sink.of("A")] == ["before "]
        sink.up = False
        polls = sink.can_send_calls
        for i in range(300):
            await send.send(ev("A", f"{i:04d}"))
            await trio.sleep(0.1)
        assert sink.send_calls == 1
        assert b.pending_bytes <= 1000
        # 30 s of outage at one poll per 0.5 s (a few more around the data).
        assert sink.can_send_calls - polls <= 70
        sink.up = True
        await trio.sleep(2)
    frames = sink.of("A")
    assert [e["seq"] for e in frames] == [1, 2]
    # The newest data survives, cut on an event boundary (small events are dropped
    # in chunks of a few, so that event counts stay exact).
    given = "".join(f"{i:04d}" for i in range(300))
    kept, dropped = frames[1]["text"], frames[1]["dropped_bytes"]
    assert given.endswith(kept) and 1000 - 2 * 64 <= len(kept) <= 1000
    assert dropped == 1200 - len(kept) and frames[1]["dropped_events"] == dropped // 4


async def test_failed_send_is_retried_with_same_seq(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(roomy(), sink_poll_s=0.5)
    sink = RecordingSink()
    async with running(b, sink) as send:
        sink.fail_sends = True
        await send.send(ev("A", "one "))
        await trio.sleep(0.05)
        await send.send(ev("A", "two"))
        await trio.sleep(3)
        assert sink.frames == []
        assert 2 <= sink.send_calls <= 7  # retried once per sink_poll_s, not every window
        sink.fail_sends = False
        await trio.sleep(3)
    assert [(e["text"], e["seq"]) for e in sink.of("A")] == [("one two", 1)]
    assert b.stats.send_failures == sink.send_calls - 1


async def test_task_finished_flushes_then_forgets(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(RateBudget(capacity=14, refill_per_s=0.25, reserve=12))
    sink = RecordingSink()
    async with running(b, sink) as send:
        b.task_started("T")
        for kind in ("stdout", "stderr", "stdout", "stderr"):
            await send.send(ev("T", kind, kind))
        b.task_finished("T")
        await trio.sleep(0.01)
        assert b.tracked_tasks() == ["T"]
        await trio.sleep(20)  # 1 token a 4 s: all four frames go out
        assert [e["text"] for e in sink.of("T")] == ["stdout", "stderr", "stdout", "stderr"]
        assert b.tracked_tasks() == []
        # A late event (the executor's last line still queued) continues the seq.
        await send.send(ev("T", "late"))
        await trio.sleep(10)
        assert [e["seq"] for e in sink.of("T")] == [1, 2, 3, 4, 5]
        assert b.tracked_tasks() == []


async def test_result_wait_gives_up_at_once_when_the_budget_is_dry(autojump_clock: trio.abc.Clock) -> None:
    """With the bucket spent down to the reserve by lifecycle frames, a result
    must not wait for progress that cannot go out: a backlog of N results
    would take N times the wait to drain."""
    b = Batcher(RateBudget(capacity=16, refill_per_s=0.1, reserve=12))
    sink = RecordingSink()
    async with running(b, sink) as send:
        b.task_started("T")
        await send.send(ev("T", "first"))
        await trio.sleep(0.2)
        for _ in range(3):
            b.budget.spend_lifecycle(trio.current_time())  # results and accepts took the shared bucket
        await send.send(ev("T", "late line"))
        await trio.lowlevel.checkpoint()
        b.task_finished("T")
        t0 = trio.current_time()
        assert await b.wait_task_flushed("T", 2.0) is False
        assert trio.current_time() - t0 <= b.window_s  # not the whole 2 s
        assert b.stats.progress_after_result == 1
        # The progress is not lost: it follows once the budget allows.
        await trio.sleep(60)
        assert [e["text"] for e in sink.of("T")] == ["first", "late line"]


async def test_result_wait_serves_the_finishing_task_first(autojump_clock: trio.abc.Clock) -> None:
    """With one token above the reserve, the task whose result waits gets it, not a busier peer."""
    b = Batcher(RateBudget(capacity=20, refill_per_s=0.001, reserve=12), held_tasks=lambda: 4)
    sink = RecordingSink()
    async with running(b, sink) as send:
        for t in ("Z", "A", "B", "T"):
            b.task_started(t)
        await trio.sleep(0.2)
        await send.send(ev("Z", "z"))
        await trio.sleep(0.01)  # virtual: Z went out at 0.2, the next window opens at 0.3
        assert sink.of("Z")
        b.budget.spend_lifecycle(trio.current_time())  # one token left above the reserve (12 + 4)
        for t in ("A", "B", "T"):
            await send.send(ev(t, f"{t} line"))
        await trio.lowlevel.checkpoint()
        b.task_finished("T")
        t0 = trio.current_time()
        assert await b.wait_task_flushed("T", 2.0) is True
        assert trio.current_time() - t0 <= b.window_s
        assert [e["text"] for e in sink.of("T")] == ["T line"]
        assert sink.of("A") == [] and sink.of("B") == []  # they wait for the next tokens


async def test_result_wait_sends_all_of_a_tasks_segments_in_one_window(
    autojump_clock: trio.abc.Clock,
) -> None:
    b = Batcher()
    sink = RecordingSink()
    async with running(b, sink) as send:
        b.task_started("T")
        await send.send(ev("T", "a"))
        await trio.sleep(0.01)
        for i, kind in enumerate(("stderr", "stdout", "stderr", "stdout")):
            await send.send(ev("T", f"{kind} {i}", kind))
        await trio.lowlevel.checkpoint()
        b.task_finished("T")
        t0 = trio.current_time()
        assert await b.wait_task_flushed("T", 2.0) is True
        assert trio.current_time() - t0 <= b.window_s
    assert [e["text"] for e in sink.of("T")] == ["a", "stderr 0", "stdout 1", "stderr 2", "stdout 3"]
    assert b.stats.flushes_before_result == 1


async def test_result_wait_gives_up_at_once_when_the_hub_paused_us(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(finish_grace_s=60)
    sink = RecordingSink()
    async with running(b, sink) as send:
        b.task_started("T")
        b.budget.on_rate_limited(trio.current_time(), 5.0)
        await send.send(ev("T", "line"))
        await trio.lowlevel.checkpoint()
        b.task_finished("T")
        t0 = trio.current_time()
        assert await b.wait_task_flushed("T", 2.0) is False
        assert trio.current_time() == t0
        await trio.sleep(40)
    assert [e["text"] for e in sink.of("T")] == ["line"]


async def test_a_flood_yields_to_a_sparse_task_which_still_flushes_before_its_result(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Three tasks flood (more than a frame carries: lossy anyway) while one prints
    2.5 lines a second: once the bucket is down to the reserve, the sparse task
    gets the tokens the refill brings, the floods one frame each per
    `bulk_wait_s`, and the sparse task's last lines still precede its result."""
    b = Batcher(max_text_bytes=1000, bulk_wait_s=10.0)
    sink = RecordingSink()
    printed: dict[str, float] = {}
    async with running(b, sink) as send:
        for t in ("F1", "F2", "F3", "S"):
            b.task_started(t)

        async def flood(tid: str) -> None:
            for _ in range(3000):  # 30 s of 10 KB a second
                await send.send(ev(tid, "x" * 100))
                await trio.sleep(0.01)

        async def sparse() -> bool:
            for i in range(75):  # 30 s
                printed[f"L{i};"] = trio.current_time()
                await send.send(ev("S", f"L{i};"))
                await trio.sleep(0.4)
            await trio.sleep(0.001)
            b.task_finished("S")
            return await b.wait_task_flushed("S", 1.0)

        flushed = []
        async with trio.open_nursery() as n:
            for tid in ("F1", "F2", "F3"):
                n.start_soon(flood, tid)

            async def run_sparse() -> None:
                flushed.append(await sparse())

            n.start_soon(run_sparse)
    assert flushed == [True]
    arrival: dict[str, float] = {}
    for f, at in zip(sink.frames, sink.times, strict=True):
        if f["task_id"] == "S":
            for line in f["execution_event"]["text"].split(";")[:-1]:
                arrival[line + ";"] = at
    assert set(arrival) == set(printed)
    steady = sorted(arrival[k] - printed[k] for k in printed if printed[k] > 5)
    assert steady[len(steady) // 2] <= 0.7, steady  # a token a second, and S goes first
    assert steady[-1] <= 2.0 + 0.1, steady  # every other token while a flood had waited too long
    for tid in ("F1", "F2", "F3"):
        late = [t for t in sink.times_of(tid) if t > 5]
        assert 1 <= len(late) <= 30 / 10 + 1, (tid, late)  # not starved, but one per bulk_wait_s


async def test_finished_task_data_expires_when_it_cannot_go_out(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(finish_grace_s=30)
    sink = RecordingSink()
    sink.up = False
    async with running(b, sink) as send:
        b.task_started("T")
        await send.send(ev("T", "12345"))
        b.task_finished("T")
        await trio.sleep(29)
        assert b.tracked_tasks() == ["T"]
        await trio.sleep(2)
        assert b.tracked_tasks() == []
        assert (b.stats.events_dropped, b.stats.bytes_dropped) == (1, 5)
        sink.up = True
        await trio.sleep(5)
    assert sink.frames == []


async def test_many_tasks_leave_no_state(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(roomy())
    sink = RecordingSink()
    async with running(b, sink) as send:
        for i in range(2000):
            tid = f"t{i}"
            b.task_started(tid)
            await send.send(ev(tid, "x"))
            await trio.sleep(0.2)
            b.task_finished(tid)
        await trio.sleep(5)
    assert b.tracked_tasks() == [] and b.pending_bytes == 0
    assert len(sink.frames) == 2000
    assert b.retired_count <= 1024


async def test_finished_tasks_progress_is_bounded_in_tasks_and_bytes(autojump_clock: trio.abc.Clock) -> None:
    """Sequential tasks faster than the budget: finished tasks' held progress stays
    within `max_tasks` and `max_pending_bytes` (oldest finished dropped first),
    not within "everything of the last `finish_grace_s`" (issue 11, memory)."""
    b = Batcher(max_text_bytes=10_000, max_tasks=8, max_pending_bytes=50_000, finish_grace_s=30)
    sink = RecordingSink()
    sink.up = False  # the worst case: nothing leaves
    given = 0
    async with running(b, sink) as send:
        for i in range(200):
            tid = f"t{i}"
            b.task_started(tid)
            for j in range(10):
                text = f"{tid}:{j}:" + "x" * 2000
                given += utf8(text)
                await send.send(ev(tid, text, ("stdout", "stderr")[j // 5]))
            b.task_finished(tid)
            await trio.sleep(0.1)  # 200 tasks in 20 s: none expires by time
            assert len(b.tracked_tasks()) <= 8
            assert b.pending_bytes <= 50_000
        held = b.pending_bytes
        assert b.stats.bytes_dropped + held == given
        sink.up = True
        b.notify_sink_ready()
        await trio.sleep(60)
    assert sum(utf8(f["execution_event"]["text"]) for f in sink.frames) == held
    assert b.pending_bytes == 0
    # The newest tasks' progress is what was kept.
    assert sink.of("t199") and not sink.of("t0")
    assert {f["task_id"] for f in sink.frames} <= {f"t{i}" for i in range(192, 200)}


async def test_running_tasks_share_the_pending_bytes_cap(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher(max_text_bytes=10_000, max_segments=16, max_pending_bytes=25_000)
    sink = RecordingSink()
    sink.up = False
    given = dict.fromkeys("ABCD", "")
    async with running(b, sink) as send:
        for tid in "ABCD":
            b.task_started(tid)
        for i in range(400):
            tid = "ABCD"[i % 4]
            text = f"<{i}>" + "y" * 300
            given[tid] += text
            # Stream kinds only: coalesced status lines gain a line break each, so
            # their bytes would not add up to what was given.
            await send.send(ev(tid, text, ("stdout", "stderr", "token")[(i // 40) % 3]))
            assert b.pending_bytes <= 25_000
        await trio.sleep(1)
        sink.up = True
        b.notify_sink_ready()
        await trio.sleep(120)
        assert b.pending_bytes == 0
    for tid in "ABCD":
        sent = sink.of(tid)
        assert [e["seq"] for e in sent] == list(range(1, len(sent) + 1))
        dropped = sum(e.get("dropped_bytes", 0) for e in sent)
        assert sum(utf8(e["text"]) for e in sent) + dropped == utf8(given[tid])
        assert dropped > 0
        # Each task kept its newest text: its last frame ends with its last event.
        assert sent[-1]["text"].endswith(given[tid][-300:])


async def test_forget_drops_state_and_late_events(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher()
    sink = RecordingSink()
    sink.up = False
    async with running(b, sink) as send:
        b.task_started("R")
        await send.send(ev("R", "abc"))
        await trio.sleep(0.5)
        b.forget("R")
        assert b.tracked_tasks() == [] and b.pending_bytes == 0
        await send.send(ev("R", "late"))
        sink.up = True
        await trio.sleep(200)
    assert sink.frames == []
    assert (b.stats.events_dropped, b.stats.bytes_dropped) == (2, 7)


async def test_fair_round_robin_across_tasks(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher()
    sink = RecordingSink()
    async with running(b, sink) as send:

        async def produce(tid: str, per_s: int) -> None:
            for i in range(per_s * 180):
                await send.send(ev(tid, f"{i} "))
                await trio.sleep(1 / per_s)

        for tid in ("noisy", "mid", "slow"):
            b.task_started(tid)
        async with trio.open_nursery() as n:
            n.start_soon(produce, "noisy", 100)
            n.start_soon(produce, "mid", 10)
            n.start_soon(produce, "slow", 2)
    # Once the bucket is down to the reserve, each task gets every third token.
    late = [(f["task_id"], t) for f, t in zip(sink.frames, sink.times, strict=True) if t > 10]
    counts = {tid: sum(1 for x, _ in late if x == tid) for tid in ("noisy", "mid", "slow")}
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    order = [x for x, _ in late[:30]]
    for i in range(0, 27, 3):
        assert len(set(order[i : i + 3])) == 3, order


async def test_flush_waits_for_pending_and_run_ends_when_channel_closes(
    autojump_clock: trio.abc.Clock,
) -> None:
    b = Batcher(RateBudget(capacity=14, refill_per_s=0.25, reserve=12))
    sink = RecordingSink()
    send, recv = trio.open_memory_channel[ProgressEvent](16)
    async with trio.open_nursery() as nursery:
        await nursery.start(b.run, recv, sink)
        for kind in ("stdout", "stderr", "stdout"):
            await send.send(ev("T", kind, kind))
        await trio.testing.wait_all_tasks_blocked()
        assert not await b.flush(1.0)  # two frames at once, then one token every 4 s
        t0 = trio.current_time()
        assert await b.flush(60.0)
        assert 2.5 < trio.current_time() - t0 < 3.5
        await send.send(ev("T", "last"))
        await send.aclose()
        # run() returns by itself once the channel is closed and flushed.
    assert [e["text"] for e in sink.of("T")] == ["stdout", "stderr", "stdout", "last"]


async def test_flush_gives_up_when_the_sink_is_down(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher()
    sink = RecordingSink()
    sink.up = False
    async with running(b, sink) as send:
        await send.send(ev("T", "x"))
        await trio.testing.wait_all_tasks_blocked()
        t0 = trio.current_time()
        assert not await b.flush(2.0)
        assert trio.current_time() - t0 == pytest.approx(2.0)


# -- property: nothing is lost silently -----------------------------------------------

_event = st.tuples(
    st.sampled_from("AB"),
    st.sampled_from(["stdout", "stderr", "token"]),
    st.text(alphabet=st.sampled_from("ab\n é€😀"), max_size=40),
    st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.3, 2.0]),  # pause after the event
    st.sampled_from(["up", "up", "up", "down", "fail"]),  # sink state after it
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(_event, max_size=120), seed=st.integers(0, 2**16))
def test_property_every_kept_byte_arrives_in_order_and_drops_are_counted(
    events: list[tuple[str, str, str, float, str]], seed: int
) -> None:
    rng = random.Random(seed)

    # Running tasks may also be cut by the shared `max_pending_bytes`; their drops
    # are announced like any other. (Never-started tasks count as finished.)
    started = rng.random() < 0.5
    max_text = rng.choice([8, 32, 1000])

    async def main() -> RecordingSink:
        b = Batcher(
            RateBudget(capacity=rng.choice([14, 60, 100_000]), refill_per_s=rng.choice([0.1, 1.0, 1000.0])),
            max_text_bytes=max_text,
            max_segments=rng.choice([2, 3, 16]),
            max_pending_bytes=rng.choice([max_text, 3 * max_text, 1 << 30]) if started else 1 << 30,
            keepalive_s=1e9,
            finish_grace_s=1e9,
        )
        sink = RecordingSink()
        send, recv = trio.open_memory_channel[ProgressEvent](rng.choice([1, 8, 1000]))
        async with trio.open_nursery() as nursery:
            await nursery.start(b.run, recv, sink)
            if started:
                b.task_started("A")
                b.task_started("B")
            for tid, kind, text, pause, state in events:
                await send.send(ev(tid, text, kind))
                assert b.pending_bytes <= b._p.max_pending_bytes
                sink.up = state != "down"
                sink.fail_sends = state == "fail"
                if pause:
                    await trio.sleep(pause)
            sink.up, sink.fail_sends = True, False
            await send.aclose()
        return sink

    sink = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    for tid in "AB":
        sent = sink.of(tid)
        assert [e["seq"] for e in sent] == list(range(1, len(sent) + 1))
        given_text = "".join(text for t, _, text, _, _ in events if t == tid)
        sent_text = "".join(e["text"] for e in sent)
        dropped = sum(e.get("dropped_bytes", 0) for e in sent)
        assert utf8(sent_text) + dropped == utf8(given_text)
        it = iter(given_text)  # sent text is given text with pieces cut out, order kept
        assert all(ch in it for ch in sent_text)
        # Each frame's text is one run of one event type, in that type's order.
        for kind in ("stdout", "stderr", "token"):
            of_kind = "".join(text for t, k, text, _, _ in events if t == tid and k == kind)
            it = iter(of_kind)
            assert all(ch in it for e in sent if e["event_type"] == kind for ch in e["text"])
