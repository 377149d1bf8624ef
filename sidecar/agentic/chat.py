"""One model turn: `POST /api/chat` with tools, streamed or whole, read to its end.

The reply is read as NDJSON either way: a streamed answer is many lines, a
`"stream": false` answer is one. Content deltas become `token` progress as
they come; `message.tool_calls` may arrive in any line and are gathered. Only
a line with `done: true` ends a turn well. Leaving the `async with` of
`client.stream` closes the connection, so a cancelled turn stops at once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import attrs
import httpx
import trio

_ERROR_BODY_CAP = 64 * 1024
_HEADERS = {"Accept": "application/x-ndjson", "Accept-Encoding": "identity"}

TokenCallback = Callable[[str], Awaitable[None]]


class ModelError(Exception):
    """A failed turn: `reason` for code, the message for people, `transient` for retries."""

    def __init__(self, reason: str, error: str, transient: bool) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.transient = transient


@attrs.define
class Reply:
    """What one turn brought: the assistant's text, its tool calls, the counters."""

    content: str = ""
    tool_calls: list[Any] = attrs.field(factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    done_reason: str | None = None

    def message(self) -> dict[str, Any]:
        """The assistant message to put back into the conversation."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = self.tool_calls
        return msg


def count_of(value: Any) -> int:
    """A token count from an Ollama reply (anything but a non-bool int is 0)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def error_text(body: bytes) -> str:
    """The `error` of Ollama's `{"error": …}` body, else the body text itself."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(obj, dict) and isinstance(obj.get("error"), str):
        return str(obj["error"])
    return text[:500]


async def chat_turn(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    *,
    http_timeout: httpx.Timeout,
    idle_s: float,
    on_token: TokenCallback,
) -> Reply:
    """Run one chat request to its `done` line. Raises ModelError; Cancelled propagates."""
    where = f"Ollama at {url}"
    try:
        async with http.stream(
            "POST", url + "/api/chat", json=body, headers=_HEADERS, timeout=http_timeout
        ) as response:
            if response.status_code != 200:
                raw = b""
                async for data in response.aiter_bytes():
                    raw += data
                    if len(raw) >= _ERROR_BODY_CAP:
                        break
                status = response.status_code
                raise ModelError(
                    f"ollama_http_{status}",
                    f"{where} answered HTTP {status}: {error_text(raw)}",
                    status >= 500 or status in (408, 429),
                )
            # Closed explicitly when the reply ends early (done line, error, idle).
            lines_gen = cast(AsyncGenerator[str, None], response.aiter_lines())
            async with contextlib.aclosing(lines_gen) as lines:
                return await _read(lines, where, idle_s, on_token)
    except ModelError:
        raise
    except httpx.ConnectError as exc:
        detail = str(exc) or type(exc).__name__
        raise ModelError("ollama_unreachable", f"cannot reach {where}: {detail}", True) from exc
    except httpx.ConnectTimeout as exc:
        raise ModelError("ollama_unreachable", f"cannot reach {where}: connect timed out", True) from exc
    except httpx.ReadTimeout as exc:
        raise ModelError("ollama_load_timeout", f"{where} did not begin its answer in time", True) from exc
    except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:
        raise ModelError("ollama_connection_lost", f"connection to {where} lost: {exc}", True) from exc
    except httpx.HTTPError as exc:
        raise ModelError("ollama_transport", f"{where}: {exc or type(exc).__name__}", True) from exc


async def _read(lines: AsyncIterator[str], where: str, idle_s: float, on_token: TokenCallback) -> Reply:
    reply = Reply()
    parts: list[str] = []
    while True:
        with trio.move_on_after(idle_s) as waited:
            try:
                line = await lines.__anext__()
            except StopAsyncIteration:
                raise ModelError(
                    "ollama_truncated", f"truncated reply: {where} ended without done:true", True
                ) from None
        if waited.cancelled_caught:
            raise ModelError("ollama_idle_timeout", f"{where} sent nothing for {idle_s:g} s", True)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise ModelError("ollama_bad_json", f"unusable line from {where}: {line[:200]!r}", False)
        if "error" in obj:
            raise ModelError("ollama_error", f"{where} reported an error: {obj['error']}", True)
        msg = obj.get("message")
        if isinstance(msg, dict):
            content = msg.get("content")
            if isinstance(content, str) and content:
                parts.append(content)
                await on_token(content)
            calls = msg.get("tool_calls")
            if isinstance(calls, list):
                reply.tool_calls.extend(calls)
        if obj.get("done") is True:
            reply.content = "".join(parts)
            reply.prompt_tokens = count_of(obj.get("prompt_eval_count"))
            reply.output_tokens = count_of(obj.get("eval_count"))
            done_reason = obj.get("done_reason")
            reply.done_reason = done_reason if isinstance(done_reason, str) else None
            return reply
