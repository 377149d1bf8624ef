"""The dev hub's memory: tasks, cooldowns, rate buckets, and what it saw.

Task semantics follow the real hub's `AgentCom.TaskQueue`:

- a task is submitted with `generation` 0 (or the one given) and status `queued`;
- every assignment bumps the generation, so the first `task_assign` carries 1;
- `task_complete` / `task_failed` must carry the current generation and find the
  task assigned (`assigned` or `accepted`); otherwise the hub answers
  `stale_generation` (assigned, other generation), `invalid_state` (not
  assigned: queued, finished, cancelled) or `not_found`. The hub does not check
  which agent sends it: generation fencing is its only guard;
- a failure is retried (back to `queued`, generation + 1) until
  `retry_count` reaches `max_retries`, then the task is `dead_letter`;
- a reclaim (disconnect, acceptance timeout, stuck) puts it back to `queued`
  with generation + 1.

Statuses: `queued`, `assigned`, `accepted`, `completed`, `dead_letter`, `cancelled`.
Times named `*_at` are Trio seconds; `*_ms` fields are wall-clock milliseconds
(the wire's).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from typing import Any

import attrs

from .ratelimit import Cooldowns, RateLimiter, RateLimits

ASSIGNED = frozenset({"assigned", "accepted"})
FINISHED = frozenset({"completed", "dead_letter", "cancelled"})

# Fields of a submitted task that the hub owns; everything else is sent in task_assign.
_HUB_FIELDS = frozenset(
    {
        "type",
        "task_id",
        "generation",
        "assigned_at",
        "max_retries",
        "needed_capabilities",
        "assign_to",
        "priority",
        "complexity_tier",
    }
)


class TaskError(Exception):
    """A lifecycle frame the queue refuses; `reason` is the hub's word for it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class FrameRecord:
    """One frame received or sent by the hub.

    `verdict` says what the hub made of a received frame: `ok`,
    `validation_failed`, `rate_limited`, `not_identified`, `invalid_json`,
    `not_an_object`, `binary`, `too_many_violations` (the frame that tipped
    the socket into a 1008 close), `cooldown`, `auth_failed`; sent frames
    have `sent`.
    """

    agent_id: str | None
    session: int
    at: float
    text: str | bytes
    frame: dict[str, Any] | None
    verdict: str

    @property
    def type(self) -> str | None:
        value = self.frame.get("type") if self.frame is not None else None
        return value if isinstance(value, str) else None


@attrs.frozen
class Violation:
    """Something a well-behaved sidecar never does.

    `kind`: `validation_failed`, `rate_limited`, `invalid_json`,
    `not_an_object`, `binary` (the last three crash the real hub's handler).
    """

    kind: str
    agent_id: str | None
    session: int
    at: float
    text: str | bytes
    detail: Any = None


