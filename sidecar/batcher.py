"""The progress batcher: executors' events in, live `task_progress` frames out.

One drain task empties the bounded progress channel at once into per-task
pending segments (`segments.py`: so an executor never waits on the network,
and memory stays bounded whatever it prints), and one send loop turns them into
frames: every `window_s` (100 ms) at most one frame per task, tasks served
least recently served first, each frame one `execution_event` with `seq`
rising by exactly one per task, plus `dropped_events`/`dropped_bytes` [ours]
when something was lost since the task's previous frame. A running task
silent for `keepalive_s` gets a `status` frame "still running (N s)", and a
task queued for a free slot "queued (N s)", since the hub reclaims a task
without progress.

When frames go is the rate budget's word (`budget.RateBudget`, the model of
the hub's normal bucket that results share): progress may spend every token
above the reserve kept for lifecycle frames, so a task's lines go out as
printed, one window at most after they were, while the bucket holds tokens.

Coalescing is harder only when the budget demands it, because the hub drops
what exceeds its bucket and a dropped result is what costs most. Then a
task's events keep joining its pending segment until a token is due, and each
frame carries everything since the previous one (up to `max_text_bytes`, the
newest; the rest is dropped and announced). The bucket refills at one token a
second, so this is what happens to:

- a task printing a million lines: about 45 frames as printed (the bucket above
  the reserve), then one frame a second carrying the newest 64 KiB;
- many tasks at once: the same tokens shared round robin, each task's frames
  further apart, none starved; but a task that floods (it lost data since its
  last frame: its output outruns what a frame carries) waits behind the others
  for up to `bulk_wait_s`, since a frame shows all of a sparse task's new lines
  but only another lossy tail of a flood;
- a burst of short tasks: their accepts and results take the reserve first, so
  progress waits until the bucket refills above it (lifecycle frames never
  wait for progress);
- a hub `rate_limited` (the model was wrong) or pause: nothing until it ends,
  then a lower assumed refill for a while.

A task's result waits for its progress (`wait_task_flushed`) at most one window.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import trio

from .budget import RateBudget
from .log import get_logger
from .messages import ProgressEvent
from .segments import MAX_PENDING_BYTES, BatcherStats, PendingProgress, Segment, TaskState, next_frame

__all__ = ["Batcher", "BatcherStats", "ProgressSink"]

log = get_logger("sidecar.batcher")

_DRAIN_BATCH = 512  # events taken per wake-up without yielding, for throughput


class ProgressSink(Protocol):
    """What the batcher needs of the connection."""

    def can_send(self) -> bool:
        """True while connected and identified."""
        ...

    async def send_progress(self, frame: dict[str, Any]) -> bool:
        """Send one frame; False if it could not be sent (socket gone, paused)."""
        ...


class Batcher:
    """Coalesces progress events into `task_progress` frames the budget can pay for.

    Per task, at most `max_segments` pending segments of at most
    `max_text_bytes` each are kept. A finished task's pending data is sent for
    up to `finish_grace_s`, then dropped. At most `max_tasks` tasks (more only
    while that many run) and `max_pending_bytes` of text are held in all;
    finished tasks' data goes first (`segments.py`). A flooding task yields to
    the others for up to `bulk_wait_s`.
    `held_tasks` says how many tasks the sidecar holds (the budget keeps a
    token for each one's result); by default, the running ones here.
    """

    def __init__(
        self,
        budget: RateBudget | None = None,
        *,
        window_s: float = 0.1,
        keepalive_s: float = 120.0,
        max_text_bytes: int = 65536,
        max_segments: int = 16,
        max_tasks: int = 64,
        max_pending_bytes: int = MAX_PENDING_BYTES,
        finish_grace_s: float = 30.0,
        sink_poll_s: float = 0.5,
        bulk_wait_s: float = 10.0,
        held_tasks: Callable[[], int] | None = None,
    ) -> None:
        if max_segments < 2 or max_text_bytes < 1 or window_s <= 0:
            raise ValueError("max_segments >= 2, max_text_bytes >= 1 and window_s > 0 are required")
        self.budget = budget if budget is not None else RateBudget()
        self.window_s = window_s
        self.keepalive_s = keepalive_s
        self.max_text_bytes = max_text_bytes
        self.finish_grace_s = finish_grace_s
        self.sink_poll_s = sink_poll_s
        self.bulk_wait_s = bulk_wait_s
        self.stats = BatcherStats()
        self._held = held_tasks or self._running_count
        self._p = PendingProgress(self.stats, max_text_bytes, max_segments, max_tasks, max_pending_bytes)
        self._tasks = self._p.tasks  # least recently served first
        self._sink: ProgressSink | None = None
        self._last_window = -math.inf
        self._last_bulk = False  # the last frame sent was a flood's
        self._retry_at = -math.inf  # after a failed send, wait sink_poll_s
        self._closed = False
        self._wake_on_data = False
        self._wakeup = trio.Event()
        self._sleep_scope: trio.CancelScope | None = None  # the send loop's wait, while it waits
        self._lot = trio.lowlevel.ParkingLot()

    # -- executor-facing lifecycle ----------------------------------------------

    def task_queued(self, task_id: str) -> None:
        """An accepted task waits for a free slot: keep it alive too, "queued (N s)".

        The hub reclaims a task that shows no progress for 10 minutes, and a
        task queued behind a long one shows none of its own until it starts.
        """
        self._keep_alive(task_id, queued=True)

    def task_started(self, task_id: str) -> None:
        """A task began running: keep it alive with status frames while silent."""
        self._keep_alive(task_id, queued=False)

    def _keep_alive(self, task_id: str, *, queued: bool) -> None:
        now = trio.current_time()
        st = self._tasks.get(task_id) or self._p.new_state(task_id, now)
        st.running = True
        st.queued = queued
        st.started_at = now
        st.last_sent = now
        st.expire_at = math.inf
        # Nothing is due before its first keep-alive: the send loop need not run
        # now (a task step on every task's way to its spawn), only look again by then.
        self._look_again_by(now + self.keepalive_s)

    def task_finished(self, task_id: str) -> None:
        """A task ended: its pending data still goes out, within `finish_grace_s`."""
        st = self._tasks.get(task_id)
        if st is None:
            return
        st.running = False
        st.expire_at = trio.current_time() + self.finish_grace_s
        self._p.maybe_retire(st)
        if self.has_pending():
            # Its data (its expiry) or the others' (a token less is held back for
            # results now) may go sooner. With nothing pending anywhere there is
            # nothing to send: the loop's next look (a keep-alive due) is early at worst.
            self._wakeup.set()

    def _look_again_by(self, at: float) -> None:
        """Have a sleeping send loop wake by `at`; a running one recomputes anyway."""
        scope = self._sleep_scope
        if scope is not None and at < scope.deadline:
            scope.deadline = at

    def forget(self, task_id: str) -> None:
        """Drop a task's state and pending data now (reassigned away); ignore its late events."""
        self._p.forget(task_id)
        self._lot.unpark_all()

    def notify_sink_ready(self) -> None:
        """Optional: the sink became able to send; try at once instead of at the next poll."""
        self._retry_at = -math.inf
        self._wakeup.set()

    # -- introspection ------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Text bytes held for all tasks, in-flight frames included."""
        return self._p.nbytes

    @property
    def retired_count(self) -> int:
        return len(self._p.retired)

    def tracked_tasks(self) -> list[str]:
        return list(self._tasks)

    def has_pending(self) -> bool:
        return any(st.segments or st.inflight is not None for st in self._tasks.values())

    def task_pending(self, task_id: str) -> bool:
        st = self._tasks.get(task_id)
        return st is not None and (bool(st.segments) or st.inflight is not None)

    def _running_count(self) -> int:
        return sum(1 for st in self._tasks.values() if st.running)

    async def wait_task_flushed(self, task_id: str, deadline_s: float) -> bool:
        """Wait (at most `deadline_s`) until `task_id` has no pending progress.

        The outbox calls this before sending a task's result, so the hub sees
        a task's progress before its end. The task goes to the front and sends
        all its segments in the next window. If the budget (or the link, or a
        hub pause) cannot let that happen within one window, this returns False
        at once and logs why: a result is worth more than its progress, which
        follows later (or expires).
        """
        st = self._tasks.get(task_id)
        if st is None or not self.task_pending(task_id):
            return True
        st.flushing = True
        self._wakeup.set()
        # One window from now for all of its frames, not one window for each.
        by = trio.current_time() + self.window_s
        try:
            with trio.move_on_after(deadline_s):
                while self.task_pending(task_id):
                    self._tasks.move_to_end(task_id, last=False)
                    reason = self._blocked(trio.current_time(), by) if st.segments else None
                    if reason is not None:
                        self._after_result(st, reason)
                        return False
                    await self._lot.park()  # the send loop unparks on every pass
                self.stats.flushes_before_result += 1
                return True
            self._after_result(st, "timeout")
            return False
        finally:
            st.flushing = False

    def _blocked(self, now: float, by: float) -> str | None:
        """Why no progress frame can go by `by`, or None."""
        if self._sink is not None and not self._sink.can_send():
            return "link down"
        if self.budget.paused_until > by:
            return "hub pause"
        if self._retry_at > by:
            return "send failed"
        if self.budget.progress_at(now, self._held(), flush=True) > by:
            return "budget"
        return None

    def _after_result(self, st: TaskState, reason: str) -> None:
        self.stats.progress_after_result += 1
        now = trio.current_time()
        log.info(
            "progress_after_result",
            task_id=st.task_id,
            reason=reason,
            pending_bytes=st.nbytes,
            tokens=round(self.budget.tokens(now), 2),
            reserve=self.budget.reserve_for(self._held()),
        )

    # -- running ------------------------------------------------------------------

    async def run(
        self,
        receive: trio.MemoryReceiveChannel[ProgressEvent],
        sink: ProgressSink,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Drain `receive` and send frames to `sink` until the channel is closed
        and every pending event was sent or expired (or until cancelled).

        On exit the receive end is closed, so executors never block on a dead
        batcher (`ProgressSender.emit` ignores the broken channel).
        """
        self._sink = sink
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain, receive)
                task_status.started()
                await self._send_loop(sink)
        finally:
            receive.close()

    async def flush(self, deadline_s: float) -> bool:
        """Wait (at most `deadline_s`) until nothing is pending; True if all went out.

        The send loop of `run` does the sending; this only waits for it.
        """
        with trio.move_on_after(deadline_s):
            while self.has_pending():
                await self._lot.park()  # unparked each time the send loop moves
            return True
        return False

    async def _drain(self, receive: trio.MemoryReceiveChannel[ProgressEvent]) -> None:
        add, grace = self._p.add, self.finish_grace_s
        try:
            while True:
                try:
                    ev = await receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
                now = trio.current_time()
                add(ev, now, grace)
                for _ in range(_DRAIN_BATCH):
                    try:
                        ev = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        return
                    add(ev, now, grace)
                if self._wake_on_data:
                    self._wakeup.set()
        finally:
            self._closed = True
            now = trio.current_time()
            for st in list(self._tasks.values()):
                if st.running:
                    st.running = False
                    st.expire_at = now + self.finish_grace_s
                self._p.maybe_retire(st)
            self._wakeup.set()

    async def _send_loop(self, sink: ProgressSink) -> None:
        while True:
            now = trio.current_time()
            self._p.expire(now)
            self._lot.unpark_all()
            if self._closed and not self.has_pending():
                return
            sink_ok = sink.can_send()
            due = self._earliest_due(now)
            ready_at = max(self._last_window + self.window_s, self._retry_at)
            flush = any(st.flushing for st in self._tasks.values())
            budget_at = self.budget.progress_at(now, self._held(), flush)
            if due <= now and sink_ok and now >= max(ready_at, budget_at):
                await self._send_window(sink, now)
                continue
            # A result waits for these: they go when the budget allows, not at the
            # next window (the window paces a task's frames, a flush sends them all).
            flushing = flush and any(
                st.flushing and st.segments and st.inflight is None for st in self._tasks.values()
            )
            if flushing:
                early_at = max(self._retry_at, budget_at)
                if sink_ok and now >= early_at:
                    await self._send_window(sink, now, flushing_only=True)
                    continue
                ready_at = min(ready_at, early_at)
            wake = self._p.next_expiry()
            if due < math.inf:
                if not sink_ok:
                    wake = min(wake, max(due, now + self.sink_poll_s))
                else:
                    wake = min(wake, max(due, ready_at, budget_at))
            # New data can only make something due sooner when nothing is pending.
            self._wake_on_data = due > now
            self._wakeup = trio.Event()
            with trio.move_on_at(wake) as self._sleep_scope:
                await self._wakeup.wait()
            self._sleep_scope = None
            self._wake_on_data = False

    def _order(self, now: float) -> list[str]:
        """Least recently served first; a finishing task before all, a flood after the rest.

        A flood waiting longer than `bulk_wait_s` joins the rest, but never right
        after another flood's frame: the others then get every other token.
        """

        def rank(st: TaskState) -> int:
            if st.flushing:
                return 0
            if not (st.dropped_events or st.dropped_bytes):
                return 1
            return 1 if now - st.last_sent >= self.bulk_wait_s and not self._last_bulk else 2

        return sorted(self._tasks, key=lambda tid: rank(self._tasks[tid]))  # stable: LRU within a rank

    async def _send_window(self, sink: ProgressSink, now: float, *, flushing_only: bool = False) -> None:
        if not flushing_only:
            self._last_window = now
        for task_id in self._order(now):
            st = self._tasks.get(task_id)
            if st is None or st.inflight is not None:
                continue
            if flushing_only and not st.flushing:
                return  # they come first (`_order`): none after this one is
            if not st.segments and not self._keepalive_due(st, now):
                continue
            held = self._held()
            # Finishing tasks come first, at a lower level: once one task cannot go, none after it can.
            if not sink.can_send() or not self.budget.progress_ready(trio.current_time(), held, st.flushing):
                return
            self._tasks.move_to_end(task_id)
            while True:  # one frame, or all of a flushing task's segments
                # Spent before the send (no checkpoint since the check), refunded if it fails.
                self.budget.spend_progress(trio.current_time())
                if not await self._send_one(sink, st, now):
                    self.budget.refund_progress(trio.current_time())
                    self._retry_at = trio.current_time() + self.sink_poll_s
                    return
                if not (st.flushing and st.live and st.segments and st.inflight is None):
                    break
                if not sink.can_send() or not self.budget.progress_ready(trio.current_time(), held, True):
                    return

    async def _send_one(self, sink: ProgressSink, st: TaskState, now: float) -> bool:
        seg = st.segments.popleft() if st.segments else None
        frame = next_frame(st, seg, now)  # seq +1, drops since the last frame
        d_events, d_bytes = st.dropped_events, st.dropped_bytes
        self._last_bulk = bool(d_events or d_bytes)
        st.inflight = seg
        ok = False
        try:
            ok = await sink.send_progress(frame)
        finally:
            st.inflight = None
            self._after_send(st, seg, ok, d_events, d_bytes)
        return ok

    def _after_send(self, st: TaskState, seg: Segment | None, ok: bool, d_events: int, d_bytes: int) -> None:
        size = seg.nbytes if seg is not None else 0
        if ok:
            t = trio.current_time()
            self.stats.frames_sent += 1
            self.stats.bytes_sent += size
            if seg is None:
                self.stats.keepalives_sent += 1
            st.last_sent = t
            st.dropped_events -= d_events
            st.dropped_bytes -= d_bytes
            self._p.sent(st, size)
            return
        st.seq -= 1
        self.stats.send_failures += 1
        if seg is not None:
            self._p.put_back(st, seg)

    # -- timing -------------------------------------------------------------------

    def _earliest_due(self, now: float) -> float:
        due = math.inf
        for st in self._tasks.values():
            if st.inflight is not None:
                continue
            if st.segments:
                return now
            if st.running:
                due = min(due, st.last_sent + self.keepalive_s)
        return due

    def _keepalive_due(self, st: TaskState, now: float) -> bool:
        return st.running and now >= st.last_sent + self.keepalive_s
