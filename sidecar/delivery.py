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

import trio

from .frames import HubError, RateLimited, TaskAck
from .link import HubLink
from .log import get_logger
from .store import OutboxItem, Store
from .storefaults import StoreWriteError

log = get_logger("sidecar.delivery")

_RESULT_ACKS = frozenset({"complete", "failed", "retried", "dead_letter"})
_OWED_MAX = 1024  # accepts still owed to a result that may never come (bounded)
_REFUSALS = ("task_complete_failed", "task_fail_failed")


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

    def _pending_count(self) -> int:
        return len(self.unstored) + self.store.outbox_size

    async def run(self) -> None:
        while True:
            self.depth = self._pending_count()
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
        while self._inflight is not None or self._pending_count():
            self._empty = trio.Event()
            await self._empty.wait()

    async def _deliver(self, item: OutboxItem) -> None:
        self._answered = False
        self._set_inflight(item)
        if self.before_send is not None:
            await self.before_send(item.task_id)
        try:
            while not self._answered:
                await self.link.wait_ready()
                self._resend = False
                self._heard = trio.Event()
                if not await self.link.send(item.frame):
                    await self.link.wait_state_change()
                    continue
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
        else:
            self._resend = True
        self._heard.set()

    def on_frame(self, frame: TaskAck | HubError | RateLimited) -> None:
        item = self._inflight
        if item is None:
            return
        match frame:
            case TaskAck(task_id=tid, status=status) if tid == item.task_id and status in _RESULT_ACKS:
                log.info("result_acked", task_id=item.task_id, generation=item.generation, status=status)
                self.delivered += 1
                self._hear(answered=True)
            case HubError(error=err, message_type=mtype, errors=errors) if err.startswith(_REFUSALS) or (
                err == "validation_failed" and mtype == item.frame.get("type")
            ):
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

    def on_disconnected(self) -> None:
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
        self._wake = trio.Event()

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
        if self._pending.pop(task_id, None) == -math.inf:
            self._owed[task_id] = None
            while len(self._owed) > _OWED_MAX:
                self._owed.popitem(last=False)

    async def before_result(self, task_id: str) -> None:
        """A task's result is about to go: its accept, if still unsent, goes first."""
        owed = task_id in self._owed
        self._owed.pop(task_id, None)
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
            case RateLimited() if self._pending:
                self._wake.set()

    def on_disconnected(self) -> None:
        # After a reconnect the hub has reclaimed our tasks: the recovery
        # exchange (task_recovering / task_continue) decides what to re-accept.
        self._pending.clear()
        self._owed.clear()

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
