"""The Prometheus side of `/metrics`: the registry, what a task's end adds to it,
and the figures read from the running daemon at scrape time.

Imported only when the endpoint is on (`metrics_listen`): prometheus_client and
what it imports (http.server, wsgiref, …) cost ~2 MiB of RSS a daemon that
serves no metrics has no use for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .dispatcher import DispatchResult, UnknownTargetError, target_of
from .messages import Task
from .metrics import Observed
from .taskrun import Spend

__all__ = ["CONTENT_TYPE_LATEST", "Prometheus"]

# Task durations range from a shell `echo` (ms) to a long Claude session (tens of minutes).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


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


class Prometheus:
    """The sidecar's own registry (never the process-global one) and its task figures."""

    def __init__(self, observed: Observed) -> None:
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
            "LLM tokens used by successful tasks and cut-short Claude sessions, "
            "by model and direction (in, out)",
            ["model", "direction"],
            registry=self.registry,
        )
        self.cost = Counter(
            "sidecar_cost_usd",
            "Estimated cost in USD of successful tasks and cut-short Claude sessions, by model",
            ["model"],
            registry=self.registry,
        )
        self.registry.register(_LiveCollector(observed))

    def record(self, result: DispatchResult, elapsed_s: float) -> None:
        self.tasks.labels("success" if result.ok else "failure", result.executor).inc()
        self.duration.labels(result.executor).observe(elapsed_s)
        r = result.result
        if not result.ok or r is None:
            return
        model = str(r.get("model_used") or "none")
        if model == "none":
            return
        cost = r.get("estimated_cost_usd")
        self._count_spend(
            model,
            r.get("tokens_in"),
            r.get("tokens_out"),
            float(cost) if isinstance(cost, (int, float)) else None,
        )

    def _count_spend(self, model: str, tokens_in: Any, tokens_out: Any, cost_usd: float | None) -> None:
        """Add a run's tokens and cost to the counters of `model` (what is not a positive number is not)."""
        for direction, n in (("in", tokens_in), ("out", tokens_out)):
            if isinstance(n, int) and n > 0:
                self.tokens.labels(model, direction).inc(n)
        if cost_usd is not None and cost_usd > 0:
            self.cost.labels(model).inc(cost_usd)

    def record_unfinished(
        self, task: Task, outcome: str, elapsed_s: float, spent: Spend | None = None
    ) -> None:
        """A task that ended without a result (cancelled, timed out); what it spent
        all the same (a Claude session's cost so far) counts."""
        try:
            executor = target_of(task)
        except UnknownTargetError:
            executor = "none"
        self.tasks.labels(outcome, executor).inc()
        self.duration.labels(executor).observe(elapsed_s)
        if spent is not None and spent.model is not None:
            self._count_spend(spent.model, spent.tokens_in, spent.tokens_out, spent.cost_usd)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
