"""The progress batcher: executors' events in, a few `task_progress` frames out.

The hub's *normal* rate bucket (60 frames a minute per agent) is shared by
progress and by results; a result dropped for rate reasons must be resent, and
too much progress starves it. So the batcher spends only part of that bucket
(`budget_per_min`, default 40) and coalesces harder when it has no budget, the
hub warns, or the link is down. Memory stays bounded whatever the executors
produce: what cannot be kept is dropped and announced with counts.

Shape: one drain task empties the bounded progress channel at once into
per-task pending segments (so an executor never waits on the network), and one
send loop turns pending segments into frames:

- per task, consecutive events of one `event_type` form one segment (texts
  concatenated, the latest `tokens_so_far`/`model`/`timestamp` kept);
- a segment keeps at most `max_text_bytes` UTF-8 bytes, the *newest* ones, and
  a task at most `max_segments` segments (the oldest is dropped first). Newest,
  not head+tail: progress is a live view of what a task is doing now (its full
  output travels in the result), and cutting only at the front leaves one hole
  right after the previous frame, which the drop counts describe exactly; a hole
  in the middle of a frame could not be located by a reader;
- every `window_s` at most one frame per task, tasks served least recently
  served first; each frame carries one `execution_event` with `seq` rising by
  exactly one per task, plus `dropped_events`/`dropped_bytes` [ours] inside the
  `execution_event` when something was lost since the task's previous frame;
- a token bucket (burst `burst`, refill `(budget_per_min - burst)` a minute)
  bounds frames to `budget_per_min` in *any* 60 s span; a hub warning halves
  the rate and burst for `penalty_s` (repeatable, down to 1/8), `rate_limited`
  also pauses progress until `retry_after` and empties the bucket;
- a running task silent for `keepalive_s` gets a `status` frame
  "still running (N s)", since the hub reclaims a task without progress.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any, Protocol

import attrs
import trio

from .log import get_logger
from .messages import ProgressEvent, now_ms

log = get_logger(__name__)

_SPAN_S = 60.0  # the hub's rate limits are per minute
_DRAIN_BATCH = 512  # events taken per wake-up without yielding, for throughput
_CHUNK_EVENTS = 256  # small events sealed into one chunk at most this many at a time
_RETIRED_MAX = 1024  # remembered seq of finished / forgotten tasks (bounded)
_MIN_FACTOR = 1 / 8  # lowest rate factor after repeated hub warnings
_EPS = 1e-9


class ProgressSink(Protocol):
    """What the batcher needs of the connection."""

    def can_send(self) -> bool:
        """True while connected and identified."""
        ...

    async def send_progress(self, frame: dict[str, Any]) -> bool:
        """Send one frame; False if it could not be sent (socket gone, paused)."""
        ...


@attrs.define
class BatcherStats:
    """Counters over the batcher's life (read them, do not write them)."""

    events_in: int = 0
    events_coalesced: int = 0  # events merged into an already pending segment
    frames_sent: int = 0
    keepalives_sent: int = 0
    bytes_sent: int = 0
    events_dropped: int = 0  # events whose text was lost entirely
    bytes_dropped: int = 0  # UTF-8 bytes of text lost (whole or cut events)
    send_failures: int = 0
    rate_limit_warnings: int = 0
    rate_limited: int = 0
    peak_pending_bytes: int = 0


def _nbytes(text: str) -> int:
    # str.isascii() is O(1) in CPython (a flag of the string object).
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _keep_last_bytes(text: str, limit: int) -> tuple[str, int]:
    """The longest suffix of `text` of at most `limit` UTF-8 bytes, and its size."""
    if limit <= 0:
        return "", 0
    if text.isascii():
        kept = text[-limit:]
        return kept, len(kept)
    enc = text.encode("utf-8", "surrogatepass")
    start = max(0, len(enc) - limit)
    while start < len(enc) and (enc[start] & 0xC0) == 0x80:  # not mid-character
        start += 1
    return enc[start:].decode("utf-8", "surrogatepass"), len(enc) - start


