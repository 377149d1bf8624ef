"""The dev hub's HTTP API, as a raw ASGI handler.

The real hub's routes, with its shapes (protocol.md, "The hub's HTTP API"):

- `GET  /health`                  {"status":"ok","service":"agent_com","agents_connected":N} (no auth)
- `GET  /api/schemas`             the WebSocket schemas this hub accepts (no auth)
- `GET  /api/agents`, `POST /api/onboard/register`, `GET /api/config/default-repo`,
  `DELETE /admin/tokens/NAME`     see `fleetapi`
- `POST /api/tasks`               the real hub's body (description, priority, metadata, …,
                                  complexity_tier) or a `task_assign`'s fields →
                                  201 {status:"queued", task_id, priority, created_at, generation}
- `GET  /api/tasks/ID`            the task (status, generation, assigned_to, progress, result, …)
                                  or 404 {error:"task_not_found", task_id}

and the dev hub's own, for tests:

- `GET  /api/tasks`               {"tasks": [...]}
- `POST /api/tasks/ID/cancel`     cancel → {task_id, status}

`/api/tasks*` take `Authorization: Bearer <token>` (the hub's `api_token` or
any agent's token); see `httpio.authorized` for when one is required.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..asgi import ASGIReceive, ASGISend
from .fleetapi import handle_fleet_route
from .httpio import BadBody, authorized, read_json_object, respond
from .schemas import POST_TASK_SCHEMA, PRIORITIES, schemas_json, validate_against

if TYPE_CHECKING:
    from .hub import DevHub

# The real hub's router for an explicit complexity tier: trivial work goes to
# the sidecar's shell path, the rest by tier (see dispatcher.target_of).
_TIERS = ("trivial", "standard", "complex")


async def handle_http(hub: DevHub, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
    method, path = scope["method"], scope["path"].rstrip("/") or "/"
    parts = path.strip("/").split("/")
    if path == "/api/schemas" and method == "GET":
        await respond(send, 200, schemas_json(schemas=hub.schemas))
        return
    if path == "/health" and method == "GET":
        await respond(
            send, 200, {"status": "ok", "service": "agent_com", "agents_connected": len(hub.agents())}
        )
        return
    if await handle_fleet_route(hub, method, parts, scope, receive, send):
        return
    if parts[:2] != ["api", "tasks"] or len(parts) > 4:
        await respond(send, 404, {"error": "not_found"})
        return
    if not authorized(hub, scope):
        await respond(send, 401, {"error": "unauthorized"})
        return
    if len(parts) == 2:
        if method == "GET":
            await respond(send, 200, {"tasks": [t.to_json() for t in hub.tasks()]})
        elif method == "POST":
            await _submit(hub, receive, send)
        else:
            await respond(send, 405, {"error": "method_not_allowed"})
        return
    task_id = parts[2]
    if task_id not in hub.state.tasks:
        await respond(send, 404, {"error": "task_not_found", "task_id": task_id})
        return
    if len(parts) == 3 and method == "GET":
        await respond(send, 200, hub.task(task_id).to_json())
    elif len(parts) == 4 and parts[3] == "cancel" and method == "POST":
        if hub.cancel(task_id):
            await respond(send, 200, {"task_id": task_id, "status": "cancelled"})
        else:
            await respond(send, 409, {"error": "task_finished", "status": hub.task(task_id).status})
    else:
        await respond(send, 405 if len(parts) == 3 or parts[3] == "cancel" else 404, {"error": "not_allowed"})


def _check_enums(body: dict[str, Any]) -> list[dict[str, Any]]:
    errors: list[dict[str, Any]] = []
    for field, allowed in (("priority", PRIORITIES), ("complexity_tier", _TIERS)):
        value = body.get(field)
        if isinstance(value, str) and value not in allowed:
            errors.append(
                {
                    "field": field,
                    "error": "invalid_value",
                    "detail": f"must be one of {', '.join(allowed)}",
                    "value": value,
                }
            )
    return errors


def _routed(body: dict[str, Any]) -> dict[str, Any]:
    """A real-hub body with an explicit `complexity_tier`: add what the hub's router adds."""
    tier = body.get("complexity_tier")
    if not isinstance(tier, str) or "routing_decision" in body:
        return body
    complexity = {"effective_tier": tier, "source": "explicit", "explicit_tier": tier, "inferred": None}
    decision = {
        "effective_tier": tier,
        "target_type": "sidecar" if tier == "trivial" else None,
        "selected_endpoint": None,
        "selected_model": None,
        "fallback_used": False,
        "fallback_reason": None,
        "classification_reason": "explicit complexity_tier",
        "estimated_cost_tier": None,
    }
    return {"complexity": complexity, **body, "routing_decision": decision}


async def _submit(hub: DevHub, receive: ASGIReceive, send: ASGISend) -> None:
    try:
        body = await read_json_object(receive)
    except BadBody as exc:
        await respond(send, exc.status, exc.body)
        return
    errors = validate_against(body, POST_TASK_SCHEMA) or _check_enums(body)
    if errors:
        await respond(send, 422, {"error": "validation_failed", "errors": errors})
        return
    try:
        task_id = hub.submit(_routed(body))
    except ValueError as exc:
        await respond(send, 409, {"error": str(exc)})
        return
    rec = hub.task(task_id)
    # As the real hub: the answer describes the task as queued, even if it was
    # given to an idle agent at once (GET /api/tasks/ID tells what happened next).
    await respond(
        send,
        201,
        {
            "status": "queued",
            "task_id": task_id,
            "priority": rec.fields.get("priority") or "normal",
            "created_at": rec.created_at_ms,
            "generation": int(body.get("generation") or 0),
        },
    )
