"""`sidecar run`: wires link, store, supervisor, dispatcher and batcher together.

The whole daemon is one nursery whose lifetime is `run_sidecar`'s: the link,
the batcher, the outbox and accept senders, and the supervisor (which hosts
every task's own scope). SIGTERM/SIGINT start a graceful shutdown: stop taking
work, cancel running tasks (SIGTERM → grace → SIGKILL to each task's group),
flush progress and results while the hub is reachable (bounded), exit.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from . import proctree, reports
from .batcher import Batcher
from .budget import RateBudget
from .config import Config
from .cost import CostModel
from .delivery import AcceptTracker, Outbox
from .dispatcher import Dispatcher
from .entry import STOP_SIGNALS
from .executors import ExecContext, Executor, make_state_subdirs
from .executors.registry import build_executors
from .frames import (
    BadTaskAssign,
    HubError,
    Identified,
    Ignored,
    InboundFrame,
    Pong,
    RateLimited,
    RateLimitWarning,
    RestartSidecar,
    StateReportAck,
    TaskAck,
    TaskAssign,
    TaskCancelled,
    TaskContinue,
    TaskReassign,
)
from .hubtypes import SCHEMAS_TIMEOUT_S, HubTypes, api_url_of
from .link import HubLink
from .log import get_logger, register_secret
from .messages import FrameError
from .metrics import SidecarMetrics, Snapshot
from .pipeline import Pipeline
from .progress import open_progress
from .restart import Restarter
from .sharedhttp import SharedHTTP
from .store import Store
from .storefaults import StoreError
from .supervisor import Supervisor
from .toolcheck import missing_tools

if TYPE_CHECKING:
    import httpx

log = get_logger("sidecar.app")

# At most this long a result waits for its task's pending progress (a guard: the
# batcher gives up at once when the budget cannot send it within one window).
RESULT_PROGRESS_WAIT_S = 1.0

# Exit status after the hub's restart_sidecar (EX_TEMPFAIL): "start me again".
RESTART_EXIT_CODE = 75


class Sidecar:
    """The running daemon: also the link's frame handler."""

    def __init__(
        self,
        config: Config,
        store: Store,
        http: httpx.AsyncClient | SharedHTTP,
        *,
        executors: Callable[[ExecContext], dict[str, Executor]] = build_executors,
    ) -> None:
        self.config = config
        self.store = store
        self.budget = RateBudget.from_config(config)
        self.link = HubLink(config, self, budget=self.budget)
        self.accepts = AcceptTracker(self.link)
        self.batcher = Batcher(
            self.budget,
            window_s=config.progress_window_s,
            keepalive_s=config.keepalive_s,
            held_tasks=self._held_tasks,
        )
        self.outbox = Outbox(store, self.link, before_send=self._flush_task_progress)
        self.progress_send, self.progress_receive = open_progress()
        self.http = http
        self.hub_types = HubTypes()
        self.refused_types = self.hub_types.refused
        self._nursery: trio.Nursery | None = None  # `run`'s, while it runs
        ctx = ExecContext(
            config=config,
            http=http,
            state_dir=config.resolved_state_dir(),
            notify=self._notify_hub,
            off_loop=store.run_blocking,
            handoff=self._handoff,
        )
        self.dispatcher = Dispatcher(executors(ctx), CostModel(config))
        # Workspace, branch, verification and delivery around the dispatcher's run.
        self.pipeline = Pipeline(config, self.dispatcher.run)
        self.metrics = SidecarMetrics(self, prometheus=config.metrics_listen is not None)
        self.supervisor = Supervisor(
            config=config,
            store=store,
            context=ctx,
            dispatch=self.metrics.instrument(self.pipeline.run),
            progress=self.progress_send,
            batcher=self.batcher,
            outbox=self.outbox,
            accepts=self.accepts,
            send=self.link.send_when_ready,
        )
        self.bad_frames = 0
        self.stopped = trio.Event()
        # Set by a signal or the hub's restart_sidecar; `run_sidecar` then shuts down.
        self.stop_requested = trio.Event()
        self.exit_code = 0
        self.restarter = Restarter(
            self.supervisor,
            config.restart_drain_s,
            lambda frame: self._send_optional(self.link, frame),
            self.stop_requested.set,
        )

    def busy(self) -> bool:
        return self.supervisor.busy()

    def snapshot(self) -> Snapshot:
        """What /healthz and /metrics show, read from the components now."""
        link, outbox, store = self.link, self.outbox, self.store
        return Snapshot(
            agent_id=self.config.agent_id,
            capacity=self.config.capacity,
            connected=link.connected,
            identified=link.identified,
            last_pong_at=link.last_pong_at,
            reconnects=link.reconnects,
            rate_limited_hits=link.rate_limited_hits,
            rate_limit_warnings=self.budget.stats.warnings,
            progress=self.batcher.stats,
            outbox_depth=outbox.depth,
            results_delivered=outbox.delivered,
            results_refused=outbox.refused,
            results_unstored=len(outbox.unstored),
            state_error=store.write_error,
            state_unwritable_since=store.health.since,
            tasks_held=len(self.supervisor.held),
        )

    def _held_tasks(self) -> int:
        return len(self.supervisor.held)

    async def _flush_task_progress(self, task_id: str) -> None:
        await self.accepts.before_result(task_id)
        if self.link.can_send():
            await self.batcher.wait_task_flushed(task_id, RESULT_PROGRESS_WAIT_S)

    # -- LinkHandler -----------------------------------------------------------

    async def on_identified(self, link: HubLink) -> None:
        """Per session: recover held tasks, then report Ollama and host resources."""
        self.batcher.notify_sink_ready()
        await self.supervisor.recover_all()
        with trio.move_on_after(SCHEMAS_TIMEOUT_S):
            await self.hub_types.learn(api_url_of(self.config))
        if self.config.ollama_url:
            await self._send_optional(link, {"type": "ollama_report", "ollama_url": self.config.ollama_url})
        await trio.sleep(reports.FIRST_REPORT_DELAY_S)
        while True:
            await self._send_optional(link, await reports.resource_report(agent_id=self.config.agent_id))
            await trio.sleep(reports.REPORT_INTERVAL_S)

    async def _send_optional(self, link: HubLink, frame: dict[str, Any], *, wait: bool = True) -> None:
        """Send a frame an older hub may not know, unless it already refused the type.

        Validation failures count towards the hub's 10-a-minute disconnect, so a
        type refused once (or missing from the hub's /api/schemas) is not sent.
        `wait`: for a token of the rate budget (it draws on the normal bucket).
        """
        if await self.hub_types.check(frame["type"]):
            await (link.send_when_ready(frame) if wait else link.send(frame))

    async def _notify_hub(self, frame: dict[str, Any]) -> None:
        """An executor's informational frame (`wake_result`): now (if the budget has a token) or never."""
        now = trio.current_time()
        if self.link.can_send() and self.budget.lifecycle_at(now) <= now:
            await self._send_optional(self.link, frame, wait=False)

    async def on_frame(self, frame: InboundFrame) -> None:
        try:
            await self._route(frame)
        except Exception:
            # A frame this code did not foresee (a bug of ours): one frame is
            # lost, never the process and its tasks.
            self.bad_frames += 1
            log.error("frame_handler_failed", frame=type(frame).__name__, exc_info=True)

    async def _route(self, frame: InboundFrame) -> None:
        sup = self.supervisor
        match frame:
            case TaskAssign(task=task):
                await sup.on_task_assign(task)
            case BadTaskAssign():
                self.bad_frames += 1
                await sup.on_bad_task_assign(frame)
            case TaskCancelled(task_id=tid):
                sup.on_task_cancelled(tid)
            case TaskContinue(task_id=tid, generation=gen):
                await sup.on_task_continue(tid, gen)
            case TaskReassign(task_id=tid) | StateReportAck(task_id=tid, action="abort"):
                await sup.on_task_reassign(tid)
            case StateReportAck(task_id=tid):
                await sup.on_task_continue(tid, None)
            case TaskAck():
                self.accepts.on_frame(frame)
                self.outbox.on_frame(frame)
            case HubError(error=error, message_type=mtype, errors=errors):
                self.hub_types.on_refusal(error, mtype)
                log.warning(
                    "hub_error",
                    error=error[:300],
                    message_type=mtype,
                    errors=str(errors)[:500] if errors is not None else None,
                )
                self.outbox.on_frame(frame)
            case RateLimited():
                # The link told the budget (the one owner of the pause); resend what it may have dropped.
                self.accepts.on_frame(frame)
                self.outbox.on_frame(frame)
                sup.on_rate_limited(frame.tier)
            case RateLimitWarning(tier=tier, remaining=remaining):
                log.info("rate_limit_warning", tier=tier, remaining=remaining)
            case RestartSidecar(reason=reason):
                # Finish running tasks (bounded), stop gracefully and exit with
                # RESTART_EXIT_CODE: the service manager (deploy/sidecar.service,
                # Restart=always) starts us again. See restart.py.
                self.exit_code = RESTART_EXIT_CODE
                self.restarter.request(reason or "restart_sidecar")
            case Ignored(type=kind):
                log.debug("frame_ignored", type=kind)
            case Identified() | Pong():
                pass

    def on_disconnected(self) -> None:
        self.accepts.on_disconnected()
        self.outbox.on_disconnected()
        self.supervisor.on_disconnected()

    def on_bad_frame(self, error: FrameError, raw: str | bytes) -> None:
        self.bad_frames += 1
        log.warning(
            "bad_frame",
            type=(error.frame_type or "")[:64] or None,
            field=error.path,
            problem=error.problem[:300],
            task_id=error.task_id,
            size=len(raw),
        )

    # -- main ----------------------------------------------------------------

    def _handoff(self, fn: Callable[[], Awaitable[None]]) -> bool:
        """Start `fn` in the daemon's nursery (inside the store's life); False if it is not open."""
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(fn)
        except RuntimeError:  # closed: the daemon is stopping
            return False
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.pipeline.sweep_leftovers()
            await nursery.start(self.supervisor.run)
            nursery.start_soon(self.batcher.run, self.progress_receive, self.link)
            nursery.start_soon(self.outbox.run)
            nursery.start_soon(self.accepts.run)
            nursery.start_soon(self.store.watch)  # recovers the store once the disk takes writes
            nursery.start_soon(self.link.run)
            nursery.start_soon(self.restarter.run)
            if self.config.metrics_listen:
                await nursery.start(self.metrics.serve, self.config.metrics_listen)
            task_status.started()
            await self.stopped.wait()
            self._nursery = None
            nursery.cancel_scope.cancel()

    async def shutdown(self) -> None:
        """Graceful stop: cancel tasks, flush results and progress (bounded), close."""
        cfg = self.config
        log.info("shutdown_started", held=len(self.supervisor.held))
        # A task's teardown: SIGTERM, `kill_grace_s`, SIGKILL, then up to the same
        # again for pipes a process that left the group still holds, then the sweep.
        with trio.move_on_after(2 * cfg.kill_grace_s + 5):
            await self.supervisor.shutdown()
        with trio.move_on_after(cfg.shutdown_grace_s) as flush_scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.batcher.flush, cfg.shutdown_grace_s)
                # A teardown still going on stores its task's failure later: waited for too.
                await self.supervisor.wait_idle()
                await self.outbox.wait_empty()
        # Once every teardown is over (those the flush waited for too), not before.
        self.supervisor.kill_strays_if_idle()
        log.info(
            "shutdown_done",
            results_pending=self.outbox.pending_count(),
            tasks_not_ended=len(self.supervisor.held),
            flush_timed_out=flush_scope.cancelled_caught,
        )
        await self.link.aclose()
        self.stopped.set()


