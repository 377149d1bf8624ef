"""Message schemas and the validator of the dev hub, mirroring the real hub's.

The real hub (Elixir, `AgentCom.Validation`) checks each inbound frame against
a schema for its `type`: required fields must be present, non-null and of the
right JSON type, optional fields are checked only when present and non-null,
strings named in `LENGTH_LIMITS` are bounded, unknown fields pass through, and
an unknown `type` is an error. Types are strict: `1.0` is not an integer and
`true` is not a number. Errors are reported as dicts with `field`, `error`,
`detail` and sometimes `value` / `known_types`, exactly as the hub formats them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The hub's string limits (characters). `channel` is the hub's too; it is not
# in protocol.md because the sidecar never sends it.
LENGTH_LIMITS: dict[str, int] = {
    "agent_id": 128,
    "description": 10_000,
    "status": 256,
    "channel": 64,
    "token": 256,
    "error": 2_000,
    "reason": 2_000,
    "name": 256,
    "repo": 512,
    "ollama_url": 512,
}

# A field type is "string", "integer", "number", "object", "boolean" or
# ("list", item_type).
FieldType = str | tuple[str, str]


def _schema(
    description: str,
    required: dict[str, FieldType] | None = None,
    optional: dict[str, FieldType] | None = None,
) -> dict[str, Any]:
    return {
        "required": {"type": "string", **(required or {})},
        "optional": dict(optional or {}),
        "description": description,
    }


# Every WebSocket message type a stock hub accepts.
WS_SCHEMAS: dict[str, dict[str, Any]] = {
    "identify": _schema(
        "First message on WebSocket connection. Authenticates the agent.",
        {"agent_id": "string", "token": "string"},
        {"name": "string", "status": "string", "capabilities": ("list", "string"), "ollama_url": "string"},
    ),
    "message": _schema(
        "Send a direct or broadcast message.",
        {"payload": "object"},
        {"to": "string", "message_type": "string", "reply_to": "string"},
    ),
    "status": _schema("Update agent status.", {"status": "string"}),
    "list_agents": _schema("Request list of connected agents."),
    "ping": _schema("Heartbeat ping. Server responds with pong."),
    "channel_subscribe": _schema("Subscribe to a channel.", {"channel": "string"}),
    "channel_unsubscribe": _schema("Unsubscribe from a channel.", {"channel": "string"}),
    "channel_publish": _schema(
        "Publish a message to a channel.",
        {"channel": "string", "payload": "object"},
        {"message_type": "string", "reply_to": "string"},
    ),
    "channel_history": _schema(
        "Request channel message history.", {"channel": "string"}, {"limit": "integer", "since": "integer"}
    ),
    "list_channels": _schema("Request list of all channels."),
    "task_accepted": _schema("Sidecar acknowledges task assignment.", {"task_id": "string"}),
    "task_progress": _schema(
        "Sidecar reports task progress (prevents overdue sweep). "
        "Optional execution_event for dashboard streaming.",
        {"task_id": "string"},
        {"progress": "integer", "execution_event": "object"},
    ),
    "task_complete": _schema(
        "Sidecar reports task completion with result.",
        {"task_id": "string", "generation": "integer"},
        {"result": "object", "tokens_used": "integer", "verification_report": "object"},
    ),
    "task_failed": _schema(
        "Sidecar reports task failure.",
        {"task_id": "string", "generation": "integer"},
        {"error": "string", "reason": "string"},
    ),
    "task_recovering": _schema("Sidecar requests task recovery status after restart.", {"task_id": "string"}),
    "ollama_report": _schema(
        "Sidecar reports local Ollama endpoint URL for auto-registration.", {"ollama_url": "string"}
    ),
    "resource_report": _schema(
        "Sidecar reports host resource utilization (CPU, RAM, VRAM).",
        {},
        {
            "cpu_percent": "number",
            "ram_used_bytes": "number",
            "ram_total_bytes": "number",
            "vram_used_bytes": "number",
            "vram_total_bytes": "number",
            "timestamp": "number",
        },
    ),
}

# Known only to newer hubs (`knows_state_report=True`).
STATE_REPORT_SCHEMA: dict[str, Any] = _schema(
    "Sidecar reports the state of a task it still runs after a reconnect.",
    {"task_id": "string"},
    {"status": "string", "generation": "integer", "assigned_at": "integer"},
)

# Known only to newer hubs (`knows_wake_result=True`): the outcome of each
# attempt of the legacy wake command.
WAKE_RESULT_SCHEMA: dict[str, Any] = _schema(
    "Sidecar reports the outcome of one wake command attempt (legacy wake path).",
    {"task_id": "string", "status": "string"},
    {"attempt": "integer", "generation": "integer", "error": "string", "timestamp": "number"},
)

# Known only to newer hubs (`knows_agent_restarting=True`): sent before the
# sidecar restarts at the hub's `restart_sidecar`.
AGENT_RESTARTING_SCHEMA: dict[str, Any] = _schema(
    "Sidecar announces that it is about to restart.",
    {},
    {"reason": "string", "running_tasks": "integer", "wait_ms": "integer", "timestamp": "number"},
)

PRIORITIES = ("low", "normal", "urgent", "critical")

# Body of `POST /api/tasks`: the real hub's fields, plus the dev hub's own
# (those of a `task_assign`, for tests that inject exact frames).
POST_TASK_SCHEMA: dict[str, Any] = {
    "required": {},
    "optional": {
        "task_id": "string",
        "description": "string",
        "metadata": "object",
        "generation": "integer",
        "max_retries": "integer",
        "repo": "string",
        "branch": "string",
        "file_hints": ("list", "any"),
        "success_criteria": ("list", "any"),
        "verification_steps": ("list", "any"),
        "complexity": "object",
        "routing_decision": "object",
        "needed_capabilities": ("list", "string"),
        "assign_to": "string",
        "priority": "string",
        "complexity_tier": "string",
    },
    "description": "Submit a task to the queue (the real hub's fields, or those of task_assign).",
}


# Body of `POST /api/onboard/register`.
REGISTER_SCHEMA: dict[str, Any] = {
    "required": {"agent_id": "string"},
    "optional": {},
    "description": "Register a new agent; the answer carries its token.",
}


def ws_schemas(
    knows_state_report: bool = False, *, wake_result: bool = False, agent_restarting: bool = False
) -> dict[str, dict[str, Any]]:
    """The WebSocket schemas a hub of this vintage accepts.

    A stock hub knows none of the three newer types; each flag adds one.
    """
    schemas = dict(WS_SCHEMAS)
    if knows_state_report:
        schemas["state_report"] = STATE_REPORT_SCHEMA
    if wake_result:
        schemas["wake_result"] = WAKE_RESULT_SCHEMA
    if agent_restarting:
        schemas["agent_restarting"] = AGENT_RESTARTING_SCHEMA
    return schemas


def type_name(value: Any) -> str:
    """The hub's name for a JSON value's type (its `type_name/1`)."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    return "unknown"


