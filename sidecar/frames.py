"""Inbound hub frames as attrs classes, parsed once at the link.

`parse_inbound` turns a decoded JSON object into one of the classes below with
the one cattrs converter (`messages.converter`): field types are checked
strictly and a bad field raises `FrameError` naming its path. A `task_assign`
that cannot be used becomes a `BadTaskAssign` instead of an error when it
names its task, so that the task can be failed rather than left to time out.
Chat traffic and types we do not know become `Ignored`. After this, code
routes on the class with `match` and never checks a field's type by hand.
"""

from __future__ import annotations

from typing import Any

import attrs

from .messages import (
    GENERATION_RANGE,
    FrameError,
    Task,
    converter,
    decode_frame,
    error_path,
    is_generation,
    lenient_generation,
    lenient_head,
    parse_task,
)


@attrs.frozen
class Identified:
    agent_id: str | None = None


@attrs.frozen
class TaskAssign:
    task: Task


@attrs.frozen
class BadTaskAssign:
    """A `task_assign` naming a task we cannot run as sent."""

    task_id: str
    generation: int
    path: str
    problem: str


@attrs.frozen
class TaskAck:
    task_id: str
    status: str


@attrs.frozen
class TaskCancelled:
    task_id: str


@attrs.frozen
class TaskContinue:
    task_id: str
    generation: int | None = None


@attrs.frozen
class TaskReassign:
    task_id: str


@attrs.frozen
class StateReportAck:
    task_id: str
    action: str = "continue"


@attrs.frozen
class RestartSidecar:
    reason: str | None = None


@attrs.frozen
class Pong:
    timestamp: float | None = None


@attrs.frozen
class HubError:
    error: str
    message_type: str | None = None
    errors: list[Any] | None = None


@attrs.frozen
class RateLimitWarning:
    tier: str | None = None
    remaining: float | None = None
    capacity: float | None = None


@attrs.frozen
class RateLimited:
    retry_after_ms: float | None = None
    tier: str | None = None


@attrs.frozen
class Ignored:
    """Chat traffic for interactive agents, acks of reports, and types we do not know."""

    type: str


InboundFrame = (
    Identified
    | TaskAssign
    | BadTaskAssign
    | TaskAck
    | TaskCancelled
    | TaskContinue
    | TaskReassign
    | StateReportAck
    | RestartSidecar
    | Pong
    | HubError
    | RateLimitWarning
    | RateLimited
    | Ignored
)

_CLASSES: dict[str, type[Any]] = {
    "identified": Identified,
    "task_ack": TaskAck,
    "task_cancelled": TaskCancelled,
    "task_continue": TaskContinue,
    "task_reassign": TaskReassign,
    "state_report_ack": StateReportAck,
    "restart_sidecar": RestartSidecar,
    "pong": Pong,
    "error": HubError,
    "rate_limit_warning": RateLimitWarning,
    "rate_limited": RateLimited,
}


def parse_inbound(obj: dict[str, Any]) -> InboundFrame:
    """The typed frame for a decoded JSON object with a string `type` (`decode_frame`'s output).

    Raises FrameError (with the field's path) for a frame of a known type whose
    fields are wrong, except a `task_assign` that names its task.
    """
    kind = obj["type"]
    if kind == "task_assign":
        return _task_assign(obj)
    cls = _CLASSES.get(kind)
    if cls is None:
        return Ignored(kind[:64])
    fields = {a.name for a in attrs.fields(cls)}
    # Absent and null are the same on this wire; unknown fields are the hub's business.
    data = {k: v for k, v in obj.items() if k in fields and v is not None}
    try:
        frame: InboundFrame = converter.structure(data, cls)
    except Exception as exc:  # cattrs raises several kinds; all mean "bad frame"
        path, problem = error_path(exc)
        path = path.removeprefix("$.")
        raise FrameError(path, problem, task_id=_task_id_of(obj), frame_type=kind) from exc
    generation = getattr(frame, "generation", None)
    if generation is not None and not is_generation(generation):
        raise FrameError("generation", GENERATION_RANGE, task_id=_task_id_of(obj), frame_type=kind)
    return frame


def _task_assign(obj: dict[str, Any]) -> TaskAssign | BadTaskAssign:
    try:
        return TaskAssign(parse_task(obj))
    except FrameError as exc:
        if exc.task_id is None:
            exc.frame_type = "task_assign"
            raise
        return BadTaskAssign(exc.task_id, lenient_generation(obj.get("generation")), exc.path, exc.problem)


def _task_id_of(obj: dict[str, Any]) -> str | None:
    tid = obj.get("task_id")
    return tid if isinstance(tid, str) and tid else None


def read_frame(raw: str | bytes) -> InboundFrame:
    """Decode and type one WebSocket message; raise FrameError for a bad one.

    A `task_assign` json cannot read (NaN, 1e400, a 5,000-digit integer, nesting
    too deep, a frame cut short) still names its task if its top level does: it
    comes back as a `BadTaskAssign`, so that the task is failed at once.
    """
    try:
        obj = decode_frame(raw)
    except FrameError as exc:
        if exc.frame_type == "task_assign" and exc.task_id is not None and isinstance(raw, str):
            return BadTaskAssign(
                exc.task_id, lenient_generation(lenient_head(raw).get("generation")), exc.path, exc.problem
            )
        raise
    return parse_inbound(obj)
