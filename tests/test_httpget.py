"""`httpget.get_json` and `HubTypes.learn` on it: against the dev hub, and against a
real local TCP (and TLS) server that answers with exactly the bytes each case needs."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.devhub import open_dev_hub, schemas_json
from sidecar.httpget import MAX_BODY_BYTES, FetchError, get_json
from sidecar.hubtypes import SCHEMAS_TIMEOUT_S, HubTypes
from tests.conftest import Logs

Answer = Callable[[trio.abc.Stream], Awaitable[None]]
SCHEMAS = {"websocket": [{"type": "identify"}, {"type": "resource_report"}, {"type": "wake_result"}]}


def _head(status: str, *headers: str) -> bytes:
    return ("\r\n".join([f"HTTP/1.1 {status}", *headers]) + "\r\n\r\n").encode()


def _json_answer(status: str = "200 OK", body: bytes = json.dumps(SCHEMAS).encode()) -> Answer:
    async def answer(stream: trio.abc.Stream) -> None:
        await stream.send_all(_head(status, f"Content-Length: {len(body)}", "Connection: close") + body)

    return answer


class RawServer:
    """Reads one request head per connection, records it, then runs `answer`."""

    def __init__(self, answer: Answer, url: str) -> None:
        self.answer = answer
        self.url = url
        self.requests: list[bytes] = []

    async def handle(self, stream: trio.abc.Stream) -> None:
        try:
            async with stream:
                head = b""
                while b"\r\n\r\n" not in head:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    head += data
                self.requests.append(head)
                await self.answer(stream)
        except trio.BrokenResourceError:
            pass  # the client hung up (a limit, a time-out, a refused certificate): expected there


@asynccontextmanager
async def raw_server(answer: Answer, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[RawServer]:
    """A real TCP server on 127.0.0.1 (TLS with `ssl_context`) for the block."""
    tcp = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = tcp[0].socket.getsockname()[1]
    listeners: list[Any] = list(tcp)
    if ssl_context is not None:
        listeners = [trio.SSLListener(lst, ssl_context, https_compatible=True) for lst in tcp]
    server = RawServer(answer, f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, server.handle, listeners)
        yield server
        nursery.cancel_scope.cancel()


# -- the real hub ------------------------------------------------------------------


@pytest.mark.parametrize("newer", [True, False])
async def test_schemas_from_the_dev_hub(newer: bool) -> None:
    async with open_dev_hub(knows_wake_result=newer) as hub:
        body = await get_json(f"{hub.api_url}/api/schemas", timeout_s=5)
        assert body == schemas_json(schemas=hub.schemas)
        types = HubTypes()
        await types.learn(hub.api_url)
    assert types.known is not None and "identify" in types.known
    assert ("wake_result" in types.known) is newer
    assert types.accepts("wake_result") is newer
    assert await types.check("resource_report")  # the first ask has ended: no wait


async def test_dev_hub_404_keeps_what_is_known(logs: Logs) -> None:
    async with open_dev_hub() as hub:
        with pytest.raises(FetchError) as err:
            await get_json(f"{hub.api_url}/api/nothing-here", timeout_s=5)
        assert err.value.status == 404
        types = HubTypes()
        await types.learn(f"{hub.api_url}/prefix")  # /prefix/api/schemas: not served
    assert types.known is None and types.accepts("wake_result")
    [entry] = logs.named("hub_schemas_unavailable")
    assert entry["status"] == 404 and entry["url"].endswith("/prefix")


# -- bodies h11 reads --------------------------------------------------------------


async def test_request_shape_and_content_length_body() -> None:
    async with raw_server(_json_answer()) as server:
        assert await get_json(f"{server.url}/base/api/schemas?v=2", timeout_s=5) == SCHEMAS
    [head] = server.requests
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /base/api/schemas?v=2 HTTP/1.1"
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    assert headers["host"] == server.url.removeprefix("http://")
    assert headers["connection"] == "close" and headers["accept-encoding"] == "identity"


async def test_chunked_body_in_pieces() -> None:
    raw = json.dumps(SCHEMAS).encode()
    pieces = [raw[:7], raw[7:30], raw[30:]]

    async def answer(stream: trio.abc.Stream) -> None:
        await stream.send_all(_head("200 OK", "Transfer-Encoding: chunked", "Content-Type: application/json"))
        for piece in pieces:
            await stream.send_all(b"%x\r\n%s\r\n" % (len(piece), piece))
            await trio.sleep(0.01)
        await stream.send_all(b"0\r\n\r\n")

    async with raw_server(answer) as server:
        assert await get_json(server.url, timeout_s=5) == SCHEMAS


async def test_body_to_close_and_a_100_continue_first() -> None:
    async def answer(stream: trio.abc.Stream) -> None:
        await stream.send_all(_head("100 Continue") + _head("200 OK", "Connection: close"))
        await stream.send_all(b'{"version": ')
        await stream.send_all(b'"0.9.0"}')

    async with raw_server(answer) as server:
        assert await get_json(server.url, timeout_s=5) == {"version": "0.9.0"}


# -- failures ----------------------------------------------------------------------


async def _never_ends(stream: trio.abc.Stream) -> None:
    await trio.sleep_forever()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (_json_answer("404 Not Found", b'{"error":"not_found"}'), "HTTP 404"),
        (_json_answer("503 Service Unavailable", b""), "HTTP 503"),
        (_json_answer(body=b"<html>hub</html>"), "not JSON"),
        (_json_answer(body=b"\xff\xfe{}"), "not JSON"),
        (_json_answer(body=b""), "not JSON"),
    ],
    ids=["404", "503", "html", "not-utf8", "empty"],
)
async def test_status_and_json_failures(answer: Answer, message: str) -> None:
    async with raw_server(answer) as server:
        with pytest.raises(FetchError, match=message) as err:
            await get_json(server.url, timeout_s=5)
    if message.startswith("HTTP"):
        assert err.value.status == int(message.split()[1])


async def test_declared_oversized_body_is_refused_before_it_is_read() -> None:
    async def answer(stream: trio.abc.Stream) -> None:
        await stream.send_all(_head("200 OK", f"Content-Length: {MAX_BODY_BYTES + 1}"))
        await trio.sleep_forever()  # the body never comes: a client that waited for it would time out

    async with raw_server(answer) as server:
        with trio.fail_after(5):
            with pytest.raises(FetchError, match="over the 4194304-byte limit"):
                await get_json(server.url, timeout_s=60)


async def test_undeclared_oversized_body_stops_at_the_limit() -> None:
    sent = 0

    async def answer(stream: trio.abc.Stream) -> None:
        nonlocal sent
        await stream.send_all(_head("200 OK", "Transfer-Encoding: chunked"))
        block = b"[" + b"1," * 4095 + b"1]"
        while True:  # endless chunks: only the client's limit ends this
            await stream.send_all(b"%x\r\n%s\r\n" % (len(block), block))
            sent += len(block)

    async with raw_server(answer) as server:
        with pytest.raises(FetchError, match="body over the 100000-byte limit"):
            await get_json(server.url, timeout_s=30, max_bytes=100_000)
    assert sent > 100_000


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_head("200 OK", "Content-Length: 50") + b'{"websocket": ', "bad HTTP answer"),
        (b"", "bad HTTP answer"),
        (b"hello there\r\n\r\n", "bad HTTP answer"),
    ],
    ids=["truncated", "closed-silently", "not-http"],
)
async def test_broken_answers(data: bytes, message: str) -> None:
    async def answer(stream: trio.abc.Stream) -> None:
        await stream.send_all(data)  # and close

    async with raw_server(answer) as server:
        with pytest.raises(FetchError, match=message):
            await get_json(server.url, timeout_s=5)


async def test_silent_server_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with raw_server(_never_ends) as server:
        start = trio.current_time()
        with pytest.raises(FetchError, match="no complete answer within 5 s"):
            await get_json(server.url, timeout_s=5)
        assert trio.current_time() - start == pytest.approx(5)
    assert len(server.requests) == 1  # it was asked, then it said nothing


async def test_slow_drip_is_bounded_as_a_whole(autojump_clock: trio.testing.MockClock) -> None:
    """A byte a second never ends the exchange: the time-out is for all of it, not per read."""

    async def answer(stream: trio.abc.Stream) -> None:
        await stream.send_all(_head("200 OK", "Transfer-Encoding: chunked"))
        while True:
            await trio.sleep(1)
            await stream.send_all(b"1\r\n \r\n")

    async with raw_server(answer) as server:
        start = trio.current_time()
        with pytest.raises(FetchError, match="within 5 s"):
            await get_json(server.url, timeout_s=5)
        assert trio.current_time() - start == pytest.approx(5)


async def test_learn_gives_up_on_a_silent_hub_and_releases_check(
    autojump_clock: trio.testing.MockClock, logs: Logs
) -> None:
    async with raw_server(_never_ends) as server:
        types = HubTypes()
        await types.learn(server.url)
        assert trio.current_time() == pytest.approx(SCHEMAS_TIMEOUT_S)
    assert types.known is None
    assert await types.check("wake_result")  # not learnt: tried
    assert logs.named("hub_schemas_unavailable")[0]["error"].startswith("no complete answer")


@pytest.mark.parametrize(
    ("answer", "learnt"),
    [
        (_json_answer(body=b'{"websocket": "none"}'), None),
        (_json_answer(body=b"[1, 2]"), None),
        (_json_answer(), frozenset({"identify", "resource_report", "wake_result"})),
    ],
    ids=["no-list", "not-object", "ok"],
)
async def test_learn_takes_only_a_schemas_document(answer: Answer, learnt: frozenset[str] | None) -> None:
    async with raw_server(answer) as server:
        types = HubTypes()
        await types.learn(server.url)
    assert types.known == learnt


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://127.0.0.1:{_free_port()}/api/schemas", "ConnectionRefused|Errno"),
        ("ftp://127.0.0.1/x", "not an http"),
        ("http:///api/schemas", "not an http"),
        ("http://127.0.0.1:99999/", "bad port"),
        ("http://127.0.0.1:1/a b", "cannot ask for"),
        ("http://no-such-host.invalid/", "gaierror|Errno|resolution|Name"),
        (f"http://{'a' * 64}.example/", "UnicodeError"),
    ],
    ids=["refused", "scheme", "no-host", "port", "space", "dns", "idna"],
)
async def test_unreachable_or_bad_urls(url: str, message: str) -> None:
    with pytest.raises(FetchError, match=message):
        await get_json(url, timeout_s=10)


# -- https -------------------------------------------------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made by the real `openssl`."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_verified_and_refused_when_untrusted(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    async with raw_server(_json_answer(), ssl_context=server_ctx) as server:
        assert server.url.startswith("https://")
        assert await get_json(f"{server.url}/api/schemas", timeout_s=5, ssl_context=trusting) == SCHEMAS
        # The system's CA store does not know this certificate.
        with pytest.raises(FetchError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
            await get_json(f"{server.url}/api/schemas", timeout_s=5)
    assert len(server.requests) == 1  # the untrusted handshake never got to a request