@asynccontextmanager
async def open_sidecar(config: Config, store: Store | None = None) -> AsyncIterator[Sidecar]:
    """Run a sidecar for the duration of the block; leaving it shuts it down gracefully.

    Opens the state store unless given one (which it then closes too).
    """
    register_secret(config.token)
    state_dir = config.resolved_state_dir()
    make_state_subdirs(state_dir)
    if store is None:
        store = await Store.open(state_dir / "sidecar.db")
    log.info(
        "starting",
        agent_id=config.agent_id,
        hub_url=config.hub_url,
        state_dir=str(state_dir),
        capacity=config.capacity,
        queue_length=config.queue_length,
        subreaper=proctree.is_subreaper(),
    )
    reports.prime_cpu_percent()
    for tool, effect in await trio.to_thread.run_sync(missing_tools, config):
        log.warning("tool_missing", tool=tool, effect=effect)
    try:
        async with SharedHTTP() as http:  # made (httpx loaded) by the first Ollama task, if any
            if config.ollama_url:
                await reports.probe_ollama(config.ollama_url)
            sidecar = Sidecar(config, store, http)
            async with trio.open_nursery() as nursery:
                await nursery.start(sidecar.run)
                try:
                    yield sidecar
                finally:
                    if not sidecar.stopped.is_set():
                        with trio.CancelScope(shield=True):
                            await sidecar.shutdown()
    finally:
        with trio.CancelScope(shield=True):
            await store.close()
        log.info("stopped")


