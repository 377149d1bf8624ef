"""The dev hub's HTTP API, as a raw ASGI handler.

- `GET  /api/schemas`          the WebSocket schemas this hub accepts (no auth)
- `GET  /health`               liveness and connected agents (no auth)
- `POST /api/tasks`            submit (body shaped like `task_assign`) → 201 {task_id, generation, status}
- `GET  /api/tasks`            {"tasks": [...]}
- `GET  /api/tasks/ID`         one task: status, generation, assigned_to, progress, result, error, acks, …
- `POST /api/tasks/ID/cancel`  cancel → {task_id, status}

`/api/tasks*` require `Authorization: Bearer <api_token>` when the hub has one.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..asgi import ASGIReceive, ASGISend
from .schemas import POST_TASK_SCHEMA, schemas_json, validate_against

if TYPE_CHECKING:
    from .hub import DevHub

MAX_BODY = 1 << 20


async def _respond(send: ASGISend, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive: ASGIReceive) -> bytes | None:
    """The request body, or None if it is over MAX_BODY."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _authorized(hub: DevHub, scope: dict[str, Any]) -> bool:
    if hub.config.api_token is None:
        return True
    headers = dict(scope.get("headers") or [])
    return bool(headers.get(b"authorization", b"") == b"Bearer " + hub.config.api_token.encode())


async def handle_http(hub: DevHub, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
    method, path = scope["method"], scope["path"].rstrip("/") or "/"
    parts = path.strip("/").split("/")
    if path == "/api/schemas" and method == "GET":
        await _respond(send, 200, schemas_json(hub.config.knows_state_report))
        return
    if path == "/health" and method == "GET":
        await _respond(
            send, 200, {"status": "ok", "service": "devhub", "agents_connected": len(hub.agents())}
        )
        return
    if parts[:2] != ["api", "tasks"] or len(parts) > 4:
        await _respond(send, 404, {"error": "not_found"})
        return
    if not _authorized(hub, scope):
        await _respond(send, 401, {"error": "unauthorized"})
        return
    if len(parts) == 2:
        if method == "GET":
            await _respond(send, 200, {"tasks": [t.to_json() for t in hub.tasks()]})
        elif method == "POST":
            await _submit(hub, receive, send)
        else:
            await _respond(send, 405, {"error": "method_not_allowed"})
        return
    task_id = parts[2]
    if task_id not in hub.state.tasks:
        await _respond(send, 404, {"error": "task_not_found"})
        return
    if len(parts) == 3 and method == "GET":
        await _respond(send, 200, hub.task(task_id).to_json())
    elif len(parts) == 4 and parts[3] == "cancel" and method == "POST":
        if hub.cancel(task_id):
            await _respond(send, 200, {"task_id": task_id, "status": "cancelled"})
        else:
            await _respond(send, 409, {"error": "task_finished", "status": hub.task(task_id).status})
    else:
        await _respond(
            send, 405 if len(parts) == 3 or parts[3] == "cancel" else 404, {"error": "not_allowed"}
        )


async def _submit(hub: DevHub, receive: ASGIReceive, send: ASGISend) -> None:
    raw = await _read_body(receive)
    if raw is None:
        await _respond(send, 413, {"error": "body_too_large"})
        return
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        await _respond(send, 400, {"error": "invalid_json"})
        return
    if not isinstance(body, dict):
        await _respond(send, 400, {"error": "expected a JSON object"})
        return
    errors = validate_against(body, POST_TASK_SCHEMA)
    if errors:
        await _respond(send, 422, {"error": "validation_failed", "errors": errors})
        return
    try:
        task_id = hub.submit(body)
    except ValueError as exc:
        await _respond(send, 409, {"error": str(exc)})
        return
    rec = hub.task(task_id)
    await _respond(send, 201, {"task_id": task_id, "generation": rec.generation, "status": rec.status})