class _Segment:
    """Consecutive events of one type of one task, waiting to be one frame.

    Text is kept as sealed chunks (deque of (text, bytes, events)) plus an open
    tail of small parts, so that appending and cutting the front are both O(1)
    amortized and event counts stay exact: a chunk holding several events is
    small (under 2 * chunk_bytes) and is dropped whole; only a chunk holding a
    single event is ever cut in part.
    """

    __slots__ = (
        "chunks",
        "event_type",
        "extra",
        "model",
        "nbytes",
        "nevents",
        "tail",
        "tail_bytes",
        "timestamp",
        "tokens_so_far",
    )

    def __init__(self, event_type: str) -> None:
        self.event_type = event_type
        self.chunks: deque[tuple[str, int, int]] = deque()
        self.tail: list[str] = []
        self.tail_bytes = 0
        self.nbytes = 0
        self.nevents = 0
        self.timestamp = 0
        self.tokens_so_far: int | None = None
        self.model: str | None = None
        # An event with extra fields (tool_call) is a segment of its own, never merged.
        self.extra: dict[str, Any] | None = None

    def _seal(self) -> None:
        if self.tail:
            self.chunks.append(("".join(self.tail), self.tail_bytes, len(self.tail)))
            self.tail = []
            self.tail_bytes = 0

    def add(self, ev: ProgressEvent, nbytes: int, chunk_bytes: int) -> None:
        if nbytes >= chunk_bytes:
            self._seal()
            self.chunks.append((ev.text, nbytes, 1))
        else:
            self.tail.append(ev.text)
            self.tail_bytes += nbytes
            if self.tail_bytes >= chunk_bytes or len(self.tail) >= _CHUNK_EVENTS:
                self._seal()
        self.nbytes += nbytes
        self.nevents += 1
        self._take_meta(ev.timestamp, ev.tokens_so_far, ev.model)

    def _take_meta(self, timestamp: int, tokens_so_far: int | None, model: str | None) -> None:
        self.timestamp = timestamp
        if tokens_so_far is not None:
            self.tokens_so_far = tokens_so_far
        if model is not None:
            self.model = model

    def absorb(self, newer: _Segment) -> None:
        """Append a newer segment of the same type (a failed send put back)."""
        self._seal()
        newer._seal()
        self.chunks.extend(newer.chunks)
        self.nbytes += newer.nbytes
        self.nevents += newer.nevents
        self._take_meta(newer.timestamp, newer.tokens_so_far, newer.model)

    def trim(self, cap: int) -> tuple[int, int]:
        """Drop the oldest text until at most `cap` bytes remain; (events, bytes) dropped."""
        events = dropped = 0
        while self.nbytes > cap:
            if not self.chunks:
                self._seal()
            text, size, count = self.chunks[0]
            excess = self.nbytes - cap
            if count == 1 and size > excess:
                kept, kept_size = _keep_last_bytes(text, size - excess)
                self.chunks[0] = (kept, kept_size, 1)
                cut = size - kept_size
            else:
                self.chunks.popleft()
                cut = size
                events += count
                self.nevents -= count
            dropped += cut
            self.nbytes -= cut
        return events, dropped

    def text(self) -> str:
        return "".join([c[0] for c in self.chunks] + self.tail)


def _mergeable(a: _Segment, b: _Segment) -> bool:
    return a.event_type == b.event_type and a.extra is None and b.extra is None


class _TaskState:
    __slots__ = (
        "dropped_bytes",
        "dropped_events",
        "expire_at",
        "inflight",
        "last_sent",
        "live",
        "nbytes",
        "running",
        "segments",
        "seq",
        "started_at",
        "task_id",
        "total_dropped_bytes",
        "total_dropped_events",
    )

    def __init__(self, task_id: str, seq: int, now: float) -> None:
        self.task_id = task_id
        self.segments: deque[_Segment] = deque()
        self.inflight: _Segment | None = None
        self.seq = seq
        self.nbytes = 0  # pending text bytes, in-flight segment included
        self.dropped_events = 0  # since the last frame sent
        self.dropped_bytes = 0
        self.total_dropped_events = 0
        self.total_dropped_bytes = 0
        self.running = False
        self.started_at = now
        self.last_sent = now
        self.expire_at = math.inf
        self.live = True  # False once forgotten (an in-flight send may still finish)


