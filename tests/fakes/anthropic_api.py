"""A local fake of Anthropic's Messages API, for driving the real Claude Code CLI offline.

A real HTTP server (hypercorn on trio, raw ASGI) on 127.0.0.1, port 0. It serves
`POST /v1/messages` (the CLI adds `?beta=true`) as server-sent events in the order
and shape the real API uses (`message_start` with usage, `content_block_start`,
`ping`, many `content_block_delta` text deltas, `content_block_stop`,
`message_delta` with stop_reason and output usage, `message_stop`), or as one JSON
message when the request says `"stream": false`. It also answers
`POST /v1/messages/count_tokens`, and a 404 in the API's error shape for
anything else. Every request is recorded so tests can assert what arrived.

What each request gets is a `Scenario`: set `api.scenario` for all requests, or
`api.choose` to pick one per request.

    async with serve_fake_anthropic() as api:
        api.scenario = Scenario(text="hello", chunk=3)
        env["ANTHROPIC_BASE_URL"] = api.base_url
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve

_ids = itertools.count(1)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@attrs.define
class Scenario:
    """How to answer one `/v1/messages` request.

    kind:
      - "text": a normal reply of `text`, cut into deltas of `chunk` characters.
      - "error": HTTP `status` with an API error body (`error_type`, `message`).
      - "slow": like "text", but one delta every `delay_s`; `deltas` of them
        (None: forever), each delta being `text`.
      - "stream_error": a normal start, `deltas` deltas of `text`, then an SSE
        `error` event (`error_type`, `message`) as the API sends on overload.
      - "tool_use": a `tool_use` block calling `tool_name` with `tool_input`, on
        the first request; later requests (carrying the tool result) get `text`.
    """

    kind: str = "text"
    text: str = "Hello from the fake API."
    chunk: int = 4
    input_tokens: int = 21
    output_tokens: int = 9
    cache_creation_input_tokens: int = 3
    cache_read_input_tokens: int = 5
    model: str | None = None  # None: echo the requested model
    status: int = 400
    error_type: str = "invalid_request_error"
    message: str = "fake: prompt is not acceptable"
    delay_s: float = 0.05
    deltas: int | None = None
    tool_name: str = "Bash"
    tool_input: dict[str, Any] = attrs.field(factory=lambda: {"command": "sleep 1000"})


@attrs.define
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def text_of_messages(self) -> str:
        """All user-visible text in the request's `messages` (string or block content)."""
        data = self.json()
        parts: list[str] = []
        for msg in data.get("messages", []) if isinstance(data, dict) else []:
            content = msg.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                for block in content:
                    if isinstance(block, dict):
                        if isinstance(block.get("text"), str):
                            parts.append(block["text"])
                        if isinstance(block.get("content"), str):
                            parts.append(block["content"])
        return "\n".join(parts)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chunks(text: str, size: int) -> list[str]:
    size = max(1, size)
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _usage(sc: Scenario, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": sc.input_tokens,
        "cache_creation_input_tokens": sc.cache_creation_input_tokens,
        "cache_read_input_tokens": sc.cache_read_input_tokens,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _has_tool_result(req: RecordedRequest) -> bool:
    data = req.json()
    if not isinstance(data, dict):
        return False
    for msg in data.get("messages", []):
        content = msg.get("content")
        if isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        ):
            return True
    return False


