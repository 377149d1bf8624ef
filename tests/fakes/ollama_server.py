"""A faithful fake Ollama server: HTTP/1.1 on a raw Trio socket, for tests and benches.

It streams `POST /api/chat` as Ollama does: `Content-Type: application/x-ndjson`,
`Transfer-Encoding: chunked`, one JSON object per line and per HTTP chunk,
content lines `{"model","created_at","message":{"role":"assistant","content"},"done":false}`
and a final line with `done:true`, `done_reason` and the counters and durations
(ns). `"stream": false` gets one JSON object. It also answers `GET /api/tags`,
`GET /api/version` and `GET /` ("Ollama is running"); an unknown model gets
Ollama's 404 `{"error":"model \\"x\\" not found, try pulling it first"}`.

Written on bare sockets (not ASGI) so it can misbehave as a real network does:
stall, reset the TCP connection (RST), or end a stream early. What a request
gets is a `Script`, chosen by model name:

- `server.queue` (one script per chat request, in order) while it lasts, else
  `server.scripts[model]`, else `server.default`, and then
- directives appended to the model name, so that out-of-process users (the
  chaos suite, demos) can choose too: `qwen3:8b!stall_after=3!delay_s=0.1`.
  The part before the first `!` must be a known model (else 404).

`"stream": false` honours only `status` and the reply; the misbehaviours
apply to streamed chats. Every request is recorded in `server.requests`
(`Request`: method, path, headers, body, json, which TCP connection), with
events tests can wait on (`client_gone`, `finished`).

    async with open_ollama_server() as srv:
        client = ollama.AsyncClient(host=srv.url)

Standalone: `python -m tests.fakes.ollama_server --port 11434` prints
`listening on http://127.0.0.1:PORT` and serves until interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

DEFAULT_MODELS = ("qwen3:8b", "llama3.2:3b", "bench")
VERSION = "0.12.6"
_MAX_HEAD = 64 * 1024
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


@attrs.define
class Script:
    """How to answer one chat request. Counts are content chunks sent before the event.

    - `reply`: the text to stream (None: "Echo: " + the last user message), cut
      into word-sized chunks as a tokenizer would; `chunks`: instead send this
      many generated chunks (benches).
    - `delay_s`: pause before each chunk (Trio clock).
    - `load_s`: pause before the response begins, headers included (Trio clock), as
      Ollama loads a cold model before it answers.
    - `stall_after`: after N chunks send nothing more, ever (until the client goes).
    - `reset_after`: after N chunks reset the TCP connection (RST).
    - `error_after`: after N chunks send the line `{"error": error_message}` and end.
    - `truncate_after`: after N chunks end the response cleanly without `done:true`.
    - `bad_line_after`: after N chunks send a line that is not JSON.
    - `status`: answer this HTTP status with `{"error": error_message}` at once.
    - `flush_every`: content lines per socket write (1 = each line on its own,
      as Ollama flushes; larger for benches: same bytes, fewer syscalls).
    """

    reply: str | None = None
    chunks: int | None = None
    delay_s: float = 0.0
    load_s: float = 0.0
    stall_after: int | None = None
    reset_after: int | None = None
    error_after: int | None = None
    truncate_after: int | None = None
    bad_line_after: int | None = None
    status: int | None = None
    error_message: str = "an error was encountered while running the model"
    done_reason: str = "stop"
    flush_every: int = 1


_SCRIPT_FIELDS = {a.name: a.type for a in attrs.fields(Script)}


def parse_directives(model: str, base: Script) -> tuple[str, Script]:
    """Split `name!key=value!…` into the model name and `base` with those changes."""
    name, *directives = model.split("!")
    changes: dict[str, Any] = {}
    for item in directives:
        key, _, value = item.partition("=")
        kind = _SCRIPT_FIELDS.get(key)
        if kind is None:
            raise ValueError(f"unknown directive {key!r}")
        if "int" in str(kind):
            changes[key] = int(value)
        elif "float" in str(kind):
            changes[key] = float(value)
        else:
            changes[key] = value
    return name, attrs.evolve(base, **changes)


@attrs.define(eq=False)
class Request:
    """One request as received, plus what became of its response."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int = 0  # which TCP connection (1, 2, …) carried it
    chunks_sent: int = 0
    client_gone: trio.Event = attrs.field(factory=trio.Event)
    finished: trio.Event = attrs.field(factory=trio.Event)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class _Closed(Exception):
    """The client closed or reset the connection."""


