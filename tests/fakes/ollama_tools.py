"""A scripted Ollama server for `/api/chat` with tools: a conversation played step by step.

Each chat request gets the next `Step`: some content (streamed word by word),
native `tool_calls` (in the chunk the step names: Ollama sends them in a
content line, not only in the last one), and the counters of the `done` line.
Streamed as Ollama streams (chunked NDJSON) unless the request says
`"stream": false` or the step says `whole=True`, then one JSON object, as a
server that does not stream answers. Built on `ollama_server.OllamaServer`
(same HTTP plumbing, models, 404s); `tests/test_agentic_server.py` shows the
official `ollama` client parses these replies, tool calls included.

    async with open_tool_server([Step(calls=[call("read_file", path="a")]), Step("done")]) as srv:
        ...
        srv.chat_requests[1].json["messages"][-1]  # the tool result we sent back
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from .ollama_server import DEFAULT_MODELS, OllamaServer, Request, _Conn, _created_at, _http_date, _words


def call(name: str, **arguments: Any) -> dict[str, Any]:
    """One native tool call in Ollama's wire shape."""
    return {"function": {"name": name, "arguments": arguments}}


@attrs.define
class Step:
    """One model reply.

    - `content`: the assistant's text, streamed in word-sized chunks;
    - `calls`: native tool calls; sent in content chunk `calls_at` (0-based;
      None: in the `done` line; a value past the last chunk: in a chunk of their own);
    - `prompt_tokens` / `output_tokens`: the `done` line's `prompt_eval_count` / `eval_count`;
    - `whole`: answer as one JSON object even when asked to stream;
    - `status`: answer this HTTP status with `{"error": …}` instead;
    - `stall_after`: after this many chunks send nothing more (until the client goes);
    - `done_reason`: the `done` line's reason (`length`: cut at the token limit).
    """

    content: str = ""
    calls: list[dict[str, Any]] = attrs.field(factory=list)
    calls_at: int | None = 0
    prompt_tokens: int = 10
    output_tokens: int = 5
    whole: bool = False
    status: int | None = None
    stall_after: int | None = None
    done_reason: str = "stop"


class ToolServer(OllamaServer):
    """`OllamaServer` whose chats play `steps` in order (then: 500 "script exhausted")."""

    def __init__(self, steps: list[Step], models: tuple[str, ...] | list[str] = DEFAULT_MODELS) -> None:
        super().__init__(models)
        self.steps = list(steps)
        self.turn = 0

    async def _chat(self, conn: _Conn, req: Request) -> bool:
        body = req.json
        if not isinstance(body, dict) or body.get("model") not in self.models:
            return await super()._chat(conn, req)
        if self.turn >= len(self.steps):
            return await conn.send_json(500, {"error": "script exhausted"})
        step = self.steps[self.turn]
        self.turn += 1
        if step.status is not None:
            return await conn.send_json(step.status, {"error": f"scripted HTTP {step.status}"})
        model = body["model"]
        pieces = _words(step.content)
        if step.whole or body.get("stream", True) is False:
            msg: dict[str, Any] = {"role": "assistant", "content": step.content}
            if step.calls:
                msg["tool_calls"] = step.calls
            return await conn.send_json(200, _done(model, msg, step))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, conn, req, nursery.cancel_scope)
            try:
                await self._stream(conn, req, model, pieces, step)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                req.client_gone.set()
            nursery.cancel_scope.cancel()
        return not req.client_gone.is_set()

    async def _stream(self, conn: _Conn, req: Request, model: str, pieces: list[str], step: Step) -> None:
        await conn.send_raw(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            + f"Date: {_http_date()}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        lines: list[dict[str, Any]] = []
        for i, piece in enumerate(pieces):
            msg: dict[str, Any] = {"role": "assistant", "content": piece}
            if step.calls and step.calls_at == i:
                msg["tool_calls"] = step.calls
            lines.append(msg)
        if step.calls and step.calls_at is not None and step.calls_at >= len(pieces):
            lines.append({"role": "assistant", "content": "", "tool_calls": step.calls})
        for i, msg in enumerate(lines):
            if step.stall_after == i:
                await trio.sleep_forever()  # ended by the watcher when the client goes
            line = {"model": model, "created_at": _created_at(), "message": msg, "done": False}
            await _send_chunk(conn, line)
            req.chunks_sent = i + 1
        if step.stall_after is not None:
            await trio.sleep_forever()
        final: dict[str, Any] = {"role": "assistant", "content": ""}
        if step.calls and step.calls_at is None:
            final["tool_calls"] = step.calls
        await _send_chunk(conn, _done(model, final, step), last=True)


def _done(model: str, message: dict[str, Any], step: Step) -> dict[str, Any]:
    return {
        "model": model,
        "created_at": _created_at(),
        "message": message,
        "done": True,
        "done_reason": step.done_reason,
        "total_duration": 3_000_000,
        "load_duration": 1_000_000,
        "prompt_eval_count": step.prompt_tokens,
        "prompt_eval_duration": 500_000,
        "eval_count": step.output_tokens,
        "eval_duration": 1_500_000,
    }


async def _send_chunk(conn: _Conn, obj: dict[str, Any], *, last: bool = False) -> None:
    line = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    await conn.send_raw(b"%x\r\n" % len(line) + line + b"\r\n" + (b"0\r\n\r\n" if last else b""))


@asynccontextmanager
async def open_tool_server(steps: list[Step]) -> AsyncIterator[ToolServer]:
    """Run a `ToolServer` on 127.0.0.1, a free port, for the block's duration."""
    server = ToolServer(steps)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