def _format_type(t: FieldType) -> str:
    if isinstance(t, tuple):
        return f"array<{_format_type(t[1])}>"
    return t


def _valid(value: Any, t: FieldType) -> bool:
    if isinstance(t, tuple):
        return isinstance(value, list) and all(_valid(v, t[1]) for v in value)
    if t == "string":
        return isinstance(value, str)
    if t == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if t == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t == "object":
        return isinstance(value, dict)
    if t == "boolean":
        return isinstance(value, bool)
    return t == "any"


def _check_field(field: str, value: Any, t: FieldType) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    if isinstance(t, tuple):
        if not isinstance(value, list):
            errors.append(_wrong(field, "array", value))
        else:
            for idx, item in enumerate(value):
                if not _valid(item, t[1]):
                    errors.append(_wrong(f"{field}[{idx}]", _format_type(t[1]), item))
                    break
    elif not _valid(value, t):
        errors.append(_wrong(field, t, value))
    limit = LENGTH_LIMITS.get(field)
    if limit is not None and isinstance(value, str) and len(value) > limit:
        errors.append(
            {
                "field": field,
                "error": "too_long",
                "detail": f"exceeds maximum length of {limit} characters",
                "value": value[:50] + "...",
            }
        )
    return errors


def _wrong(field: str, expected: str, value: Any) -> dict[str, Any]:
    return {
        "field": field,
        "error": "wrong_type",
        "detail": f"expected {expected}, got {type_name(value)}",
        "value": value,
    }


def validate_against(data: Mapping[str, Any], schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Check `data` against one schema; an empty list means valid."""
    errors: list[dict[str, Any]] = []
    for field, t in schema["required"].items():
        value = data.get(field)
        if value is None:
            errors.append({"field": field, "error": "required", "detail": "field is required"})
        else:
            errors += _check_field(field, value, t)
    for field, t in schema["optional"].items():
        value = data.get(field)
        if value is not None:
            errors += _check_field(field, value, t)
    return errors


def validate_ws_message(
    msg: Mapping[str, Any],
    knows_state_report: bool = False,
    *,
    schemas: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Validate one decoded WebSocket frame (a JSON object) as the hub does.

    `schemas`: the hub's own set (`ws_schemas(...)`); by default a stock hub's,
    with `state_report` when `knows_state_report`.
    """
    if schemas is None:
        schemas = ws_schemas(knows_state_report)
    if "type" not in msg:
        return [{"field": "type", "error": "required", "detail": "field is required"}]
    mtype = msg["type"]
    if not isinstance(mtype, str):
        return [_wrong("type", "string", mtype)]
    schema = schemas.get(mtype)
    if schema is None:
        return [
            {
                "field": "type",
                "error": "unknown_message_type",
                "detail": f"unknown message type '{mtype}'",
                "known_types": sorted(schemas),
            }
        ]
    return validate_against(msg, schema)


def _fields_json(fields: Mapping[str, FieldType]) -> list[dict[str, str]]:
    return [{"name": name, "type": _format_type(t)} for name, t in fields.items()]


def schemas_json(
    knows_state_report: bool = False, *, schemas: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The body of `GET /api/schemas`, in the real hub's format."""
    if schemas is None:
        schemas = ws_schemas(knows_state_report)
    ws = [
        {
            "type": mtype,
            "description": schema["description"],
            "required_fields": _fields_json(schema["required"]),
            "optional_fields": _fields_json(schema["optional"]),
        }
        for mtype, schema in sorted(schemas.items())
    ]
    http = [
        {
            "key": "post_task",
            "description": POST_TASK_SCHEMA["description"],
            "required_fields": _fields_json(POST_TASK_SCHEMA["required"]),
            "optional_fields": _fields_json(POST_TASK_SCHEMA["optional"]),
        }
    ]
    return {"websocket": ws, "http": http, "version": "1.0"}
