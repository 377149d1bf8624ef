"""Local observability endpoint: `/healthz` (JSON) and `/metrics` (Prometheus text).

Off by default; `metrics_listen = "127.0.0.1:9464"` in the config turns it on.
Each sidecar has its own `CollectorRegistry` (never the process-global one),
so several sidecars in one process (tests) do not mix their figures; with the
endpoint off there is no registry at all (`promexport` is not even imported).

Two kinds of figures:
- recorded when a task ends, by wrapping the dispatcher (`instrument`): tasks by
  outcome and executor, task duration, tokens and cost by model;
- read at scrape time from the live objects (`promexport._LiveCollector`): connection
  state, reconnects, rate-limit hits, progress batcher counters, outbox depth,
  tasks held.

Served by hypercorn's Trio worker (raw ASGI, no framework) inside the
sidecar's nursery, so it lives and dies with the sidecar.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from .asgi import ASGIReceive, ASGISend, serve_lifespan
from .batcher import BatcherStats
from .dispatcher import DispatchResult
from .log import get_logger
from .taskrun import TaskRun

if TYPE_CHECKING:
    from .promexport import Prometheus

log = get_logger("sidecar.metrics")

DispatchFn = Callable[[TaskRun], Awaitable[DispatchResult]]


@attrs.frozen
class Snapshot:
    """What the endpoint reads of the running daemon, taken at scrape time."""

    agent_id: str
    capacity: int
    connected: bool
    identified: bool
    last_pong_at: float | None  # trio time
    reconnects: int
    rate_limited_hits: int
    rate_limit_warnings: int
    progress: BatcherStats
    outbox_depth: int
    results_delivered: int
    results_refused: int
    results_unstored: int
    state_error: str | None
    state_unwritable_since: float | None  # trio time
    tasks_held: int

    def last_pong_age(self) -> float | None:
        at = self.last_pong_at
        return None if at is None else max(0.0, trio.current_time() - at)


class Observed(Protocol):
    """The one thing metrics need of the daemon."""

    def snapshot(self) -> Snapshot: ...


class SidecarMetrics:
    """The sidecar's task hooks and HTTP endpoint; the Prometheus registry when it is on."""

    def __init__(self, observed: Observed, *, prometheus: bool = True) -> None:
        self.observed = observed
        self.bound_url: str | None = None
        self.prometheus: Prometheus | None = None
        if prometheus:
            from .promexport import Prometheus

            self.prometheus = Prometheus(observed)

    # -- task hooks ------------------------------------------------------------

    def instrument(self, dispatch: DispatchFn) -> DispatchFn:
        """Wrap the dispatcher so every task's end is counted (unchanged when there is no registry)."""
        prom = self.prometheus
        if prom is None:
            return dispatch

        async def instrumented(run: TaskRun) -> DispatchResult:
            started = trio.current_time()
            # The supervisor sets the task's time limit on its scope before dispatching.
            deadline = trio.current_effective_deadline()
            result: DispatchResult | None = None
            try:
                result = await dispatch(run)
                return result
            finally:
                elapsed = trio.current_time() - started
                if result is not None:
                    prom.record(result, elapsed)
                else:
                    timed_out = trio.current_time() >= deadline
                    prom.record_unfinished(
                        run.task, "timeout" if timed_out else "cancelled", elapsed, run.spent
                    )

        return instrumented

    # -- HTTP ------------------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any]]:
        """503 while the hub link is down or the state store cannot write (tasks are refused)."""
        snap = self.observed.snapshot()
        age = snap.last_pong_age()
        writable = snap.state_error is None
        healthy = snap.identified and writable
        status = "ok" if healthy else "unavailable" if not snap.identified else "state_store_unwritable"
        since = snap.state_unwritable_since
        doc = {
            "status": status,
            "agent_id": snap.agent_id,
            "connected": snap.connected,
            "identified": snap.identified,
            "last_pong_age_s": None if age is None else round(age, 3),
            "tasks_held": snap.tasks_held,
            "outbox_depth": snap.outbox_depth,
            "state_writable": writable,
            "state_error": snap.state_error,
            "state_unwritable_for_s": None if since is None else round(trio.current_time() - since, 3),
            "results_unstored": snap.results_unstored,
        }
        return (200 if healthy else 503), doc

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] == "lifespan":
            await serve_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        if scope.get("method") not in ("GET", "HEAD"):
            status, ctype, body = 405, "text/plain; charset=utf-8", b"method not allowed\n"
        elif path == "/metrics" and self.prometheus is not None:
            from .promexport import CONTENT_TYPE_LATEST

            status, ctype, body = 200, CONTENT_TYPE_LATEST, self.prometheus.render()
        elif path == "/healthz":
            status, doc = self.health()
            ctype, body = "application/json", json.dumps(doc).encode() + b"\n"
        else:
            status, ctype, body = 404, "text/plain; charset=utf-8", b"not found: try /healthz or /metrics\n"
        headers = [(b"content-type", ctype.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})

    async def serve(
        self, listen: str, *, task_status: trio.TaskStatus[str | None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled. A bind failure is logged, not fatal: the sidecar still works."""
        # Imported here: hypercorn costs ~3 MB of RSS, paid only when metrics are on.
        import hypercorn.config
        import hypercorn.trio

        cfg = hypercorn.config.Config()
        cfg.bind = [listen]
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("hypercorn.error")
        cfg.graceful_timeout = 0.5
        async with trio.open_nursery() as nursery:
            try:
                binds: list[str] = await nursery.start(hypercorn.trio.serve, self, cfg)
            except (OSError, BaseExceptionGroup) as exc:
                if isinstance(exc, BaseExceptionGroup) and exc.split(OSError)[1] is not None:
                    raise
                log.error("metrics_bind_failed", listen=listen, error=str(exc))
                task_status.started(None)
                return
            self.bound_url = binds[0]
            log.info("metrics_listening", url=self.bound_url)
            task_status.started(self.bound_url)
