"""The dev hub's fleet routes, with the real hub's shapes.

- `GET    /api/agents`               {"agents": [{agent_id, name, status, capabilities}]} (no auth)
- `POST   /api/onboard/register`     {"agent_id"} (no auth) → 201 {agent_id, token, hub_ws_url,
                                     hub_api_url, default_repo}; 409 {"error":"agent_id already
                                     registered"}; 422 {"error":"validation_failed","errors":[…]}
- `GET    /api/config/default-repo`  {"default_repo": URL | null, "configured": bool}
- `DELETE /admin/tokens/NAME`        (Bearer, always required) → 200 {"status":"revoked","agent_id"};
                                     404 {"error":"not_found"}
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from ..asgi import ASGIReceive, ASGISend
from .httpio import BadBody, authorized, read_json_object, respond
from .schemas import REGISTER_SCHEMA, validate_against

if TYPE_CHECKING:
    from .hub import DevHub

AGENT_ID_RE = re.compile(r"[A-Za-z0-9._-]+")


async def handle_fleet_route(
    hub: DevHub, method: str, parts: list[str], scope: dict[str, Any], receive: ASGIReceive, send: ASGISend
) -> bool:
    """Answer one of the fleet routes; False if the path is not one of them."""
    if parts == ["api", "agents"] and method == "GET":
        agents = [
            {"agent_id": a, "name": a, "status": "connected", "capabilities": s.capabilities}
            for a, s in sorted(hub.agents().items())
        ]
        await respond(send, 200, {"agents": agents})
    elif parts == ["api", "config", "default-repo"] and method == "GET":
        repo = hub.config.default_repo
        await respond(send, 200, {"default_repo": repo, "configured": repo is not None})
    elif parts == ["api", "onboard", "register"] and method == "POST":
        await _register(hub, receive, send)
    elif parts[:2] == ["admin", "tokens"] and len(parts) == 3 and method == "DELETE":
        if not authorized(hub, scope, required=True):
            await respond(send, 401, {"error": "unauthorized"})
        elif hub.tokens.revoke(parts[2]):
            await respond(send, 200, {"status": "revoked", "agent_id": parts[2]})
        else:
            await respond(send, 404, {"error": "not_found", "agent_id": parts[2]})
    else:
        return False
    return True


async def _register(hub: DevHub, receive: ASGIReceive, send: ASGISend) -> None:
    try:
        body = await read_json_object(receive)
    except BadBody as exc:
        await respond(send, exc.status, exc.body)
        return
    errors = validate_against(body, REGISTER_SCHEMA)
    agent_id = body.get("agent_id")
    if not errors and isinstance(agent_id, str) and not AGENT_ID_RE.fullmatch(agent_id):
        errors = [
            {
                "field": "agent_id",
                "error": "invalid_format",
                "detail": "letters, digits, '.', '_' and '-' only",
                "value": agent_id[:50],
            }
        ]
    if errors or not isinstance(agent_id, str):
        await respond(send, 422, {"error": "validation_failed", "errors": errors})
        return
    token = hub.tokens.register(agent_id)
    if token is None:
        await respond(send, 409, {"error": "agent_id already registered"})
        return
    await respond(
        send,
        201,
        {
            "agent_id": agent_id,
            "token": token,
            "hub_ws_url": hub.ws_url,
            "hub_api_url": hub.api_url,
            "default_repo": hub.config.default_repo,
        },
    )