def _created_at() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e9):09d}Z"


def _http_date() -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())


def _words(text: str) -> list[str]:
    """Word-sized chunks keeping their spaces, as tokens stream from a model."""
    out: list[str] = []
    word = ""
    for ch in text:
        if ch == " " and word.strip():
            out.append(word)
            word = ""
        word += ch
    if word:
        out.append(word)
    return out


_VOCAB = [
    json.dumps(w).encode() for w in ("The", " quick", " brown", " fox", " jumps", " over", " a", " dog", ".")
]


class OllamaServer:
    """The server state: models, scripts, recorded requests. Serve with `serve`."""

    def __init__(self, models: tuple[str, ...] | list[str] = DEFAULT_MODELS) -> None:
        self.models = list(models)
        self.scripts: dict[str, Script] = {}
        self.default = Script()
        # Scripts for the next chat requests, one each, in order (then `scripts`/`default`).
        self.queue: list[Script] = []
        self.requests: list[Request] = []
        self.connections = 0  # TCP connections accepted so far
        self.url = ""
        self.port = 0

    @property
    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path == "/api/chat"]

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *, task_status: Any) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.port = listeners[0].socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        async with trio.open_nursery() as nursery:
            task_status.started(self)
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    # -- HTTP/1.1 plumbing -------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = _Conn(stream)
        self.connections += 1
        conn_id = self.connections
        try:
            while True:
                req = await conn.read_request()
                if req is None:
                    return
                req.connection = conn_id
                conn.head_only = req.method == "HEAD"
                self.requests.append(req)
                try:
                    keep = await self._route(conn, req)
                finally:
                    req.finished.set()
                if not keep or req.headers.get("connection", "").lower() == "close":
                    return
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _route(self, conn: _Conn, req: Request) -> bool:
        """Answer one request; False closes the connection afterwards."""
        if req.path == "/api/chat":
            if req.method != "POST":
                return await conn.send_text(405, "405 method not allowed")
            return await self._chat(conn, req)
        if req.method not in ("GET", "HEAD"):
            return await conn.send_text(404, "404 page not found")
        if req.path == "/":
            return await conn.send_text(200, "Ollama is running")
        if req.path == "/api/version":
            return await conn.send_json(200, {"version": VERSION})
        if req.path == "/api/tags":
            return await conn.send_json(200, {"models": [self._tag(m) for m in self.models]})
        return await conn.send_text(404, "404 page not found")

    def _tag(self, name: str) -> dict[str, Any]:
        family = name.split(":")[0]
        return {
            "name": name,
            "model": name,
            "modified_at": "2025-06-01T10:00:00.000000000Z",
            "size": 5_225_376_047,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "parameter_size": "8.2B",
                "quantization_level": "Q4_K_M",
            },
        }

    # -- /api/chat ---------------------------------------------------------

    async def _chat(self, conn: _Conn, req: Request) -> bool:
        try:
            body = req.json
        except ValueError as exc:
            return await conn.send_json(400, {"error": f"invalid character in JSON: {exc}"})
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            return await conn.send_json(400, {"error": "model is required"})
        model: str = body["model"]
        base = self.queue.pop(0) if self.queue else self.scripts.get(model, self.default)
        try:
            name, script = parse_directives(model, base)
        except ValueError as exc:
            return await conn.send_json(400, {"error": str(exc)})
        if name not in self.models and model not in self.scripts:
            return await conn.send_json(404, {"error": f'model "{model}" not found, try pulling it first'})
        if script.status is not None:
            return await conn.send_json(script.status, {"error": script.error_message})
        messages = body.get("messages") or []
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))
        if script.chunks is not None:
            pieces: list[bytes] = [_VOCAB[i % len(_VOCAB)] for i in range(script.chunks)]
        else:
            reply = script.reply
            if reply is None:
                users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
                reply = "Echo: " + str(users[-1].get("content", "")) if users else "Hello."
            pieces = [json.dumps(w).encode() for w in _words(reply)]
        if body.get("stream", True) is False:
            return await self._chat_whole(conn, model, pieces, prompt_tokens, script)
        keep = False
        async with trio.open_nursery() as nursery:
            # Watch the socket while streaming: EOF or RST means the client went away.
            nursery.start_soon(self._watch, conn, req, nursery.cancel_scope)
            try:
                keep = await self._chat_stream(conn, req, model, pieces, prompt_tokens, script)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The client reset the connection mid-write (a cancelled task): it is
                # gone, like an EOF seen by the watcher. Raised here it would come
                # out of this nursery as an exception group the server loop misses.
                req.client_gone.set()
            nursery.cancel_scope.cancel()
        if req.client_gone.is_set():
            return False
        return keep

    async def _watch(self, conn: _Conn, req: Request, scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await conn.stream.receive_some(65536)
                if not data:
                    break
                conn.buffer += data  # a pipelined request: keep it for later
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        req.client_gone.set()
        scope.cancel()

    async def _chat_stream(
        self, conn: _Conn, req: Request, model: str, pieces: list[bytes], prompt_tokens: int, script: Script
    ) -> bool:
        start_ns = time.monotonic_ns()
        if script.load_s > 0:
            await trio.sleep(script.load_s)
        await conn.send_raw(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
            + f"Date: {_http_date()}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        head = b'{"model":' + json.dumps(model).encode() + b',"created_at":"'
        mid = b'","message":{"role":"assistant","content":'
        end = b'},"done":false}\n'
        buf = bytearray()
        flush_every = max(1, script.flush_every)
        created = _created_at().encode()
        for i, piece in enumerate(pieces):
            event = _event_at(script, i)
            if event is not None:
                if buf:
                    await conn.send_raw(bytes(buf))
                    buf.clear()
                return await self._misbehave(conn, req, event, script)
            if script.delay_s > 0:
                if buf:
                    await conn.send_raw(bytes(buf))
                    buf.clear()
                await trio.sleep(script.delay_s)
                created = _created_at().encode()
            line = head + created + mid + piece + end
            buf += b"%x\r\n" % len(line) + line + b"\r\n"
            req.chunks_sent = i + 1
            if req.chunks_sent % flush_every == 0:
                await conn.send_raw(bytes(buf))
                buf.clear()
                created = _created_at().encode()  # fresh per write, as Ollama stamps each line
        event = _event_at(script, len(pieces))
        if event is not None:
            if buf:
                await conn.send_raw(bytes(buf))
            return await self._misbehave(conn, req, event, script)
        total = time.monotonic_ns() - start_ns
        final = {
            "model": model,
            "created_at": _created_at(),
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": script.done_reason,
            "total_duration": total + 1_000_000,
            "load_duration": 1_000_000,
            "prompt_eval_count": prompt_tokens,
            "prompt_eval_duration": 500_000,
            "eval_count": len(pieces),
            "eval_duration": max(1, total),
        }
        line = json.dumps(final, separators=(",", ":")).encode() + b"\n"
        buf += b"%x\r\n" % len(line) + line + b"\r\n0\r\n\r\n"
        await conn.send_raw(bytes(buf))
        return True

    async def _misbehave(self, conn: _Conn, req: Request, event: str, script: Script) -> bool:
        if event == "stall":
            await trio.sleep_forever()  # ended by the watcher when the client goes
        if event == "reset":
            conn.reset()
            req.client_gone.set()  # not the client's doing, but the connection is gone
            return False
        if event == "error":
            line = json.dumps({"error": script.error_message}).encode() + b"\n"
            await conn.send_raw(b"%x\r\n" % len(line) + line + b"\r\n0\r\n\r\n")
            return True
        if event == "bad_line":
            line = b'{"model": "oops", this is not json\n'
            await conn.send_raw(b"%x\r\n" % len(line) + line + b"\r\n0\r\n\r\n")
            return True
        # truncate: a clean end of the body, but no done line.
        await conn.send_raw(b"0\r\n\r\n")
        return True

    async def _chat_whole(
        self, conn: _Conn, model: str, pieces: list[bytes], prompt_tokens: int, script: Script
    ) -> bool:
        text = "".join(json.loads(p) for p in pieces)
        return await conn.send_json(
            200,
            {
                "model": model,
                "created_at": _created_at(),
                "message": {"role": "assistant", "content": text},
                "done": True,
                "done_reason": script.done_reason,
                "total_duration": 2_000_000,
                "load_duration": 1_000_000,
                "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": 500_000,
                "eval_count": len(pieces),
                "eval_duration": 500_000,
            },
        )


def _event_at(script: Script, sent: int) -> str | None:
    """The misbehaviour due once `sent` chunks have gone out, if any."""
    if script.stall_after == sent:
        return "stall"
    if script.reset_after == sent:
        return "reset"
    if script.error_after == sent:
        return "error"
    if script.bad_line_after == sent:
        return "bad_line"
    if script.truncate_after == sent:
        return "truncate"
    return None


class _Conn:
    """One client connection: buffered request reading, raw writes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.head_only = False  # answering HEAD: headers without the body

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise _Closed
        self.buffer += data

    async def read_request(self) -> Request | None:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > _MAX_HEAD:
                raise _Closed
            try:
                await self._fill()
            except _Closed:
                if self.buffer:
                    raise
                return None
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        self.buffer = bytearray(rest)
        lines = head.decode("latin-1").split("\r\n")
        method, path, _version = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        while len(self.buffer) < length:
            await self._fill()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return Request(method=method, path=path.split("?", 1)[0], headers=headers, body=body)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def send_json(self, status: int, obj: Any) -> bool:
        body = json.dumps(obj, separators=(",", ":")).encode()
        return await self._send(status, "application/json; charset=utf-8", body)

    async def send_text(self, status: int, text: str) -> bool:
        return await self._send(status, "text/plain; charset=utf-8", text.encode())

    async def _send(self, status: int, ctype: str, body: bytes) -> bool:
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
            f"Date: {_http_date()}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await self.send_raw(head.encode() + (b"" if self.head_only else body))
        return True

    def reset(self) -> None:
        """Close with RST instead of FIN: the client sees 'connection reset'."""
        sock = self.stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


@asynccontextmanager
async def open_ollama_server(
    models: tuple[str, ...] | list[str] = DEFAULT_MODELS,
    *,
    scripts: dict[str, Script] | None = None,
    default: Script | None = None,
    host: str = "127.0.0.1",
) -> AsyncIterator[OllamaServer]:
    """Run a fake Ollama server on `host`, a free port, for the block's duration."""
    server = OllamaServer(models)
    server.scripts.update(scripts or {})
    if default is not None:
        server.default = default
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, host, 0)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Ollama server (tests, chaos suite, demos)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    parser.add_argument("--reply", default=None, help="text every chat streams (default: an echo)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each chunk")
    args = parser.parse_args(argv)

    async def run() -> None:
        server = OllamaServer([m for m in args.models.split(",") if m])
        server.default = Script(reply=args.reply, delay_s=args.delay)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, args.host, args.port)
            print(f"listening on {server.url}", flush=True)

    try:
        trio.run(run)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
