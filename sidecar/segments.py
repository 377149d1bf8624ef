"""Pending progress per task: segments, byte caps, drop counts, seq memory.

The batcher's memory, apart from its scheduling (`batcher.py`). Per task,
consecutive events of one `event_type` form one segment (texts concatenated,
the latest `tokens_so_far`/`model`/`timestamp` kept); a segment keeps at most
`max_text_bytes` UTF-8 bytes, the *newest* ones, and a task at most
`max_segments` segments (the oldest is dropped first). Newest, not head+tail:
progress is a live view of what a task is doing now (its full output travels
in the result), and cutting only at the front leaves one hole right after the
previous frame, which the drop counts describe exactly; a hole in the middle
of a frame could not be located by a reader.

In all, at most `max_tasks` tasks (more only while that many run) and
`max_pending_bytes` of text, the frame in flight included. Past either,
finished tasks give way first, the earliest finished first (their results are
on their way), then the oldest text of the task holding the most. Otherwise
sequential tasks ending faster than the budget lets their progress out would
each keep it for the finish grace (issue 11: 900 tasks' worth at 30 a second).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any

import attrs

from .log import get_logger
from .messages import ProgressEvent, now_ms

log = get_logger("sidecar.batcher")

_CHUNK_EVENTS = 256  # small events sealed into one chunk at most this many at a time
# Events that are whole lines without their newline: coalesced, they are joined
# by one, so that a dashboard shows one line each (stdout and tokens run on as printed).
_LINE_EVENTS = frozenset({"status", "error"})
_RETIRED_MAX = 1024  # remembered seq of finished / forgotten tasks (bounded)
MAX_PENDING_BYTES = 4 * 1024 * 1024  # text held for all tasks (UTF-8 bytes)


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
    flushes_before_result: int = 0  # a result waited and its task's progress went first
    progress_after_result: int = 0  # a result went first: the budget or link could not wait
    peak_pending_bytes: int = 0


def nbytes(text: str) -> int:
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


class Segment:
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
        "separated",
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
        self.separated = event_type in _LINE_EVENTS

    def _seal(self) -> None:
        if self.tail:
            self.chunks.append(("".join(self.tail), self.tail_bytes, len(self.tail)))
            self.tail = []
            self.tail_bytes = 0

    def add(self, ev: ProgressEvent, size: int, chunk_bytes: int) -> int:
        """Append one event; the bytes it added (its text, and a line break before it)."""
        text = ev.text
        if self.separated and self.nevents:
            text = "\n" + text
            size += 1
        if size >= chunk_bytes:
            self._seal()
            self.chunks.append((text, size, 1))
        else:
            self.tail.append(text)
            self.tail_bytes += size
            if self.tail_bytes >= chunk_bytes or len(self.tail) >= _CHUNK_EVENTS:
                self._seal()
        self.nbytes += size
        self.nevents += 1
        self._take_meta(ev.timestamp, ev.tokens_so_far, ev.model)
        return size

    def _take_meta(self, timestamp: int, tokens_so_far: int | None, model: str | None) -> None:
        self.timestamp = timestamp
        if tokens_so_far is not None:
            self.tokens_so_far = tokens_so_far
        if model is not None:
            self.model = model

    def absorb(self, newer: Segment) -> int:
        """Append a newer segment of the same type (a failed send put back).

        Returns the bytes this adds beyond the two texts: a line break between
        line events.
        """
        self._seal()
        newer._seal()
        added = 0
        if self.separated and self.nevents and newer.nevents:
            self.chunks.append(("\n", 1, 0))
            added = 1
        self.nbytes += added
        self.chunks.extend(newer.chunks)
        self.nbytes += newer.nbytes
        self.nevents += newer.nevents
        self._take_meta(newer.timestamp, newer.tokens_so_far, newer.model)
        return added

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


def _mergeable(a: Segment, b: Segment) -> bool:
    return a.event_type == b.event_type and a.extra is None and b.extra is None


class TaskState:
    __slots__ = (
        "dropped_bytes",
        "dropped_events",
        "expire_at",
        "flushing",
        "inflight",
        "last_sent",
        "live",
        "nbytes",
        "queued",
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
        self.segments: deque[Segment] = deque()
        self.inflight: Segment | None = None
        self.seq = seq
        self.nbytes = 0  # pending text bytes, in-flight segment included
        self.dropped_events = 0  # since the last frame sent
        self.dropped_bytes = 0
        self.total_dropped_events = 0
        self.total_dropped_bytes = 0
        self.running = False  # kept alive while silent: running, or queued for a slot
        self.queued = False
        self.flushing = False  # its result waits for this progress: send it all now
        self.started_at = now
        self.last_sent = now
        self.expire_at = math.inf
        self.live = True  # False once forgotten (an in-flight send may still finish)


class PendingProgress:
    """Every tracked task's pending segments, least recently served first, within caps."""

    def __init__(
        self,
        stats: BatcherStats,
        max_text_bytes: int,
        max_segments: int,
        max_tasks: int,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        if max_pending_bytes < max_text_bytes or max_tasks < 1:
            raise ValueError("max_pending_bytes >= max_text_bytes and max_tasks >= 1 are required")
        self.stats = stats
        self.max_text_bytes = max_text_bytes
        self.max_segments = max_segments
        self.max_tasks = max_tasks
        self.max_pending_bytes = max_pending_bytes
        self.chunk_bytes = max(1, min(1024, max_text_bytes // 16))
        self.tasks: OrderedDict[str, TaskState] = OrderedDict()
        self.retired: OrderedDict[str, int] = OrderedDict()  # finished task -> last seq
        self.forgotten: OrderedDict[str, int] = OrderedDict()  # forgotten task -> last seq
        self.nbytes = 0  # text held for all tasks, in-flight frames included

    def new_state(self, task_id: str, now: float) -> TaskState:
        """Track a task (a started one always: the supervisor bounds those)."""
        self.room_for_task()
        seq = self.retired.pop(task_id, None)
        if seq is None:
            seq = self.forgotten.pop(task_id, 0)
        st = TaskState(task_id, seq, now)
        self.tasks[task_id] = st
        return st

    def add(self, ev: ProgressEvent, now: float, grace_s: float) -> None:
        stats = self.stats
        stats.events_in += 1
        size = nbytes(ev.text)
        st = self.tasks.get(ev.task_id)
        if st is None:
            if ev.task_id in self.forgotten or not self.room_for_task():
                stats.events_dropped += 1
                stats.bytes_dropped += size
                return
            # Events of a task never started, or late after task_finished:
            # send them (seq continues) but let them expire like a finished task.
            st = self.new_state(ev.task_id, now)
            st.expire_at = now + grace_s
        segs = st.segments
        if segs and segs[-1].event_type == ev.event_type and ev.extra is None and segs[-1].extra is None:
            seg = segs[-1]
            stats.events_coalesced += 1
        else:
            seg = Segment(ev.event_type)
            seg.extra = ev.extra
            segs.append(seg)
            if len(segs) + (st.inflight is not None) > self.max_segments:
                old = segs.popleft()
                self.count_drop(st, old.nevents, old.nbytes)
        size = seg.add(ev, size, self.chunk_bytes)
        st.nbytes += size
        self.nbytes += size
        if seg.nbytes > self.max_text_bytes:
            self.count_drop(st, *seg.trim(self.max_text_bytes))
        if self.nbytes > self.max_pending_bytes:
            self.shed()
        if self.nbytes > stats.peak_pending_bytes:
            stats.peak_pending_bytes = self.nbytes

    def room_for_task(self) -> bool:
        """Room for one more tracked task, evicting finished ones; False if all run."""
        while len(self.tasks) >= self.max_tasks:
            if not self.evict_finished():
                return False
        return True

    def evict_finished(self) -> bool:
        """Drop the data of the earliest finished task (none in flight) and retire it."""
        done = (st for st in self.tasks.values() if not st.running and st.inflight is None)
        oldest = min(done, key=lambda st: st.expire_at, default=None)
        if oldest is not None:
            self.drop_all(oldest)
            self.retire(oldest, "evicted")
        return oldest is not None

    def shed(self) -> None:
        """Back within `max_pending_bytes`: finished tasks first, then the oldest
        text of the task holding the most (announced in its next frame)."""

        def held(st: TaskState) -> int:
            return st.nbytes - (st.inflight.nbytes if st.inflight is not None else 0)

        while self.nbytes > self.max_pending_bytes and not self.evict_finished():
            largest = max((st for st in self.tasks.values() if held(st) > 0), key=held, default=None)
            if largest is None:
                return
            excess = self.nbytes - self.max_pending_bytes
            seg = largest.segments[0]
            if seg.nbytes <= excess and len(largest.segments) > 1:
                largest.segments.popleft()
                self.count_drop(largest, seg.nevents, seg.nbytes)
            else:  # a task's last segment stays (maybe empty): its frame announces the loss
                self.count_drop(largest, *seg.trim(max(0, seg.nbytes - excess)))

    def put_back(self, st: TaskState, seg: Segment) -> None:
        """A segment whose send failed goes back in front (merged with a newer one of its type)."""
        if not st.live:  # forgotten meanwhile: the data is lost
            self.stats.events_dropped += seg.nevents
            self.stats.bytes_dropped += seg.nbytes
            return
        if st.segments and _mergeable(st.segments[0], seg):
            added = seg.absorb(st.segments[0])
            st.nbytes += added
            self.nbytes += added
            st.segments[0] = seg
            self.count_drop(st, *seg.trim(self.max_text_bytes))
        else:
            st.segments.appendleft(seg)
            if len(st.segments) > self.max_segments:
                old = st.segments.popleft()
                self.count_drop(st, old.nevents, old.nbytes)

    def sent(self, st: TaskState, size: int) -> None:
        """A frame of `size` text bytes of `st` reached the socket."""
        st.nbytes -= size
        if st.live:
            self.nbytes -= size
            self.maybe_retire(st)

    def count_drop(self, st: TaskState, events: int, size: int) -> None:
        """Record a loss of pending data (already removed from its segment)."""
        st.dropped_events += events
        st.dropped_bytes += size
        st.total_dropped_events += events
        st.total_dropped_bytes += size
        st.nbytes -= size
        if st.live:
            self.nbytes -= size
        self.stats.events_dropped += events
        self.stats.bytes_dropped += size

    def drop_all(self, st: TaskState) -> None:
        events = sum(s.nevents for s in st.segments)
        size = sum(s.nbytes for s in st.segments)
        st.segments.clear()
        self.count_drop(st, events, size)

    def forget(self, task_id: str) -> None:
        """Drop a task's state and pending data now; its late events are ignored."""
        st = self.tasks.pop(task_id, None)
        seq = self.retired.pop(task_id, 0)
        if st is not None:
            seq = st.seq
            # Its bytes leave the pending total now, an in-flight frame's included.
            self.nbytes -= st.nbytes
            st.live = False
            self.drop_all(st)
            _log_drops(st, "forgotten")
        _remember(self.forgotten, task_id, seq)

    def maybe_retire(self, st: TaskState) -> None:
        if st.live and not st.running and not st.segments and st.inflight is None:
            self.retire(st, "finished")

    def retire(self, st: TaskState, reason: str) -> None:
        self.tasks.pop(st.task_id, None)
        st.live = False
        _remember(self.retired, st.task_id, st.seq)
        _log_drops(st, reason)

    def expire(self, now: float) -> None:
        """Finished tasks whose data could not go out within their grace are dropped."""
        for st in list(self.tasks.values()):
            if not st.running and st.inflight is None and now >= st.expire_at:
                self.drop_all(st)
                self.retire(st, "expired")

    def next_expiry(self) -> float:
        return min(
            (st.expire_at for st in self.tasks.values() if not st.running and st.inflight is None),
            default=math.inf,
        )


def next_frame(st: TaskState, seg: Segment | None, now: float) -> dict[str, Any]:
    """The `task_progress` frame for `seg` (None: a keep-alive); raises the task's seq by one."""
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
            "text": f"{'queued' if st.queued else 'still running'} ({int(now - st.started_at)} s)",
            "tokens_so_far": None,
            "model": None,
            "timestamp": now_ms(),
        }
    if seg is not None and seg.extra:
        for key, value in seg.extra.items():
            event.setdefault(key, value)
    st.seq += 1
    event["seq"] = st.seq
    if st.dropped_events or st.dropped_bytes:
        event["dropped_events"] = st.dropped_events
        event["dropped_bytes"] = st.dropped_bytes
    return {"type": "task_progress", "task_id": st.task_id, "execution_event": event}


def _remember(table: OrderedDict[str, int], task_id: str, seq: int) -> None:
    table[task_id] = seq
    table.move_to_end(task_id)
    while len(table) > _RETIRED_MAX:
        table.popitem(last=False)


def _log_drops(st: TaskState, reason: str) -> None:
    if st.total_dropped_events or st.total_dropped_bytes:
        log.warning(
            "progress_dropped",
            task_id=st.task_id,
            events=st.total_dropped_events,
            bytes=st.total_dropped_bytes,
            frames=st.seq,
            reason=reason,
        )
