"""Fidelity of the fake Ollama server: the official `ollama` client must parse it.

The official client is code nobody here wrote; a fake it accepts without
complaint speaks Ollama's wire format. Its misbehaviours must look, to that
client, as they do from a real server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import ollama
import pytest
import trio

from tests.fakes.ollama_server import Script, open_ollama_server, parse_directives

MESSAGES = [{"role": "user", "content": "hello there"}]
ROOT = Path(__file__).resolve().parent.parent


async def collect(client: ollama.AsyncClient, model: str) -> list[ollama.ChatResponse]:
    return [part async for part in await client.chat(model=model, messages=MESSAGES, stream=True)]


async def test_official_client_parses_a_stream() -> None:
    async with open_ollama_server(scripts={"qwen3:8b": Script(reply="Hi, how are you?")}) as srv:
        parts = await collect(ollama.AsyncClient(host=srv.url), "qwen3:8b")
    assert "".join(p.message.content or "" for p in parts) == "Hi, how are you?"
    assert all(p.model == "qwen3:8b" and p.message.role == "assistant" for p in parts)
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last.done_reason == "stop"
    assert last.prompt_eval_count == 2 and last.eval_count == len(parts) - 1
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(last, field), int) and getattr(last, field) > 0
    assert isinstance(last.created_at, str) and last.created_at.endswith("Z")


async def test_wire_format_is_chunked_ndjson_one_line_per_chunk() -> None:
    async with open_ollama_server() as srv, httpx.AsyncClient() as http:
        body = {"model": "qwen3:8b", "messages": MESSAGES}  # no "stream": Ollama streams by default
        async with http.stream("POST", srv.url + "/api/chat", json=body) as r:
            assert r.headers["content-type"] == "application/x-ndjson"
            assert r.headers["transfer-encoding"] == "chunked"
            raw = [chunk async for chunk in r.aiter_raw()]
    lines = b"".join(raw).split(b"\n")
    assert lines[-1] == b""
    objs = [json.loads(line) for line in lines[:-1]]
    assert [o["done"] for o in objs][-1] is True
    assert set(objs[0]) == {"model", "created_at", "message", "done"}
    assert set(objs[-1]) >= {
        "done_reason",
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    }


async def test_non_streaming_chat() -> None:
    async with open_ollama_server(scripts={"qwen3:8b": Script(reply="whole answer")}) as srv:
        resp = await ollama.AsyncClient(host=srv.url).chat(model="qwen3:8b", messages=MESSAGES)
    assert resp.message.content == "whole answer" and resp.done is True


async def test_unknown_model_is_404_response_error() -> None:
    async with open_ollama_server() as srv:
        with pytest.raises(ollama.ResponseError) as info:
            await collect(ollama.AsyncClient(host=srv.url), "nope:7b")
    assert info.value.status_code == 404
    assert info.value.error == 'model "nope:7b" not found, try pulling it first'


async def test_http_500_is_response_error() -> None:
    async with open_ollama_server(scripts={"qwen3:8b": Script(status=500, error_message="boom")}) as srv:
        with pytest.raises(ollama.ResponseError) as info:
            await collect(ollama.AsyncClient(host=srv.url), "qwen3:8b")
    assert (info.value.status_code, info.value.error) == (500, "boom")


async def test_error_line_mid_stream_is_response_error() -> None:
    async with open_ollama_server() as srv:
        client = ollama.AsyncClient(host=srv.url)
        seen: list[str] = []
        with pytest.raises(ollama.ResponseError) as info:
            async for part in await client.chat(
                model="qwen3:8b!error_after=1!error_message=gpu fell over", messages=MESSAGES, stream=True
            ):
                seen.append(part.message.content or "")
    assert info.value.error == "gpu fell over"
    assert seen == ["Echo:"]
    assert srv.chat_requests[0].headers  # recorded


async def test_truncated_stream_passes_silently_through_the_official_client() -> None:
    """As on a real server: the client raises nothing; only the missing done line tells."""
    async with open_ollama_server(scripts={"qwen3:8b": Script(reply="a b c", truncate_after=2)}) as srv:
        parts = await collect(ollama.AsyncClient(host=srv.url), "qwen3:8b")
    assert [p.done for p in parts] == [False, False]


async def test_reset_mid_stream_breaks_the_official_client() -> None:
    async with open_ollama_server(scripts={"qwen3:8b": Script(reply="a b c", reset_after=1)}) as srv:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await collect(ollama.AsyncClient(host=srv.url), "qwen3:8b")


async def test_tags_version_and_root() -> None:
    async with open_ollama_server(models=["qwen3:8b", "phi4:14b"]) as srv:
        client = ollama.AsyncClient(host=srv.url)
        listed = await client.list()
        async with httpx.AsyncClient() as http:
            version = (await http.get(srv.url + "/api/version")).json()
            head = await http.head(srv.url + "/")
            root = await http.get(srv.url + "/")  # same connection: HEAD left no stray body
            missing = await http.get(srv.url + "/api/nothing")
    assert [m.model for m in listed.models] == ["qwen3:8b", "phi4:14b"]
    assert isinstance(version["version"], str)
    assert root.text == "Ollama is running"
    assert head.status_code == 200 and head.content == b""
    assert missing.status_code == 404
    assert [r.path for r in srv.requests] == ["/api/tags", "/api/version", "/", "/", "/api/nothing"]


async def test_concurrent_streams() -> None:
    async with open_ollama_server() as srv:
        client = ollama.AsyncClient(host=srv.url)
        results: dict[int, str] = {}

        async def one(i: int) -> None:
            async for part in await client.chat(
                model="qwen3:8b", messages=[{"role": "user", "content": f"n{i}"}], stream=True
            ):
                results[i] = results.get(i, "") + (part.message.content or "")

        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(one, i)
    assert results == {i: f"Echo: n{i}" for i in range(5)}


async def test_stall_until_client_goes(autojump_clock: trio.abc.Clock) -> None:
    async with open_ollama_server(scripts={"qwen3:8b": Script(stall_after=1)}) as srv:
        client = ollama.AsyncClient(host=srv.url)
        with trio.move_on_after(3600) as scope:
            await collect(client, "qwen3:8b")
        assert scope.cancelled_caught  # stalled for a (mock) hour
        with trio.fail_after(5):
            await srv.chat_requests[0].client_gone.wait()
        assert srv.chat_requests[0].chunks_sent == 1


def test_directives() -> None:
    name, script = parse_directives("qwen3:8b!stall_after=3!delay_s=0.5!error_message=x y", Script())
    assert name == "qwen3:8b"
    assert (script.stall_after, script.delay_s, script.error_message) == (3, 0.5, "x y")
    with pytest.raises(ValueError):
        parse_directives("m!bogus=1", Script())


@pytest.fixture
async def standalone() -> AsyncIterator[str]:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tests.fakes.ollama_server", "--port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(20):
            while b"\n" not in buf:
                data = await proc.stdout.receive_some()
                assert data, "server exited before listening"
                buf += data
        line = buf.split(b"\n")[0].decode()
        assert line.startswith("listening on http://127.0.0.1:")
        yield line.removeprefix("listening on ")
    finally:
        proc.kill()
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await proc.wait()


async def test_standalone_server(standalone: str) -> None:
    parts = await collect(ollama.AsyncClient(host=standalone), "qwen3:8b")
    assert "".join(p.message.content or "" for p in parts) == "Echo: hello there"


async def test_client_reset_mid_write_does_not_crash_the_server() -> None:
    """Regression (chaos CI): a cancelled client's RST while the server wrote a
    stream escaped as an exception group and took the whole test server down."""
    import socket
    import struct

    async with open_ollama_server(default=Script(chunks=200_000, flush_every=64)) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        body = json.dumps({"model": "qwen3:8b", "messages": [{"role": "user", "content": "x"}]}).encode()
        for _ in range(3):
            sock = trio.socket.socket()
            await sock.connect((host, int(port)))
            head = f"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            await sock.send(head + body)
            await sock.recv(65536)  # the stream has started
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST while the server is still writing
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{srv.url}/api/version")
        assert r.status_code == 200
