"""Getting lifecycle frames to the hub: the result outbox and the accept tracker.

Results: read from the store's outbox, sent one at a time (the hub's `error`
frames carry no task_id, so only one unacknowledged result may be in flight),
resent after reconnects, `rate_limited` and silence, until the hub answers
`task_ack` or refuses the frame (`task_complete_failed: …`), which retires it.
A result the store cannot write (full disk) is kept in memory and sent the same
way, ahead of stored ones; only a crash before its ack loses it (the task row,
not marked done, is then recovered as in flight).

Accepts: `task_accepted` for a stored task, resent after `rate_limited` until
the hub answers `task_ack` `accepted`.

Both wait for the rate budget (`link.wait_ready`: a token in the modelled
bucket, no hub pause) before each send, so a burst of them is paced instead
of refused.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from .frames import HubError, RateLimited, TaskAck
from .link import HubLink
from .log import get_logger
from .store import OutboxItem, Store
from .storefaults import StoreWriteError

log = get_logger("sidecar.delivery")

_RESULT_ACKS = frozenset({"complete", "failed", "retried", "dead_letter"})
_OWED_MAX = 1024  # accepts still owed to a result that may never come (bounded)
# How long a result waits for its task's accept to be answered (see `before_result`).
ACCEPT_ANSWER_WAIT_S = 2.0
_REFUSALS = ("task_complete_failed", "task_fail_failed")
_RESULT_TYPES = ("task_complete", "task_failed")


class Outbox:
    """Sends stored results one at a time until each is acknowledged."""

    def __init__(
        self,
        store: Store,
        link: HubLink,
        *,
        answer_timeout_s: float = 30.0,
        before_send: Callable[[str], Awaitable[object]] | None = None,
    ) -> None:
        self.store = store
        self.link = link
        # Called with the task_id before a result's first send (progress flush).
        self.before_send = before_send
        self.answer_timeout_s = answer_timeout_s
        self.depth = 0
        self.delivered = 0
        self.refused = 0
        self._changed = trio.Event()
        self._inflight: OutboxItem | None = None
        self._inflight_changed = trio.Event()
        # The result in flight was answered / may have been dropped; `_heard` wakes the sender.
        self._answered = False
        self._resend = False
        self._heard = trio.Event()
        # Copies of the result in flight sent on this connection, and answers still
        # owed to copies of results already answered (see `_answers_a_copy`).
        self._copies = 0
        self._stray_answers = 0
        self._empty = trio.Event()
        # Results the store could not write, sent from memory (ids below zero).
        self.unstored: list[OutboxItem] = []
        self._next_unstored_id = -1

    @property
    def inflight(self) -> OutboxItem | None:
        """The result being delivered now (sent or about to be), or None."""
        return self._inflight

    @property
    def inflight_answered(self) -> bool:
        """The hub has answered the result in flight (acked or refused it)."""
        return self._inflight is not None and self._answered

    async def wait_inflight(self, task_id: str) -> OutboxItem:
        """Until a result of `task_id` is the one in flight; that item."""
        while (item := self._inflight) is None or item.task_id != task_id:
            await self._inflight_changed.wait()
        return item

    def _set_inflight(self, item: OutboxItem | None) -> None:
        self._inflight = item
        self._inflight_changed.set()
        self._inflight_changed = trio.Event()

    def notify(self) -> None:
        """A result was written to the store."""
        self._changed.set()

    async def put(self, task_id: str, frame: dict[str, Any] | None) -> bool:
        """Mark the task done and queue its result (if any) for delivery; True if stored.

        When the disk refuses the write, the result goes from memory instead,
        and the log says so. Bounded: an end stuck behind the store's lock for
        10 s is treated the same way.
        """
        error: str | None = None
        with trio.move_on_after(10) as scope:
            try:
                await self.store.finish(task_id, frame)
            except StoreWriteError as exc:
                error = str(exc)
        if scope.cancelled_caught:
            error = "the state store did not answer within 10 s"
        if error is None:
            self.notify()
            return True
        if frame is None:
            await self.store.mark_done(task_id)  # owed: applied once the disk takes it
            log.warning("task_end_not_stored", task_id=task_id, error=error)
            return False
        generation = int(frame.get("generation", 0))
        item = OutboxItem(self._next_unstored_id, task_id, generation, frame)
        self._next_unstored_id -= 1
        self.unstored.append(item)
        log.warning(
            "result_not_stored",
            task_id=task_id,
            generation=generation,
            type=frame.get("type"),
            error=error,
            action="sending it directly from memory (lost if the sidecar dies before the hub acks it)",
        )
        self.notify()
        return False

    def pending_count(self) -> int:
        """Results stored or held in memory and not yet answered by the hub."""
        return len(self.unstored) + self.store.outbox_size

    async def run(self) -> None:
        while True:
            self.depth = self.pending_count()
            if not self.depth:
                self._changed = trio.Event()
                await self._changed.wait()
                continue
            # The store's outbox is in memory: this reads the database only for
            # a result whose frame it did not keep (a backlog from before a restart).
            head = self.unstored[:1] or await self.store.outbox(limit=1)
            if head:
                await self._deliver(head[0])

    async def wait_empty(self) -> None:
        """Wait until every result (stored or in memory) has been answered by the hub."""
        while self._inflight is not None or self.pending_count():
            self._empty = trio.Event()
            await self._empty.wait()

    async def _deliver(self, item: OutboxItem) -> None:
        self._answered = False
        self._set_inflight(item)
        if self.before_send is not None:
            await self.before_send(item.task_id)
        try:
            while not self._answered:
                item = self._inflight or item  # its generation may change (`adopt_generation`)
                await self.link.wait_ready()
                self._resend = False
                self._heard = trio.Event()
                if not await self.link.send(item.frame):
                    await self.link.wait_state_change()
                    continue
                self._copies += 1
                log.debug(  # the ack (result_acked) is the line that matters
                    "result_sent",
                    task_id=item.task_id,
                    generation=item.generation,
                    type=item.frame.get("type"),
                )
                with trio.move_on_after(self.answer_timeout_s):
                    await self._heard.wait()
                if not self._answered and not self._resend:
                    log.info("result_unanswered_resend", task_id=item.task_id)
            if item.id < 0:
                if item in self.unstored:  # not if dropped (`drop`)
                    self.unstored.remove(item)
                await self.store.mark_done(item.task_id, item.generation)
            else:
                self.store.retire(item.id)
        finally:
            self._set_inflight(None)
            self._empty.set()  # wakes wait_empty to re-check

    def _hear(self, *, answered: bool) -> None:
        if answered:
            self._answered = True
            # The hub answers every copy it got, in order: those of this result
            # still unanswered will be answered after this, not the next result.
            self._stray_answers += max(self._copies - 1, 0)
            self._copies = 0
        else:
            self._resend = True
        self._heard.set()

    def _answers_a_copy(self, frame: TaskAck | HubError | RateLimited) -> bool:
        """Whether `frame` is the answer to a copy of a result already answered.

        A result is sent again when the hub may have dropped it (`rate_limited`,
        no answer in time), so two copies of it can be in flight. The hub acks
        one and refuses the other, and its refusal (an `error`, which names no
        task) must not be taken for the answer to the next result: that result
        would be retired unsent. Answers come in the order of the frames, so
        the first answers after a result's ack that name no task are its
        copies'. Counted generously (a `rate_limited` for a progress frame
        counts too): an answer taken for a copy's only delays the next result's
        resend by `answer_timeout_s`, where one taken for the next result's
        could lose it.
        """
        if not self._stray_answers:
            return False
        item = self._inflight
        if isinstance(frame, TaskAck) and item is not None and frame.task_id == item.task_id:
            return False  # names the result in flight: its own answer
        self._stray_answers -= 1
        log.info("copy_answer_skipped", answer=type(frame).__name__, still_owed=self._stray_answers)
        return True

    def on_frame(self, frame: TaskAck | HubError | RateLimited) -> None:
        if isinstance(frame, RateLimited) and frame.tier not in (None, "normal"):
            return  # a ping, an identify or a listing was dropped, never a result
        if isinstance(frame, TaskAck) and frame.status not in _RESULT_ACKS:
            return
        if isinstance(frame, HubError) and not self._is_refusal(frame):
            return
        if self._answers_a_copy(frame):
            return
        item = self._inflight
        if item is None:
            return
        match frame:
            case TaskAck(task_id=tid, status=status) if tid == item.task_id:
                log.info("result_acked", task_id=item.task_id, generation=item.generation, status=status)
                self.delivered += 1
                self._hear(answered=True)
            case HubError(error=err, errors=errors):
                log.warning(
                    "result_refused",
                    task_id=item.task_id,
                    generation=item.generation,
                    error=err[:300],
                    errors=errors,
                    action="retired",
                )
                self.refused += 1
                self._hear(answered=True)
            case RateLimited():
                # The hub may have dropped our result: send it again after the pause.
                self._hear(answered=False)

    @staticmethod
    def _is_refusal(frame: HubError) -> bool:
        """An `error` that refuses a result (only results are sent while one is in flight)."""
        if frame.error.startswith(_REFUSALS):
            return True
        return frame.error == "validation_failed" and frame.message_type in _RESULT_TYPES

    async def adopt_generation(self, task_id: str, generation: int) -> bool:
        """A late `task_continue` for an ended task: its unanswered results now carry
        `generation` (a hub that checks generations would refuse the old one as
        stale); one in flight goes again at once. Whether it had any."""
        stored = await self.store.adopt_generation(task_id, generation)

        def adopted(item: OutboxItem) -> OutboxItem:
            if item.task_id != task_id or item.generation >= generation:
                return item
            return attrs.evolve(item, generation=generation, frame={**item.frame, "generation": generation})

        in_memory = any(adopted(item) is not item for item in self.unstored)
        self.unstored = [adopted(item) for item in self.unstored]
        item = self._inflight
        in_flight = item is not None and not self._answered and adopted(item) is not item
        if item is not None and in_flight:
            self._inflight = adopted(item)
            # The copies under the old generation get their own answers (stale refusals).
            self._stray_answers += self._copies
            self._copies = 0
            self._hear(answered=False)
        return bool(stored) or in_memory or in_flight

    def drop(self, task_id: str) -> None:
        """The hub took the task back (`task_reassign`): stop delivering its result.

        The store has forgotten its rows (`Store.drop_results`); a result of it
        in flight is retired as answered, and one sent from memory is dropped.
        """
        self.unstored = [item for item in self.unstored if item.task_id != task_id]
        item = self._inflight
        if item is not None and item.task_id == task_id and not self._answered:
            log.info("result_dropped", task_id=task_id, generation=item.generation, reason="task_reassign")
            self._hear(answered=True)

    def on_disconnected(self) -> None:
        # Copies sent on the old connection are answered there or never.
        self._copies = 0
        self._stray_answers = 0
        self._hear(answered=False)


class AcceptTracker:
    """Sends `task_accepted` and resends it until the hub acknowledges it."""

    def __init__(self, link: HubLink, *, resend_after_s: float = 30.0) -> None:
        self.link = link
        self.resend_after_s = resend_after_s
        # task_id -> trio time last sent (-inf: not sent yet, send when ready)
        self._pending: dict[str, float] = {}
        # Tasks that ended before their accept could go: it goes before their result.
        self._owed: OrderedDict[str, None] = OrderedDict()
        # Tasks that ended with their accept sent and not yet answered: when it went.
        self._ended: OrderedDict[str, float] = OrderedDict()
        self._wake = trio.Event()
        self._answer = trio.Event()  # set (and replaced) at each ack of an accept or rate_limited

    async def accept(self, task_id: str) -> None:
        """Send task_accepted now if the budget allows (the task is already stored) and track its ack."""
        now = trio.current_time()
        self._pending[task_id] = now
        if self.link.budget.lifecycle_at(now) > now or not await self.link.send(
            {"type": "task_accepted", "task_id": task_id}
        ):
            if task_id in self._pending:
                self._pending[task_id] = -math.inf  # the run loop sends it when ready
            self._wake.set()

    def forget(self, task_id: str) -> None:
        """The task has ended: an accept not sent, or sent and maybe dropped since, goes before its result."""
        sent_at = self._pending.pop(task_id, None)
        if sent_at is None:
            return
        if sent_at == -math.inf or self._was_limited(sent_at):
            self._owed[task_id] = None
            while len(self._owed) > _OWED_MAX:
                self._owed.popitem(last=False)
        else:
            self._ended[task_id] = sent_at
            while len(self._ended) > _OWED_MAX:
                self._ended.popitem(last=False)

    async def before_result(self, task_id: str) -> None:
        """A task's result is about to go: its accept, if unsent or dropped, goes first.

        An accept sent but not yet answered (a task that ended within a round
        trip of it) is waited for, at most `ACCEPT_ANSWER_WAIT_S`: if the hub
        drops it (`rate_limited`), it goes again before the result, so the hub
        never gets a result for a task it did not hear accepted.
        """
        owed = task_id in self._owed
        self._owed.pop(task_id, None)
        sent_at = self._ended.get(task_id)
        if sent_at is not None and not owed:
            with trio.move_on_after(ACCEPT_ANSWER_WAIT_S):
                while task_id in self._ended and not self._was_limited(sent_at):
                    await self._answer.wait()
            owed = task_id in self._ended and self._was_limited(sent_at)
        self._ended.pop(task_id, None)
        if owed or self._pending.get(task_id) == -math.inf:
            await self.link.wait_ready()
            if await self.link.send({"type": "task_accepted", "task_id": task_id}):
                log.info("accept_sent", task_id=task_id, before="result")
                if task_id in self._pending:
                    self._pending[task_id] = trio.current_time()

    def on_frame(self, frame: TaskAck | RateLimited) -> None:
        match frame:
            case TaskAck(task_id=tid, status="accepted"):
                self._pending.pop(tid, None)
                self._ended.pop(tid, None)
                self._answered()
            case RateLimited():
                if self._pending:
                    self._wake.set()
                self._answered()

    def _answered(self) -> None:
        self._answer.set()
        self._answer = trio.Event()

    def on_disconnected(self) -> None:
        # After a reconnect the hub has reclaimed our tasks: the recovery
        # exchange (task_recovering / task_continue) decides what to re-accept.
        self._pending.clear()
        self._owed.clear()
        self._ended.clear()
        self._answered()

    async def run(self) -> None:
        while True:
            with trio.move_on_after(self.resend_after_s / 3):
                await self._wake.wait()
            self._wake = trio.Event()
            if not self._pending:
                continue
            for task_id, sent_at in list(self._pending.items()):
                if self._pending.get(task_id) != sent_at:
                    continue  # acked or resent meanwhile
                if trio.current_time() - sent_at >= self.resend_after_s or self._was_limited(sent_at):
                    await self.link.wait_ready()
                    if task_id not in self._pending:
                        continue
                    self._pending[task_id] = trio.current_time()
                    log.info("accept_resent" if sent_at > -math.inf else "accept_sent", task_id=task_id)
                    if not await self.link.send({"type": "task_accepted", "task_id": task_id}):
                        self._pending[task_id] = -math.inf
                        self._wake.set()

    def _was_limited(self, sent_at: float) -> bool:
        """The hub refused a normal-tier frame after this accept went: it may have been it."""
        return self.link.budget.limited_at >= sent_at