@attrs.define(eq=False)
class TaskRecord:
    """A task as the hub sees it, with everything that happened to it."""

    task_id: str
    fields: dict[str, Any]
    created_at: float
    created_at_ms: int = 0
    status: str = "queued"
    generation: int = 0
    max_retries: int = 3
    retry_count: int = 0
    needed_capabilities: list[str] = attrs.field(factory=list)
    assign_to: str | None = None
    assigned_to: str | None = None
    assigned_at_ms: int | None = None
    # Agent that held the task when it was reclaimed at its disconnect.
    reclaimed_from: str | None = None
    result: dict[str, Any] | None = None
    tokens_used: int | None = None
    verification_report: dict[str, Any] | None = None
    verification_history: list[Any] | None = None
    last_error: str | None = None
    progress: list[dict[str, Any]] = attrs.field(factory=list)
    failures: list[dict[str, Any]] = attrs.field(factory=list)
    assigns: list[dict[str, Any]] = attrs.field(factory=list)
    acks: list[dict[str, Any]] = attrs.field(factory=list)
    history: list[tuple[str, float, dict[str, Any]]] = attrs.field(factory=list)
    # Clocks (Trio seconds): acceptance deadline while assigned and not accepted,
    # and the last sign of life (assign, accept, progress).
    accept_deadline: float | None = None
    last_progress_at: float | None = None

    @property
    def progress_events(self) -> list[dict[str, Any]]:
        """The `execution_event` objects of every `task_progress` received, in order."""
        return [p["execution_event"] for p in self.progress if isinstance(p.get("execution_event"), dict)]

    @property
    def ack_statuses(self) -> list[str]:
        return [str(a.get("status")) for a in self.acks]

    def log(self, event: str, at: float, **info: Any) -> None:
        self.history.append((event, at, info))

    def assign_frame(self, assigned_at_ms: int) -> dict[str, Any]:
        """The `task_assign` frame for the current assignment."""
        frame: dict[str, Any] = {
            "type": "task_assign",
            "task_id": self.task_id,
            "description": "",
            "metadata": {},
            "generation": self.generation,
            "assigned_at": assigned_at_ms,
            "repo": None,
            "branch": None,
            "file_hints": [],
            "success_criteria": [],
            "verification_steps": [],
            "complexity": None,
            "routing_decision": None,
        }
        frame.update({k: v for k, v in self.fields.items() if k not in _HUB_FIELDS})
        frame["generation"] = self.generation
        frame["assigned_at"] = assigned_at_ms
        return frame

    def to_json(self) -> dict[str, Any]:
        """The task as `GET /api/tasks/ID` shows it."""
        return {
            "task_id": self.task_id,
            "status": self.status,
            "priority": self.fields.get("priority") or "normal",
            "created_at": self.created_at_ms,
            "generation": self.generation,
            "assigned_to": self.assigned_to,
            "assigned_at": self.assigned_at_ms,
            "retry_count": self.retry_count,
            "max_retries": self.max_retries,
            "description": self.fields.get("description", ""),
            "metadata": self.fields.get("metadata", {}),
            "progress": self.progress_events,
            "result": self.result,
            "tokens_used": self.tokens_used,
            "verification_report": self.verification_report,
            "verification_history": self.verification_history,
            "error": self.last_error,
            "failures": [f.get("error") or f.get("reason") for f in self.failures],
            "acks": self.acks,
            "history": [{"event": e, "info": info} for e, _, info in self.history],
        }


def new_task_id() -> str:
    return "task-" + secrets.token_hex(8)