class Batcher:
    """Coalesces progress events into rate-budgeted `task_progress` frames.

    `budget_per_min` bounds frames in any 60 s span; `burst` (default
    budget/8) of them may go at once, the rest is spread evenly. Per task, at
    most `max_segments` pending segments of at most `max_text_bytes` each are
    kept. A finished task's pending data is sent for up to `finish_grace_s`,
    then dropped. At most `max_tasks` tasks are tracked at once.
    """

    def __init__(
        self,
        window_s: float = 0.1,
        budget_per_min: int = 40,
        keepalive_s: float = 120.0,
        max_text_bytes: int = 65536,
        *,
        burst: int | None = None,
        max_segments: int = 16,
        max_tasks: int = 64,
        finish_grace_s: float = 30.0,
        penalty_s: float = 60.0,
        sink_poll_s: float = 0.5,
    ) -> None:
        if budget_per_min < 2:
            raise ValueError("budget_per_min must be at least 2")
        if max_segments < 2 or max_text_bytes < 1 or window_s <= 0:
            raise ValueError("max_segments >= 2, max_text_bytes >= 1 and window_s > 0 are required")
        self.window_s = window_s
        self.budget_per_min = budget_per_min
        self.burst = burst if burst is not None else max(1, budget_per_min // 8)
        if not 1 <= self.burst < budget_per_min:
            raise ValueError("burst must be between 1 and budget_per_min - 1")
        self.keepalive_s = keepalive_s
        self.max_text_bytes = max_text_bytes
        self.max_segments = max_segments
        self.max_tasks = max_tasks
        self.finish_grace_s = finish_grace_s
        self.penalty_s = penalty_s
        self.sink_poll_s = sink_poll_s
        self.stats = BatcherStats()

        self._chunk_bytes = max(1, min(1024, max_text_bytes // 16))
        self._tasks: OrderedDict[str, _TaskState] = OrderedDict()  # least recently served first
        self._retired: OrderedDict[str, int] = OrderedDict()  # finished task -> last seq
        self._forgotten: OrderedDict[str, int] = OrderedDict()  # forgotten task -> last seq
        self._pending = 0
        # Token bucket: `burst` tokens at most, refilled so that burst + refill
        # over 60 s never exceeds budget_per_min.
        self._rate = (budget_per_min - self.burst) / _SPAN_S
        self._tokens = float(self.burst)
        self._refilled_at: float | None = None
        self._factor = 1.0
        self._penalty_until = -math.inf
        self._paused_until = -math.inf
        self._last_window = -math.inf
        self._retry_at = -math.inf  # after a failed send, wait sink_poll_s
        self._closed = False
        self._wake_on_data = False
        self._wakeup = trio.Event()
        self._lot = trio.lowlevel.ParkingLot()

    # -- executor-facing lifecycle ----------------------------------------------

    def task_started(self, task_id: str) -> None:
        """A task began running: keep it alive with status frames while silent."""
        now = trio.current_time()
        st = self._tasks.get(task_id)
        if st is None:
            st = self._new_state(task_id, now)
        st.running = True
        st.started_at = now
        st.last_sent = now
        st.expire_at = math.inf
        self._wakeup.set()

    def task_finished(self, task_id: str) -> None:
        """A task ended: its pending data still goes out, within `finish_grace_s`."""
        st = self._tasks.get(task_id)
        if st is None:
            return
        st.running = False
        st.expire_at = trio.current_time() + self.finish_grace_s
        self._maybe_retire(st)
        self._wakeup.set()

    def forget(self, task_id: str) -> None:
        """Drop a task's state and pending data now (reassigned away); ignore its late events."""
        st = self._tasks.pop(task_id, None)
        seq = self._retired.pop(task_id, 0)
        if st is not None:
            seq = st.seq
            # Its bytes leave the pending total now, an in-flight frame's included.
            self._pending -= st.nbytes
            st.live = False
            events = sum(s.nevents for s in st.segments)
            size = sum(s.nbytes for s in st.segments)
            st.segments.clear()
            self._count_drop(st, events, size)
            self._log_drops(st, "forgotten")
        self._remember(self._forgotten, task_id, seq)
        self._lot.unpark_all()

    # -- hub-facing ---------------------------------------------------------------

    def on_rate_limit_warning(self) -> None:
        """The hub warned that the agent nears its limit: halve the rate for a while."""
        self.stats.rate_limit_warnings += 1
        self._halve(trio.current_time())

    def on_rate_limited(self, retry_after_s: float) -> None:
        """The hub dropped a frame for rate: send no progress until then, and slow down."""
        now = trio.current_time()
        self.stats.rate_limited += 1
        self._halve(now)
        self._tokens = 0.0
        self._paused_until = max(self._paused_until, now + max(0.0, retry_after_s))

    def note_lifecycle_frame(self) -> None:
        """A lifecycle frame (accept, result, recovery) used the hub's shared bucket.

        Progress gives way: the token is taken from the progress budget (down to
        -burst, so a run of results pushes progress back further), so progress
        plus lifecycle frames stay within `budget_per_min` plus `burst`.
        """
        self._refill(trio.current_time())
        self._tokens = max(self._tokens - 1.0, -float(self.burst))

    def notify_sink_ready(self) -> None:
        """Optional: the sink became able to send; try at once instead of at the next poll."""
        self._retry_at = -math.inf
        self._wakeup.set()

    # -- introspection ------------------------------------------------------------

    @property
    def pending_bytes(self) -> int:
        """Text bytes held for all tasks, in-flight frames included."""
        return self._pending

    @property
    def rate_factor(self) -> float:
        return self._factor

    def tracked_tasks(self) -> list[str]:
        return list(self._tasks)

    def has_pending(self) -> bool:
        return any(st.segments or st.inflight is not None for st in self._tasks.values())

    def task_pending(self, task_id: str) -> bool:
        st = self._tasks.get(task_id)
        return st is not None and (bool(st.segments) or st.inflight is not None)

    async def wait_task_flushed(self, task_id: str, deadline_s: float) -> bool:
        """Wait (at most `deadline_s`) until `task_id` has no pending progress.

        The outbox calls this before sending a task's result, so the hub sees a
        task's progress before its end whenever the budget allows. The task goes
        to the front of the round robin; if it cannot be served within one
        window (budget spent, hub pause), this returns False at once: a result
        is worth more than its progress, which follows later (or expires).
        """
        with trio.move_on_after(deadline_s):
            while self.task_pending(task_id):
                st = self._tasks[task_id]
                self._tasks.move_to_end(task_id, last=False)
                now = trio.current_time()
                # (A frame already in flight needs no budget: wait for its send.)
                if st.segments and self._next_send_time(now) > now + self.window_s:
                    return False
                await self._lot.park()  # the send loop unparks on every pass
            return True
        return False

    def _next_send_time(self, now: float) -> float:
        """The earliest time the send loop may send a frame, by budget and pauses."""
        self._refill(now)
        return max(now, self._paused_until, self._token_time(now))

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
        add = self._add
        try:
            while True:
                try:
                    ev = await receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
                add(ev)
                for _ in range(_DRAIN_BATCH):
                    try:
                        ev = receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        return
                    add(ev)
                if self._wake_on_data:
                    self._wakeup.set()
        finally:
            self._closed = True
            now = trio.current_time()
            for st in list(self._tasks.values()):
                if st.running:
                    st.running = False
                    st.expire_at = now + self.finish_grace_s
                self._maybe_retire(st)
            self._wakeup.set()

    async def _send_loop(self, sink: ProgressSink) -> None:
        while True:
            now = trio.current_time()
            self._housekeeping(now)
            self._lot.unpark_all()
            if self._closed and not self.has_pending():
                return
            sink_ok = sink.can_send()
            due = self._earliest_due(now)
            if (
                sink_ok
                and due <= now
                and now >= max(self._paused_until, self._retry_at)
                and now >= self._last_window + self.window_s
                and self._has_token()
            ):
                await self._send_window(sink, now)
                continue
            wake = self._next_expiry()
            if due < math.inf:
                if not sink_ok:
                    wake = min(wake, max(due, now + self.sink_poll_s))
                else:
                    wake = min(
                        wake,
                        max(
                            due,
                            self._last_window + self.window_s,
                            self._paused_until,
                            self._retry_at,
                            self._token_time(now),
                        ),
                    )
            # New data can only make something due sooner when nothing is pending.
            self._wake_on_data = due > now
            self._wakeup = trio.Event()
            with trio.move_on_at(wake):
                await self._wakeup.wait()
            self._wake_on_data = False

    async def _send_window(self, sink: ProgressSink, now: float) -> None:
        self._last_window = now
        for task_id in list(self._tasks):
            st = self._tasks.get(task_id)
            if st is None or st.inflight is not None:
                continue
            if not st.segments and not self._keepalive_due(st, now):
                continue
            t = trio.current_time()
            if t < self._paused_until or not sink.can_send() or not self._take_token(t):
                return
            self._tasks.move_to_end(task_id)
            if not await self._send_one(sink, st, now):
                self._retry_at = trio.current_time() + self.sink_poll_s
                return

    async def _send_one(self, sink: ProgressSink, st: _TaskState, now: float) -> bool:
        seg = st.segments.popleft() if st.segments else None
        if seg is not None:
            event: dict[str, Any] = {
                "event_type": seg.event_type,
                "text": seg.text(),
                "tokens_so_far": seg.tokens_so_far,
                "model": seg.model,
                "timestamp": seg.timestamp,
            }
        else:
            event = {
                "event_type": "status",
                "text": f"still running ({int(now - st.started_at)} s)",
                "tokens_so_far": None,
                "model": None,
                "timestamp": now_ms(),
            }
        if seg is not None and seg.extra:
            for key, value in seg.extra.items():
                event.setdefault(key, value)
        st.seq += 1
        event["seq"] = st.seq
        d_events, d_bytes = st.dropped_events, st.dropped_bytes
        if d_events or d_bytes:
            event["dropped_events"] = d_events
            event["dropped_bytes"] = d_bytes
        frame = {"type": "task_progress", "task_id": st.task_id, "execution_event": event}
        st.inflight = seg
        ok = False
        try:
            ok = await sink.send_progress(frame)
        finally:
            st.inflight = None
            self._after_send(st, seg, ok, d_events, d_bytes)
        return ok

    def _after_send(
        self, st: _TaskState, seg: _Segment | None, ok: bool, d_events: int, d_bytes: int
    ) -> None:
        size = seg.nbytes if seg is not None else 0
        if ok:
            self.stats.frames_sent += 1
            self.stats.bytes_sent += size
            if seg is None:
                self.stats.keepalives_sent += 1
            st.last_sent = trio.current_time()
            st.dropped_events -= d_events
            st.dropped_bytes -= d_bytes
            st.nbytes -= size
            if st.live:
                self._pending -= size
                self._maybe_retire(st)
            return
        st.seq -= 1
        self.stats.send_failures += 1
        if seg is None:
            return
        if not st.live:  # forgotten meanwhile: the data is lost
            self.stats.events_dropped += seg.nevents
            self.stats.bytes_dropped += size
            return
        # Put it back in front, merged with a newer segment of the same type.
        if st.segments and _mergeable(st.segments[0], seg):
            seg.absorb(st.segments[0])
            st.segments[0] = seg
            self._count_drop(st, *seg.trim(self.max_text_bytes))
        else:
            st.segments.appendleft(seg)
            if len(st.segments) > self.max_segments:
                old = st.segments.popleft()
                self._count_drop(st, old.nevents, old.nbytes)

    # -- pending data -------------------------------------------------------------

    def _new_state(self, task_id: str, now: float) -> _TaskState:
        seq = self._retired.pop(task_id, None)
        if seq is None:
            seq = self._forgotten.pop(task_id, 0)
        st = _TaskState(task_id, seq, now)
        self._tasks[task_id] = st
        return st

    def _add(self, ev: ProgressEvent) -> None:
        stats = self.stats
        stats.events_in += 1
        size = _nbytes(ev.text)
        st = self._tasks.get(ev.task_id)
        if st is None:
            if ev.task_id in self._forgotten or len(self._tasks) >= self.max_tasks:
                stats.events_dropped += 1
                stats.bytes_dropped += size
                return
            # Events of a task never started, or late after task_finished:
            # send them (seq continues) but let them expire like a finished task.
            now = trio.current_time()
            st = self._new_state(ev.task_id, now)
            st.expire_at = now + self.finish_grace_s
        segs = st.segments
        if segs and segs[-1].event_type == ev.event_type and ev.extra is None and segs[-1].extra is None:
            seg = segs[-1]
            stats.events_coalesced += 1
        else:
            seg = _Segment(ev.event_type)
            seg.extra = ev.extra
            segs.append(seg)
            if len(segs) + (st.inflight is not None) > self.max_segments:
                old = segs.popleft()
                self._count_drop(st, old.nevents, old.nbytes)
        seg.add(ev, size, self._chunk_bytes)
        st.nbytes += size
        self._pending += size
        if seg.nbytes > self.max_text_bytes:
            self._count_drop(st, *seg.trim(self.max_text_bytes))
        if self._pending > stats.peak_pending_bytes:
            stats.peak_pending_bytes = self._pending

    def _count_drop(self, st: _TaskState, events: int, size: int) -> None:
        """Record a loss of pending data (already removed from its segment)."""
        st.dropped_events += events
        st.dropped_bytes += size
        st.total_dropped_events += events
        st.total_dropped_bytes += size
        st.nbytes -= size
        if st.live:
            self._pending -= size
        self.stats.events_dropped += events
        self.stats.bytes_dropped += size

    def _maybe_retire(self, st: _TaskState) -> None:
        if st.live and not st.running and not st.segments and st.inflight is None:
            self._retire(st, "")

    def _retire(self, st: _TaskState, reason: str) -> None:
        self._tasks.pop(st.task_id, None)
        st.live = False
        self._remember(self._retired, st.task_id, st.seq)
        self._log_drops(st, reason or "finished")

    @staticmethod
    def _remember(table: OrderedDict[str, int], task_id: str, seq: int) -> None:
        table[task_id] = seq
        table.move_to_end(task_id)
        while len(table) > _RETIRED_MAX:
            table.popitem(last=False)

    @staticmethod
    def _log_drops(st: _TaskState, reason: str) -> None:
        if st.total_dropped_events or st.total_dropped_bytes:
            log.warning(
                "progress_dropped",
                task_id=st.task_id,
                events=st.total_dropped_events,
                bytes=st.total_dropped_bytes,
                frames=st.seq,
                reason=reason,
            )

    # -- timing -------------------------------------------------------------------

    def _housekeeping(self, now: float) -> None:
        self._refill(now)
        while self._factor < 1.0 and now >= self._penalty_until:
            self._factor = min(1.0, self._factor * 2)
            self._penalty_until += self.penalty_s
        for st in list(self._tasks.values()):
            if not st.running and st.inflight is None and now >= st.expire_at:
                events = sum(s.nevents for s in st.segments)
                size = sum(s.nbytes for s in st.segments)
                st.segments.clear()
                self._count_drop(st, events, size)
                self._retire(st, "expired")

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

    def _keepalive_due(self, st: _TaskState, now: float) -> bool:
        return st.running and now >= st.last_sent + self.keepalive_s

    def _next_expiry(self) -> float:
        return min(
            (st.expire_at for st in self._tasks.values() if not st.running and st.inflight is None),
            default=math.inf,
        )

    def _refill(self, now: float) -> None:
        if self._refilled_at is not None and now > self._refilled_at:
            cap = max(1.0, self.burst * self._factor)
            gained = (now - self._refilled_at) * self._rate * self._factor
            self._tokens = min(cap, self._tokens + gained)
        self._refilled_at = now

    def _has_token(self) -> bool:
        return self._tokens + _EPS >= 1.0

    def _take_token(self, now: float) -> bool:
        self._refill(now)
        if not self._has_token():
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        return True

    def _token_time(self, now: float) -> float:
        if self._has_token():
            return now
        return now + (1.0 - self._tokens) / (self._rate * self._factor)

    def _halve(self, now: float) -> None:
        self._refill(now)
        self._factor = max(_MIN_FACTOR, self._factor / 2)
        self._penalty_until = now + self.penalty_s
        self._tokens = min(self._tokens, max(1.0, self.burst * self._factor))
        log.info("progress_rate_reduced", factor=self._factor, for_s=self.penalty_s)
