"""Local observability endpoint: `/healthz` (JSON) and `/metrics` (Prometheus text).

Off by default; `metrics_listen = "127.0.0.1:9464"` in the config turns it on.
Each sidecar has its own `CollectorRegistry` (never the process-global one),
so several sidecars in one process (tests) do not mix their figures.

Two kinds of figures:
- recorded when a task ends, by wrapping the dispatcher (`instrument`): tasks by
  outcome and executor, task duration, tokens and cost by model;
- read at scrape time from the live objects (`_LiveCollector`): connection
  state, reconnects, rate-limit hits, progress batcher counters, outbox depth,
  tasks held.

Served by hypercorn's Trio worker (raw ASGI, no framework) inside the
sidecar's nursery, so it lives and dies with the sidecar.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import attrs
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .asgi import ASGIReceive, ASGISend, serve_lifespan
from .batcher import BatcherStats
from .dispatcher import DispatchResult, UnknownTargetError, target_of
from .log import get_logger
from .messages import Task
from .taskrun import TaskRun

log = get_logger("sidecar.metrics")

DispatchFn = Callable[[TaskRun], Awaitable[DispatchResult]]

# Task durations range from a shell `echo` (ms) to a long Claude session (tens of minutes).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


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


class _LiveCollector:
    """Figures owned by other objects, read when Prometheus scrapes."""

    def __init__(self, observed: Observed) -> None:
        self._observed = observed

    def collect(self) -> Iterator[Metric]:
        snap = self._observed.snapshot()
        stats = snap.progress

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge(
            "sidecar_hub_connected", "1 while the WebSocket to the hub is open", float(snap.connected)
        )
        yield gauge(
            "sidecar_hub_identified", "1 while the hub has accepted our identify", float(snap.identified)
        )
        age = snap.last_pong_age()
        yield gauge(
            "sidecar_hub_last_pong_age_seconds",
            "Seconds since the hub last answered (pong or identified); NaN before the first",
            math.nan if age is None else age,
        )
        yield counter("sidecar_hub_reconnects", "Reconnect attempts to the hub", snap.reconnects)
        yield counter(
            "sidecar_rate_limited", "Frames the hub dropped with rate_limited", snap.rate_limited_hits
        )
        yield counter(
            "sidecar_rate_limit_warnings", "rate_limit_warning frames from the hub", snap.rate_limit_warnings
        )
        yield counter("sidecar_progress_events", "Progress events produced by executors", stats.events_in)
        yield counter(
            "sidecar_progress_events_coalesced",
            "Progress events merged into a pending frame",
            stats.events_coalesced,
        )
        yield counter(
            "sidecar_progress_events_dropped", "Progress events whose text was lost", stats.events_dropped
        )
        yield counter("sidecar_progress_frames_sent", "task_progress frames sent", stats.frames_sent)
        yield counter(
            "sidecar_progress_keepalives_sent", "Keep-alive task_progress frames sent", stats.keepalives_sent
        )
        yield counter(
            "sidecar_progress_send_failures",
            "task_progress frames that could not be sent",
            stats.send_failures,
        )
        yield gauge(
            "sidecar_outbox_depth", "Results stored and not yet acknowledged by the hub", snap.outbox_depth
        )
        yield counter("sidecar_results_delivered", "Results the hub acknowledged", snap.results_delivered)
        yield counter("sidecar_results_refused", "Results the hub refused (stale)", snap.results_refused)
        yield gauge(
            "sidecar_state_writable",
            "1 while the state store takes writes (0: disk full or failing; new tasks are refused)",
            float(snap.state_error is None),
        )
        yield gauge(
            "sidecar_results_unstored",
            "Results the store could not write, held in memory until acknowledged",
            snap.results_unstored,
        )
        yield gauge("sidecar_tasks_held", "Tasks held (running or queued)", snap.tasks_held)
        yield gauge("sidecar_task_slots", "Tasks that may run at once (capacity)", snap.capacity)


class SidecarMetrics:
    """The sidecar's metrics registry, its task hooks, and the HTTP endpoint."""

    def __init__(self, observed: Observed) -> None:
        self.observed = observed
        self.registry = CollectorRegistry(auto_describe=False)
        self.tasks = Counter(
            "sidecar_tasks",
            "Tasks finished, by outcome (success, failure, timeout, cancelled) and executor",
            ["outcome", "executor"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "sidecar_task_duration_seconds",
            "Task run time from start to result, all attempts included",
            ["executor"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "sidecar_tokens",
            "LLM tokens used by successful tasks, by model and direction (in, out)",
            ["model", "direction"],
            registry=self.registry,
        )
        self.cost = Counter(
            "sidecar_cost_usd",
            "Estimated cost in USD of successful tasks, by model",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(observed))
        self.bound_url: str | None = None

    # -- task hooks ------------------------------------------------------------

    def instrument(self, dispatch: DispatchFn) -> DispatchFn:
        """Wrap the dispatcher so every task's end is counted."""

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
                    self.record(result, elapsed)
                else:
                    timed_out = trio.current_time() >= deadline
                    self.record_unfinished(run.task, "timeout" if timed_out else "cancelled", elapsed)

        return instrumented

    def record(self, result: DispatchResult, elapsed_s: float) -> None:
        self.tasks.labels("success" if result.ok else "failure", result.executor).inc()
        self.duration.labels(result.executor).observe(elapsed_s)
        r = result.result
        if not result.ok or r is None:
            return
        model = str(r.get("model_used") or "none")
        if model == "none":
            return
        for direction in ("in", "out"):
            n = r.get(f"tokens_{direction}")
            if isinstance(n, int) and n > 0:
                self.tokens.labels(model, direction).inc(n)
        cost = r.get("estimated_cost_usd")
        if isinstance(cost, (int, float)) and cost > 0:
            self.cost.labels(model).inc(float(cost))

    def record_unfinished(self, task: Task, outcome: str, elapsed_s: float) -> None:
        try:
            executor = target_of(task)
        except UnknownTargetError:
            executor = "none"
        self.tasks.labels(outcome, executor).inc()
        self.duration.labels(executor).observe(elapsed_s)

    # -- HTTP ------------------------------------------------------------------

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

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
        elif path == "/metrics":
            status, ctype, body = 200, CONTENT_TYPE_LATEST, self.render()
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