async def run_sidecar(config: Config, take_early_signals: Callable[[], list[int]] = list) -> int:
    """Run the daemon until SIGTERM/SIGINT/SIGHUP (exit 0) or a hub restart request (exit 75).

    Signals are caught for the whole run, shutdown included: a second SIGTERM
    during the (bounded) graceful shutdown does not cut it short, nor (run
    through `entry.main`) does it turn the exit into death by signal.
    """
    # Orphans of our tasks are re-parented to us, not to init: the end-of-task
    # sweep then walks our own process tree instead of every process's environment.
    proctree.become_subreaper()  # said in the `starting` line
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        # A stop request that came while the process started (entry.py kept it).
        early = take_early_signals()
        store = None
        if not early:
            store = await _open_store_unless_stopped(config, signals)
            if store is None:
                return 0
        async with open_sidecar(config, store) as sidecar, trio.open_nursery() as nursery:
            settle_heap()
            if early:
                log.info("signal", signal=signal.Signals(early[0]).name, during="start-up")
                sidecar.stop_requested.set()
            nursery.start_soon(_first_signal, signals, sidecar)
            await sidecar.stop_requested.wait()
            nursery.cancel_scope.cancel()
    return sidecar.exit_code


def settle_heap() -> None:
    """Collect start-up's garbage, then exempt what is left from future collections.

    What exists once the daemon runs (modules, classes, config, the store, the
    link) lives as long as the process. A full collection walked all of it,
    ~25 ms here, stalling whichever task was on its way then (the path's max
    and p99); frozen, a full collection walks only what was made since.
    """
    gc.collect()
    gc.freeze()


async def _open_store_unless_stopped(config: Config, signals: AsyncIterator[int]) -> Store | None:
    """The state store, once its disk lets it open; None if a stop signal comes first."""
    path = config.resolved_state_dir() / "sidecar.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    store: Store | None = None
    error: StoreError | None = None
    stopped = False
    async with trio.open_nursery() as nursery:

        async def open_it() -> None:
            nonlocal store, error
            try:
                store = await Store.open_when_possible(path)
            except StoreError as exc:
                error = exc  # raised below, outside the nursery: unwrapped, for cli's one line
            nursery.cancel_scope.cancel()

        nursery.start_soon(open_it)
        async for signum in signals:
            log.info("signal", signal=signal.Signals(signum).name, during="start-up")
            stopped = True
            nursery.cancel_scope.cancel()
            break
    if error is not None:
        raise error
    if stopped and store is not None:
        # Opened just as the signal came: a stop it is.
        with trio.CancelScope(shield=True):
            await store.close()
        return None
    return store


async def _first_signal(signals: AsyncIterator[int], sidecar: Sidecar) -> None:
    async for signum in signals:
        log.info("signal", signal=signal.Signals(signum).name)
        sidecar.stop_requested.set()
        return
