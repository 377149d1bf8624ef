"""The supervisor: owns the tasks this sidecar holds, from accept to result.

Each task runs in the supervisor's nursery inside its own cancel scope. The
scope's deadline is the task's time limit (set when it starts running); a hub
`task_cancelled`, a `task_reassign` or a shutdown cancels it with a reason.
Whatever happens, the task's end is written to the store (its result into the
outbox) in a shielded scope before the task's slot is freed.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from . import procs
from .config import Config
from .decisions import (
    HUB_CANCEL,
    REASSIGN,
    SHUTDOWN,
    TIMED_OUT,
    AssignAction,
    HeldView,
    decide_assign,
    decide_end,
)
from .delivery import AcceptTracker, Outbox
from .dispatcher import DispatchResult
from .executors import ExecContext
from .executors.registry import discard_task_files
from .frames import BadTaskAssign
from .log import bind_context, get_logger
from .messages import (
    LIMITS,
    FrameError,
    ProgressEvent,
    Task,
    failed_frame,
    parse_task,
    truncate,
)
from .progress import ProgressSender
from .quicklock import QuickSemaphore
from .store import RUNNING, Store, StoredTask
from .storefaults import StoreWriteError
from .taskrun import TaskRun, run_and_sweep
from .timelimits import task_time_limit_ms

log = get_logger("sidecar.supervisor")

DispatchFn = Callable[[TaskRun], Awaitable[DispatchResult]]


class BatcherHooks(Protocol):
    """What the supervisor needs of the batcher (kept small for tests)."""

    def task_queued(self, task_id: str) -> None: ...
    def task_started(self, task_id: str) -> None: ...
    def task_finished(self, task_id: str) -> None: ...
    def forget(self, task_id: str) -> None: ...


# How long after a task's end its marker is swept once more (`_late_sweeper`).
LATE_SWEEP_S = 0.2
# A `task_recovering` the hub has not answered is sent again after this long
# (and after a `rate_limited`, which may have been its drop).
RECOVERY_RESEND_S = 30.0


def _set(event: trio.Event) -> trio.Event:
    event.set()
    return event


@attrs.define(eq=False)
class Held:
    task: Task
    generation: int
    marker: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    cancel_reason: str | None = None
    started: bool = False
    # Stored as running: it had a free slot when admitted (no mark_running needed),
    # or, recovered at start, it had started before the process ended.
    stored_running: bool = False
    # A task found in the store at start-up waits for the hub's task_continue.
    awaiting_recovery: bool = False
    recover_answered: trio.Event = attrs.field(factory=trio.Event)
    done: trio.Event = attrs.field(factory=trio.Event)
    # A fresh task's run waits until its task_accepted is on the wire (or put off):
    # the hub hears of it before the run's set-up and spawn, not after.
    accept_sent: trio.Event = attrs.field(factory=lambda: _set(trio.Event()))

    def ending(self) -> str | None:
        """Why this run is being torn down (cancel reason, or its time limit); None if it is not."""
        if self.cancel_reason is not None:
            return self.cancel_reason
        if self.scope.cancel_called or trio.current_time() >= self.scope.deadline:
            return TIMED_OUT
        return None


class Supervisor:
    def __init__(
        self,
        *,
        config: Config,
        store: Store,
        context: ExecContext,
        dispatch: DispatchFn,
        progress: trio.MemorySendChannel[ProgressEvent],
        batcher: BatcherHooks,
        outbox: Outbox,
        accepts: AcceptTracker,
        send: Callable[[dict[str, Any]], Awaitable[bool]],
    ) -> None:
        self.config = config
        self.context = context
        self.store = store
        self.dispatch = dispatch
        self.progress = progress
        self.batcher = batcher
        self.outbox = outbox
        self.accepts = accepts
        self.send = send
        self.held: dict[str, Held] = {}
        self.closing = False
        self.outcomes: dict[str, int] = {}
        self._slots = QuickSemaphore(config.capacity)
        self._nursery: trio.Nursery | None = None
        self._idle = trio.Event()
        self._idle.set()
        # Markers of ended tasks, swept once more a little later (`_late_sweeper`).
        self._late_send, self._late_recv = trio.open_memory_channel[tuple[float, str, str]](math.inf)
        # Tasks whose task_recovering the hub has not answered on this session: when it went.
        self._recovering: dict[str, float] = {}
        self._recovery_wake = trio.Event()

    def busy(self) -> bool:
        return bool(self.held)

    # -- lifecycle -----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the task nursery; recovers what the store held when we last died."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._late_sweeper)
            nursery.start_soon(self._recovery_resender)
            for stored in await self.store.in_flight():
                # Leftovers of a process that died went to init, not to us: look everywhere.
                killed = procs.kill_marked(stored.marker, everywhere=True)
                try:
                    task = parse_task(stored.frame)
                except FrameError:
                    await self.outbox.put(stored.task_id, None)
                    continue
                log.info(
                    "recovered_from_store",
                    task_id=stored.task_id,
                    generation=stored.generation,
                    state=stored.state,
                    killed_processes=killed,
                )
                held = Held(
                    task,
                    stored.generation,
                    stored.marker,
                    stored_running=stored.state == RUNNING,  # its last_status: it had started
                    awaiting_recovery=True,
                )
                self._hold(held)
            task_status.started()
            await trio.sleep_forever()

    def _hold(self, held: Held) -> bool:
        """Hold the task and start its run; False once the task nursery has closed."""
        assert self._nursery is not None
        try:
            self._nursery.start_soon(self._task_main, held)
        except RuntimeError:  # "Nursery is closed to new arrivals": the daemon is stopping
            return False
        self.held[held.task.task_id] = held
        self._idle = trio.Event()
        return True

    def stop_taking_work(self) -> None:
        """From now on an assignment is refused (`sidecar_busy`); held tasks run on."""
        self.closing = True

    async def wait_idle(self) -> None:
        """Return once no task is held."""
        await self._idle.wait()

    async def shutdown(self) -> None:
        """Stop taking work and cancel everything held; wait until all are ended."""
        self.closing = True
        for held in list(self.held.values()):
            self._cancel(held, SHUTDOWN)
        await self._idle.wait()

    # -- inbound -------------------------------------------------------------

    async def on_task_assign(self, task: Task) -> None:
        tid, gen = task.task_id, task.generation
        held = self.held.get(tid)
        view = None if held is None else HeldView(held.generation, held.ending())
        limit = self.config.capacity + self.config.queue_length

        def decide(stored: StoredTask | None) -> AssignAction:
            return decide_assign(
                view, stored, gen, closing=self.closing, held_count=len(self.held), limit=limit
            )

        action = decide(None)
        if held is not None:
            await self._on_assign_held(action, held, task)
            return
        if action is not AssignAction.ACCEPT:
            # A refusal: unless this is a duplicate of a task finished here (the
            # store knows). The accept path asks the store in its one write (`admit`).
            action = decide(await self.store.get_task(tid))
        if action is AssignAction.IGNORE_FINISHED:
            log.info("duplicate_assign_finished", task_id=tid, generation=gen, action="ignored")
        elif action is AssignAction.REFUSE_CLOSING:
            await self._fail_unheld(tid, gen, "sidecar is shutting down", "sidecar_busy")
        elif action is AssignAction.REFUSE_BUSY:
            log.info("task_refused_busy", task_id=tid, generation=gen, held=len(self.held), limit=limit)
            error = f"sidecar busy: {len(self.held)} tasks held, limit {limit}"
            await self._fail_unheld(tid, gen, error, "sidecar_busy")
        else:
            await self._accept_new(task)

    async def on_bad_task_assign(self, bad: BadTaskAssign) -> None:
        """A task_assign we cannot run as sent: fail its task at once (unless a run of it is held)."""
        log.warning("bad_task_assign", field=bad.path, problem=bad.problem, task_id=bad.task_id)
        if bad.task_id not in self.held:
            error = f"invalid task_assign: field '{bad.path}' {bad.problem}"
            await self._fail_unheld(bad.task_id, bad.generation, error, "invalid_task")

    async def _on_assign_held(self, action: AssignAction, held: Held, task: Task) -> None:
        tid, gen = task.task_id, task.generation
        if action is AssignAction.AFTER_TEARDOWN:
            log.info("assign_after_teardown", task_id=tid, generation=gen, ending=held.ending())
            assert self._nursery is not None
            self._nursery.start_soon(self._assign_when_done, held, task)
        elif action is AssignAction.REACCEPT:
            log.info("duplicate_assign", task_id=tid, generation=gen, action="re-acknowledged")
            await self.accepts.accept(tid)
        elif action is AssignAction.ADOPT_GENERATION:
            log.info("assign_new_generation", task_id=tid, old=held.generation, generation=gen)
            self._recovering.pop(tid, None)
            held.generation = gen
            self._log_stale_dropped(tid, gen, await self.store.set_generation(tid, gen))
            # The hub gave it to us again: that answers a pending recovery too.
            self._recovery_answered(held)
            await self.accepts.accept(tid)
        else:
            log.warning("stale_assign_ignored", task_id=tid, generation=gen, held=held.generation)

    async def _accept_new(self, task: Task) -> None:
        tid, gen = task.task_id, task.generation
        marker = procs.task_marker(self.config.agent_id, tid)
        # No checkpoint from here until the task is held: the frame handler runs in
        # the link's session scope, and a task stored but not held would be stranded.
        # A free slot now is still free when the task reaches it: the slots are
        # only taken by held tasks, and every held task is counted here.
        running = len(self.held) < self.config.capacity
        try:
            dropped = await self.store.admit(tid, gen, task.raw, marker, running=running)
        except StoreWriteError as exc:
            # Not stored, so not accepted: a task we could lose must not be taken.
            log.warning("task_refused_store", task_id=tid, generation=gen, error=str(exc))
            reason = "state_disk_full" if exc.full else "state_store_error"
            await self._fail_unheld(tid, gen, f"sidecar cannot take tasks: {exc}", reason)
            return
        if dropped is None:
            log.info("duplicate_assign_finished", task_id=tid, generation=gen, action="ignored")
            return
        # The daemon may have begun to stop while the row was written (a SIGTERM, the
        # task nursery closed). The task is then neither accepted nor run; it stays in
        # the store as in flight, and the next start reports it (task_recovering).
        held = Held(task, gen, marker, stored_running=running, accept_sent=trio.Event())
        if self.closing or not self._hold(held):
            log.info(
                "task_stored_while_stopping", task_id=tid, generation=gen, action="recovered at next start"
            )
            return
        self._log_stale_dropped(tid, gen, dropped)
        queued = len(self.held) > self.config.capacity
        log.info("task_accepted", task_id=tid, generation=gen, queued=queued)
        try:
            await self.accepts.accept(tid)
        finally:
            held.accept_sent.set()

    async def _late_sweeper(self) -> None:
        """Sweep each ended task's marker once more, `LATE_SWEEP_S` after its end.

        A process caught in the middle of an exec by the end-of-task scan (its
        environment briefly unreadable; `setsid sleep 30 &` from a task that
        ends at once) escapes that scan. One task sweeps for all ended tasks;
        no result waits for it. Tasks that ended within half that delay of each
        other share one scan (a burst of short tasks costs one, not one each).
        """
        carry: tuple[float, str, str] | None = None
        while True:
            if carry is None:
                try:
                    carry = await self._late_recv.receive()
                except trio.EndOfChannel:
                    return
            batch, carry = [carry], None
            await trio.sleep_until(batch[0][0])
            horizon = trio.current_time() + LATE_SWEEP_S / 2
            while carry is None:
                try:
                    item = self._late_recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if item[0] <= horizon:
                    batch.append(item)
                else:
                    carry = item  # due later: the next round starts with it
            # A task held again meanwhile (a new run) owns its marker now.
            due = {task_id: marker for _, task_id, marker in batch if task_id not in self.held}
            killed = procs.kill_marked_any(due.values()) if due else 0
            if killed:
                log.warning("late_leftovers_killed", task_ids=sorted(due), killed=killed)
            self.kill_strays_if_idle()

    def kill_strays_if_idle(self) -> None:
        """With no task held, whatever still runs below us is a task's leftover that
        shed its marker (`procs.kill_strays`): killed."""
        if not self.held:
            strays = procs.kill_strays()
            if strays:
                log.warning("unmarked_leftovers_killed", killed=strays, why="no task runs; below the sidecar")

    @staticmethod
    def _log_stale_dropped(task_id: str, generation: int, dropped: int) -> None:
        # Results of older runs of a task given out again would only be refused as
        # stale: after a storm of reconnects they were most of the outbox.
        if dropped:
            log.info("stale_results_dropped", task_id=task_id, generation=generation, dropped=dropped)

    async def _assign_when_done(self, held: Held, task: Task) -> None:
        await held.done.wait()
        await self.on_task_assign(task)

    def on_task_cancelled(self, task_id: str) -> None:
        held = self.held.get(task_id)
        if held is None:
            log.info("cancel_for_unknown_task", task_id=task_id)
            return
        log.info("task_cancel_requested", task_id=task_id, generation=held.generation)
        self._cancel(held, HUB_CANCEL)

    async def on_task_continue(self, task_id: str, generation: int | None) -> None:
        held = self.held.get(task_id)
        if held is None:
            # It may have ended while the hub was answering our task_recovering: its
            # result, not yet answered, now answers the generation the hub gave.
            if generation is not None and await self.outbox.adopt_generation(task_id, generation):
                log.info(
                    "task_continue_after_end", task_id=task_id, generation=generation, action="result resent"
                )
            else:
                log.info("continue_for_unknown_task", task_id=task_id)
            return
        self._recovering.pop(task_id, None)  # answered: not sent again while the store writes
        if generation is not None and generation != held.generation:
            held.generation = generation
            self._log_stale_dropped(task_id, generation, await self.store.set_generation(task_id, generation))
        log.info("task_continue", task_id=task_id, generation=held.generation)
        self._recovery_answered(held)
        # Only a fresh task_accepted restarts the hub's acceptance clock.
        await self.accepts.accept(task_id)

    async def on_task_reassign(self, task_id: str) -> None:
        held = self.held.get(task_id)
        log.info("task_reassign", task_id=task_id, held=held is not None)
        await self.store.drop_results(task_id)
        self.outbox.drop(task_id)  # a result in flight is not sent again either
        if held is not None:
            self._cancel(held, REASSIGN)

    async def recover_all(self) -> None:
        """After each identify: tell the hub about every task we still hold.

        Each `task_recovering` is sent again until the hub answers it (a
        `task_continue`, `task_reassign` or `task_assign` of the task): after a
        `rate_limited`, which may have dropped it, and after `RECOVERY_RESEND_S`
        without an answer. A recovered task waits for that answer before it
        runs, so a dropped one would otherwise hold its slot for ever.
        """
        self._recovering.clear()
        for held in list(self.held.values()):
            await self._send_recovering(held, "task_recovering_sent")

    async def _send_recovering(self, held: Held, event: str) -> None:
        tid = held.task.task_id
        frame = {
            "type": "task_recovering",
            "task_id": tid,
            "description": truncate(held.task.description, LIMITS["description"]),
            "metadata": held.task.metadata,
            "last_status": "running" if held.started or held.stored_running else "queued",
        }
        self._recovering[tid] = trio.current_time()
        log.info(event, task_id=tid, generation=held.generation)
        await self.send(frame)

    def on_rate_limited(self, tier: str | None) -> None:
        """A normal-tier frame was dropped: it may have been a `task_recovering`."""
        if self._recovering and tier in (None, "normal"):
            self._recovery_wake.set()

    def on_disconnected(self) -> None:
        self._recovering.clear()  # the next identify's `recover_all` sends them all again

    def _recovery_answered(self, held: Held) -> None:
        held.recover_answered.set()
        self._recovering.pop(held.task.task_id, None)

    async def _recovery_resender(self) -> None:
        while True:
            with trio.move_on_after(RECOVERY_RESEND_S):
                await self._recovery_wake.wait()
            woken_at = trio.current_time()
            limited = self._recovery_wake.is_set()
            self._recovery_wake = trio.Event()
            for tid, sent_at in list(self._recovering.items()):
                held = self.held.get(tid)
                if held is None or held.ending() is not None:
                    self._recovering.pop(tid, None)
                elif self._recovering.get(tid) == sent_at and (
                    limited or woken_at - sent_at >= RECOVERY_RESEND_S
                ):
                    await self._send_recovering(held, "task_recovering_resent")

    # -- per task ------------------------------------------------------------

    def _cancel(self, held: Held, reason: str) -> None:
        if held.cancel_reason is None:
            held.cancel_reason = reason
        held.scope.cancel()
        self._recovery_answered(held)

    async def _task_main(self, held: Held) -> None:
        task = held.task
        tid = task.task_id
        tlog = log.bind(task_id=tid)
        # Every event logged while this task runs (executors included) carries these.
        bind_context(task_id=tid, generation=lambda: held.generation)
        result: DispatchResult | None = None
        crash: str | None = None
        started_at: float | None = None
        timeout_s = 0.0
        try:
            with held.scope:
                timeout_s = task_time_limit_ms(task, self.config) / 1000.0
                for field, value, problem, used in task.ignored_fields():
                    tlog.warning(
                        "task_field_ignored",
                        field=field,
                        value=repr(value)[:100],
                        problem=problem,
                        using=timeout_s if used is None else used,
                    )
                if held.awaiting_recovery:
                    await held.recover_answered.wait()
                await held.accept_sent.wait()  # at once unless a fresh accept is being sent
                if self._slots.value == 0:
                    self.batcher.task_queued(tid)
                async with self._slots:
                    held.started = True
                    started_at = trio.current_time()
                    held.scope.deadline = started_at + timeout_s
                    if not held.stored_running:
                        assert self._nursery is not None
                        self._nursery.start_soon(self.store.mark_running, tid)  # not awaited: see its doc
                    self.batcher.task_started(tid)
                    tlog.info("task_started", generation=held.generation, timeout_s=timeout_s)
                    # Every child of this task carries the marker the store knows,
                    # so a restart after kill -9 can find and kill them.
                    run = self.context.new_run(
                        task, ProgressSender(self.progress, tid), held.marker, deadline=held.scope.deadline
                    )
                    result = await run_and_sweep(self.dispatch, run)
        except Exception as exc:
            # A bug, or input nothing foresaw: this task fails, the daemon carries on.
            tlog.error("task_crashed", exc_info=True)
            crash = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            with trio.CancelScope(shield=True):
                await self._finish(held, result, started_at, timeout_s, crash)

    async def _finish(
        self,
        held: Held,
        result: DispatchResult | None,
        started_at: float | None,
        timeout_s: float,
        crash: str | None = None,
    ) -> None:
        task = held.task
        tid = task.task_id
        # Nothing a run started outlives it (`run_and_sweep`); one more sweep
        # comes a little later for a process caught mid-exec.
        self._late_send.send_nowait((trio.current_time() + LATE_SWEEP_S, tid, held.marker))
        if not held.started:
            # It never reached an executor in this process: files a run before a
            # crash left (the wake path's) have no one else to remove them.
            discard_task_files(self.config, tid)
        end = decide_end(
            tid,
            held.generation,
            result,
            held.cancel_reason,
            started=started_at is not None,
            timeout_s=timeout_s,
            crash=crash,
        )
        frame, outcome = end.frame, end.outcome
        await self.outbox.put(tid, frame)  # from memory if the store cannot write it
        elapsed = None if started_at is None else round(trio.current_time() - started_at, 3)
        log.info(
            "task_finished",
            task_id=tid,
            generation=held.generation,
            outcome=outcome,
            attempts=None if result is None else result.attempts,
            elapsed_s=elapsed,
        )
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.accepts.forget(tid)
        self.batcher.task_finished(tid)  # a no-op for a task never started nor queued
        if frame is None:
            self.batcher.forget(tid)
        self.held.pop(tid, None)
        self._recovering.pop(tid, None)
        if not self.held:
            self._idle.set()
        held.done.set()
        self.outbox.notify()

    async def _fail_unheld(self, task_id: str, generation: int, error: str, reason: str) -> None:
        """Report a task we will not run (busy, bad frame, state disk full) through the outbox."""
        await self.outbox.put(task_id, failed_frame(task_id, generation, error, reason))
