"""GET one JSON document over HTTP/1.1, with h11 on a Trio stream.

For the daemon's few small reads: the hub's `/api/schemas` at every identify
and Ollama's `/api/version` at start-up. httpx would cost ~5 MiB of RSS for
them; h11 is loaded anyway (trio-websocket's wsproto uses it). One request a
connection (`Connection: close`), no redirects, no proxies, no compression;
https with the system's CA store, as the WebSocket link. h11 handles
Content-Length, chunked and read-to-close bodies. Every failure is one
`FetchError` that says what went wrong.
"""

from __future__ import annotations

import json
import ssl
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

from . import __version__

MAX_BODY_BYTES = 4 * 1024 * 1024
_RECEIVE_BYTES = 64 * 1024
_USER_AGENT = f"trio-sidecar/{__version__}"


class FetchError(Exception):
    """No document: bad URL, transport, time-out, HTTP status (`status`), size or JSON."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


async def get_json(
    url: str,
    *,
    timeout_s: float,
    max_bytes: int = MAX_BODY_BYTES,
    ssl_context: ssl.SSLContext | None = None,
) -> Any:
    """The JSON body of `GET url` if it answers 200 within `timeout_s` (the whole exchange)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"not an http(s) URL: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:  # a port that is not a number, or out of range
        raise FetchError(f"bad port in {url!r}") from exc
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", parts.netloc.rpartition("@")[2]),
                ("Accept", "application/json"),
                ("Accept-Encoding", "identity"),
                ("Connection", "close"),
                ("User-Agent", _USER_AGENT),
            ],
        )
    except h11.ProtocolError as exc:  # a space or control character in the URL
        raise FetchError(f"cannot ask for {url!r}: {exc}") from exc
    try:
        with trio.fail_after(timeout_s):
            body = await _exchange(parts.scheme, parts.hostname, port, request, max_bytes, ssl_context)
    except trio.TooSlowError as exc:
        raise FetchError(f"no complete answer within {timeout_s:g} s") from exc
    except (OSError, trio.BrokenResourceError, UnicodeError) as exc:  # refused, DNS, reset, TLS, IDNA
        raise FetchError(_describe(exc)) from exc
    except h11.ProtocolError as exc:
        raise FetchError(f"bad HTTP answer: {exc}") from exc
    try:
        return json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError included
        raise FetchError(f"not JSON: {exc}") from exc


async def _exchange(
    scheme: str,
    host: str,
    port: int,
    request: h11.Request,
    max_bytes: int,
    ssl_context: ssl.SSLContext | None,
) -> bytes:
    stream: trio.abc.Stream
    if scheme == "https":
        if ssl_context is None:
            # Reads the CA store from disk: not on the event loop.
            ssl_context = await trio.to_thread.run_sync(ssl.create_default_context)
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context)
    else:
        stream = await trio.open_tcp_stream(host, port)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        await stream.send_all(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        return await _read_body(conn, stream, max_bytes)


async def _read_body(conn: h11.Connection, stream: trio.abc.Stream, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(_RECEIVE_BYTES)))  # b"": the peer closed
        elif isinstance(event, h11.Response):
            if event.status_code != 200:
                raise FetchError(f"HTTP {event.status_code}", status=event.status_code)
            length = _content_length(event)
            if length is not None and length > max_bytes:
                raise FetchError(f"body of {length} bytes is over the {max_bytes}-byte limit")
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > max_bytes:
                raise FetchError(f"body over the {max_bytes}-byte limit")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed):
            raise FetchError("connection closed before an answer")
        # InformationalResponse (1xx): the real answer follows.


def _describe(exc: BaseException) -> str:
    """The useful part: Trio wraps a TLS or socket error, and every failed connect attempt."""
    if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc.__cause__, BaseExceptionGroup) and exc.__cause__.exceptions:
        first = exc.__cause__.exceptions[0]
        text += f" ({type(first).__name__}: {first})"
    return text


def _content_length(response: h11.Response) -> int | None:
    for name, value in response.headers:
        if name == b"content-length":
            return int(value)  # h11 has checked it is a number
    return None