@attrs.define
class HubState:
    """All the hub remembers; pass it to a new hub to emulate a restart.

    The real hub keeps tasks on disk, while cooldowns and rate buckets live in
    memory: use `restarted()` for a faithful restart, or pass the state itself
    to keep cooldowns and buckets too.
    """

    tasks: dict[str, TaskRecord] = attrs.field(factory=dict)
    cooldowns: Cooldowns = attrs.field(factory=Cooldowns)
    rates: RateLimiter = attrs.field(factory=lambda: RateLimiter(RateLimits()))
    # Agents registered through `POST /api/onboard/register` (agent_id → token),
    # and agents whose token `DELETE /admin/tokens/NAME` revoked.
    registered: dict[str, str] = attrs.field(factory=dict)
    revoked: set[str] = attrs.field(factory=set)
    # The tasks not finished, in submission order: all that scheduling and the
    # clocks look at. Scanning every task instead made each frame cost O(tasks
    # ever submitted): over 12,000 sequential tasks the hub's CPU per task went
    # from 2.3 to 7.0 ms. A finished task never opens again; it leaves on the
    # next look (`open_tasks`).
    _open: dict[str, TaskRecord] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._open = {tid: rec for tid, rec in self.tasks.items() if rec.status not in FINISHED}

    def restarted(self) -> HubState:
        """What a real hub has after a restart: its tasks and tokens, nothing else."""
        return HubState(
            tasks=self.tasks,
            rates=RateLimiter(self.rates.limits),
            registered=self.registered,
            revoked=self.revoked,
        )

    # -- queue operations (pure: no I/O; the hub pushes frames) ------------------

    def submit(self, task: Mapping[str, Any], now: float, default_max_retries: int) -> TaskRecord:
        fields = dict(task)
        task_id = fields.get("task_id") or new_task_id()
        if not isinstance(task_id, str):
            raise ValueError("task_id must be a string")
        if task_id in self.tasks:
            raise ValueError(f"task {task_id!r} exists")
        fields["task_id"] = task_id
        rec = TaskRecord(
            task_id=task_id,
            fields=fields,
            created_at=now,
            created_at_ms=int(time.time() * 1000),
            generation=int(fields.get("generation") or 0),
            max_retries=int(fields.get("max_retries", default_max_retries)),
            needed_capabilities=list(fields.get("needed_capabilities") or []),
            assign_to=fields.get("assign_to") or (fields.get("metadata") or {}).get("assign_to"),
        )
        rec.log("queued", now, generation=rec.generation)
        self.tasks[task_id] = rec
        self._open[task_id] = rec
        return rec

    def open_tasks(self) -> list[TaskRecord]:
        """The tasks not finished (queued or held by an agent), oldest submission first."""
        tasks = self.tasks
        gone = [tid for tid, rec in self._open.items() if rec.status in FINISHED or tasks.get(tid) is not rec]
        for tid in gone:
            del self._open[tid]
        return list(self._open.values())

    def queued(self) -> list[TaskRecord]:
        """Queued tasks in the hub's order (oldest submission first)."""
        return sorted((t for t in self.open_tasks() if t.status == "queued"), key=lambda t: t.created_at)

    def assigned_to(self, agent_id: str) -> list[TaskRecord]:
        return [t for t in self.open_tasks() if t.status in ASSIGNED and t.assigned_to == agent_id]

    def assign(self, rec: TaskRecord, agent_id: str, now: float, now_ms: int, accept_timeout: float) -> None:
        rec.status = "assigned"
        rec.generation += 1
        rec.assigned_to = agent_id
        rec.assigned_at_ms = now_ms
        rec.reclaimed_from = None
        rec.accept_deadline = now + accept_timeout
        rec.last_progress_at = now
        rec.log("assigned", now, agent_id=agent_id, generation=rec.generation)

    def reclaim(self, rec: TaskRecord, reason: str, now: float) -> None:
        if rec.status not in ASSIGNED:
            return
        rec.reclaimed_from = rec.assigned_to if reason == "agent_disconnect" else None
        rec.log("reclaimed", now, reason=reason, agent_id=rec.assigned_to, generation=rec.generation + 1)
        rec.status = "queued"
        rec.generation += 1
        rec.assigned_to = None
        rec.assigned_at_ms = None
        rec.accept_deadline = None

    def _fenced(self, task_id: str, generation: int) -> TaskRecord:
        rec = self.tasks.get(task_id)
        if rec is None:
            raise TaskError("not_found")
        if rec.status not in ASSIGNED:
            raise TaskError("invalid_state")
        if rec.generation != generation:
            raise TaskError("stale_generation")
        return rec

    def complete(self, frame: Mapping[str, Any], now: float) -> TaskRecord:
        rec = self._fenced(frame["task_id"], frame.get("generation") or 0)
        rec.status = "completed"
        rec.result = frame.get("result") or {}
        tokens = frame.get("tokens_used")
        rec.tokens_used = tokens if tokens is not None else rec.result.get("tokens_used")
        rec.verification_report = frame.get("verification_report")
        rec.verification_history = frame.get("verification_history")
        rec.accept_deadline = None
        rec.log("completed", now, agent_id=rec.assigned_to, generation=rec.generation)
        return rec

    def fail(self, frame: Mapping[str, Any], now: float) -> tuple[str, TaskRecord]:
        """Record a failure; returns ("retried" | "dead_letter", task)."""
        rec = self._fenced(frame["task_id"], frame.get("generation") or 0)
        error = frame.get("error") or frame.get("reason") or "unknown"
        rec.failures.append(dict(frame))
        rec.last_error = error
        rec.retry_count += 1
        rec.accept_deadline = None
        if rec.retry_count >= rec.max_retries:
            rec.status = "dead_letter"
            rec.log("dead_letter", now, agent_id=rec.assigned_to, error=error)
            return "dead_letter", rec
        rec.log("retried", now, agent_id=rec.assigned_to, error=error, generation=rec.generation + 1)
        rec.status = "queued"
        rec.generation += 1
        rec.assigned_to = None
        rec.assigned_at_ms = None
        return "retried", rec
