"""Small HTTP helpers of the dev hub's raw-ASGI API: JSON answers, bodies, Bearer auth."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..asgi import ASGIReceive, ASGISend

if TYPE_CHECKING:
    from .hub import DevHub

MAX_BODY = 1 << 20


class BadBody(Exception):
    """A request body we cannot use; `status` and `body` are the answer."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("error"))
        self.status = status
        self.body = body


async def respond(send: ASGISend, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def read_body(receive: ASGIReceive) -> bytes | None:
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


async def read_json_object(receive: ASGIReceive) -> dict[str, Any]:
    """The body as a JSON object (empty body: `{}`); raises BadBody otherwise."""
    raw = await read_body(receive)
    if raw is None:
        raise BadBody(413, {"error": "body_too_large"})
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise BadBody(400, {"error": "invalid_json"}) from None
    if not isinstance(body, dict):
        raise BadBody(400, {"error": "expected a JSON object"})
    return body


def bearer(scope: dict[str, Any]) -> str | None:
    """The request's `Authorization` value without `Bearer ` ("" if malformed), None if absent."""
    headers = dict(scope.get("headers") or [])
    value = headers.get(b"authorization")
    if value is None:
        return None
    text = value.decode("latin-1")
    return text[len("Bearer ") :] if text.startswith("Bearer ") else ""


def authorized(hub: DevHub, scope: dict[str, Any], *, required: bool = False) -> bool:
    """Bearer auth: the hub's `api_token` or any agent's token.

    Without an Authorization header a request passes only on an open hub (no
    `api_token`, no `require_auth`) and when the route does not `require` one.
    A header that is sent is always checked.
    """
    token = bearer(scope)
    cfg = hub.config
    if token is None:
        return not required and cfg.api_token is None and not cfg.require_auth
    if not token:
        return False
    if cfg.api_token is not None and token == cfg.api_token:
        return True
    owners = hub.tokens.owners(token)
    return owners is None or bool(owners)