class FakeAnthropic:
    """The ASGI app plus what tests look at: `requests`, `scenario`, `base_url`."""

    def __init__(self) -> None:
        self.scenario = Scenario()
        self.choose: Callable[[RecordedRequest], Scenario] | None = None
        self.requests: list[RecordedRequest] = []
        self.base_url = ""
        self.stream_started = trio.Event()  # set when a /v1/messages answer has begun
        self.streams_open = 0

    def message_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/messages"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        req = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            query=parse_qs(scope.get("query_string", b"").decode()),
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=body,
        )
        self.requests.append(req)
        if req.method == "POST" and req.path == "/v1/messages":
            await self._messages(req, send)
        elif req.method == "POST" and req.path == "/v1/messages/count_tokens":
            data = req.json() or {}
            estimate = max(1, len(json.dumps(data.get("messages", []))) // 4)
            await self._json(send, 200, {"input_tokens": estimate})
        elif req.method in ("HEAD", "GET") and req.path in ("/", ""):
            await self._json(send, 200, {})
        else:
            await self._json(send, 404, _error_body("not_found_error", f"fake: no route {req.path}"))

    async def _json(self, send: Send, status: int, obj: dict[str, Any]) -> None:
        payload = json.dumps(obj).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"request-id", f"req_fake{next(_ids):06d}".encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _messages(self, req: RecordedRequest, send: Send) -> None:
        sc = self.choose(req) if self.choose is not None else self.scenario
        data = req.json() or {}
        model = sc.model or str(data.get("model") or "claude-fake-1")
        if sc.kind == "error":
            await self._json(send, sc.status, _error_body(sc.error_type, sc.message))
            return
        msg_id = f"msg_fake{next(_ids):06d}"
        tool = sc.kind == "tool_use" and not _has_tool_result(req)
        if not data.get("stream"):
            content: list[dict[str, Any]]
            if tool:
                content = [
                    {
                        "type": "tool_use",
                        "id": f"toolu_fake{next(_ids):06d}",
                        "name": sc.tool_name,
                        "input": sc.tool_input,
                    }
                ]
            else:
                content = [{"type": "text", "text": sc.text}]
            await self._json(
                send,
                200,
                {
                    "id": msg_id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": content,
                    "stop_reason": "tool_use" if tool else "end_turn",
                    "stop_sequence": None,
                    "usage": _usage(sc, sc.output_tokens),
                },
            )
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"request-id", f"req_fake{next(_ids):06d}".encode()),
                ],
            }
        )

        async def emit(event: str, payload: dict[str, Any]) -> None:
            await send({"type": "http.response.body", "body": _sse(event, payload), "more_body": True})

        self.streams_open += 1
        try:
            await emit(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": msg_id,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": _usage(sc, 1),
                    },
                },
            )
            self.stream_started.set()
            if tool:
                await emit(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {
                            "type": "tool_use",
                            "id": f"toolu_fake{next(_ids):06d}",
                            "name": sc.tool_name,
                            "input": {},
                        },
                    },
                )
                await emit(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": json.dumps(sc.tool_input)},
                    },
                )
                await emit("content_block_stop", {"type": "content_block_stop", "index": 0})
                await emit(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                        "usage": {"output_tokens": sc.output_tokens},
                    },
                )
                await emit("message_stop", {"type": "message_stop"})
                await send({"type": "http.response.body", "body": b""})
                return
            await emit(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            await emit("ping", {"type": "ping"})
            if sc.kind in ("slow", "stream_error"):
                for n in itertools.count():
                    if sc.deltas is not None and n >= sc.deltas:
                        break
                    await emit(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": sc.text},
                        },
                    )
                    if sc.kind == "slow":
                        await trio.sleep(sc.delay_s)
                if sc.kind == "stream_error":
                    await emit("error", _error_body(sc.error_type, sc.message))
                    await send({"type": "http.response.body", "body": b""})
                    return
            else:
                for piece in _chunks(sc.text, sc.chunk):
                    await emit(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": piece},
                        },
                    )
            await emit("content_block_stop", {"type": "content_block_stop", "index": 0})
            await emit(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": sc.output_tokens},
                },
            )
            await emit("message_stop", {"type": "message_stop"})
            await send({"type": "http.response.body", "body": b""})
        finally:
            self.streams_open -= 1


@asynccontextmanager
async def serve_fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    """Run the fake API on 127.0.0.1 (port 0) for the duration of the block."""
    app = FakeAnthropic()
    cfg = HyperConfig()
    cfg.bind = ["127.0.0.1:0"]
    cfg.accesslog = None
    cfg.errorlog = None
    cfg.graceful_timeout = 0.1
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, cfg)
        app.base_url = binds[0]
        try:
            yield app
        finally:
            nursery.cancel_scope.cancel()
