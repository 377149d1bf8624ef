"""The Ollama executor against the fake Ollama server on a real loopback socket."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sidecar.agentic.loop import LENGTH_NOTICE
from sidecar.config import Config
from sidecar.executors import ExecContext
from sidecar.executors.ollama import DEFAULT_URL, OllamaExecutor, resolve_url
from sidecar.messages import Outcome, ProgressEvent, Task, parse_task
from sidecar.progress import ProgressSender, open_progress
from tests.fakes.ollama_server import OllamaServer, Script, open_ollama_server
from tests.fakes.proc_helpers import task_run

MakeConfig = Callable[..., Config]


def make_task(endpoint: str | None, model: str | None = "qwen3:8b", **extra: Any) -> Task:
    frame: dict[str, Any] = {
        "type": "task_assign",
        "task_id": "t-1",
        "description": "say something nice",
        "routing_decision": {
            "target_type": "ollama",
            "selected_endpoint": endpoint,
            "selected_model": model,
        },
    }
    frame.update(extra)
    return parse_task(frame)


def host_port(url: str) -> str:
    return url.removeprefix("http://")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
async def srv() -> AsyncIterator[OllamaServer]:
    async with open_ollama_server() as server:
        yield server


class Run:
    """Runs the executor with a progress channel and collects the events."""

    def __init__(self, config: Config, http: httpx.AsyncClient, tmp_path: Path) -> None:
        self.ctx = ExecContext(config, http, tmp_path)
        self.executor = OllamaExecutor(self.ctx)
        self.events: list[ProgressEvent] = []
        self.got_event = trio.Event()

    async def __call__(self, task: Task) -> Outcome:
        send, recv = open_progress(16)
        outcome: Outcome | None = None
        async with trio.open_nursery() as nursery:

            async def drain() -> None:
                async for ev in recv:
                    self.events.append(ev)
                    self.got_event.set()

            nursery.start_soon(drain)
            async with send:
                outcome = await self.executor(task_run(self.ctx, task, ProgressSender(send, task.task_id)))
        assert outcome is not None
        return outcome


@pytest.fixture
def run(make_config: MakeConfig, http: httpx.AsyncClient, tmp_path: Path) -> Callable[..., Run]:
    def _make(**config: Any) -> Run:
        return Run(make_config(**config), http, tmp_path)

    return _make


async def test_success_streams_tokens_and_counts(srv: OllamaServer, run: Callable[..., Run]) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="one two three four")
    r = run()
    out = await r(make_task(host_port(srv.url)))
    assert out.ok, out
    assert out.output == "one two three four"
    assert out.model_used == "qwen3:8b"
    assert [e.text for e in r.events] == ["one", " two", " three", " four"]
    assert [e.tokens_so_far for e in r.events] == [1, 2, 3, 4]
    assert {e.event_type for e in r.events} == {"token"}
    assert {e.model for e in r.events} == {"qwen3:8b"}
    assert {e.task_id for e in r.events} == {"t-1"}
    # The fake counts prompt words and sent chunks; the executor must take them from done:true.
    assert out.tokens_in == 3  # "say something nice"
    assert out.tokens_out == 4


async def test_many_chunks_through_a_small_channel_arrive_in_order(
    srv: OllamaServer, make_config: MakeConfig, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Chunks queue without waiting while there is room and wait when the channel
    is full: nothing is lost or reordered either way."""
    srv.scripts["qwen3:8b"] = Script(chunks=5000, flush_every=64)
    ctx = ExecContext(make_config(), http, tmp_path)
    executor = OllamaExecutor(ctx)
    send, recv = open_progress(4)
    seen: list[int | None] = []
    async with trio.open_nursery() as nursery:

        async def slow_drain() -> None:
            async for ev in recv:
                seen.append(ev.tokens_so_far)
                await trio.lowlevel.checkpoint()

        nursery.start_soon(slow_drain)
        async with send:
            out = await executor(task_run(ctx, make_task(host_port(srv.url)), ProgressSender(send, "t-1")))
    assert out.ok and out.tokens_out == 5000
    assert seen == list(range(1, 5001))


async def test_progress_channel_gone_does_not_fail_the_task(
    srv: OllamaServer, make_config: MakeConfig, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    ctx = ExecContext(make_config(), http, tmp_path)
    executor = OllamaExecutor(ctx)
    send, recv = open_progress(1)
    recv.close()  # the batcher is gone (shutdown)
    out = await executor(task_run(ctx, make_task(host_port(srv.url)), ProgressSender(send, "t-1")))
    assert out.ok and out.output == "Echo: say something nice"


async def test_request_body_shape(srv: OllamaServer, run: Callable[..., Run]) -> None:
    task = make_task(
        host_port(srv.url),
        repo="git@example.com:acme/app.git",
        branch="feature/x",
        file_hints=["src/app.py"],
        success_criteria=["tests pass"],
    )
    assert (await run()(task)).ok
    [req] = srv.chat_requests
    assert req.method == "POST"
    assert req.headers["content-type"] == "application/json"
    body = req.json
    assert body["model"] == "qwen3:8b"
    assert body["stream"] is True
    system, user = body["messages"]
    assert system["role"] == "system"
    for text in ("acme/app.git", "feature/x", "src/app.py", "tests pass"):
        assert text in system["content"]
    assert user == {"role": "user", "content": "say something nice"}


async def test_no_context_means_no_system_message(srv: OllamaServer, run: Callable[..., Run]) -> None:
    assert (await run()(make_task(host_port(srv.url)))).ok
    assert srv.chat_requests[0].json["messages"] == [{"role": "user", "content": "say something nice"}]


async def test_config_url_and_default_model(
    srv: OllamaServer, run: Callable[..., Run], make_config: MakeConfig
) -> None:
    r = run(ollama_url=srv.url, ollama={"default_model": "llama3.2:3b"})
    out = await r(make_task(None, model=None))
    assert out.ok and out.model_used == "llama3.2:3b"
    assert srv.chat_requests[0].json["model"] == "llama3.2:3b"


async def test_http_404_model_not_found_is_permanent(srv: OllamaServer, run: Callable[..., Run]) -> None:
    out = await run()(make_task(host_port(srv.url), model="nope:1b"))
    assert not out.ok
    assert out.reason == "ollama_http_404"
    assert out.transient is False
    assert "HTTP 404" in (out.error or "")
    assert 'model "nope:1b" not found, try pulling it first' in (out.error or "")


async def test_http_500_is_transient(srv: OllamaServer, run: Callable[..., Run]) -> None:
    srv.scripts["qwen3:8b"] = Script(status=500, error_message="llama runner process has terminated")
    out = await run()(make_task(host_port(srv.url)))
    assert (out.ok, out.reason, out.transient) == (False, "ollama_http_500", True)
    assert "llama runner process has terminated" in (out.error or "")


async def test_error_line_mid_stream(srv: OllamaServer, run: Callable[..., Run]) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="a b c d", error_after=2, error_message="out of memory")
    r = run()
    out = await r(make_task(host_port(srv.url)))
    assert (out.ok, out.reason, out.transient) == (False, "ollama_error", True)
    assert "out of memory" in (out.error or "") and "mid-stream" in (out.error or "")
    assert out.output == "a b"  # what arrived before the error is kept
    assert len(r.events) == 2


async def test_truncated_stream_is_a_failure(srv: OllamaServer, run: Callable[..., Run]) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="a b c d", truncate_after=3)
    out = await run()(make_task(host_port(srv.url)))
    assert (out.ok, out.reason, out.transient) == (False, "ollama_truncated", True)
    assert "truncated stream" in (out.error or "") and "3 chunks" in (out.error or "")


async def test_an_answer_cut_at_the_length_limit_is_a_flagged_success(
    srv: OllamaServer, run: Callable[..., Run]
) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="a b c", done_reason="length")
    r = run()
    out = await r(make_task(host_port(srv.url)))
    assert (out.ok, out.output) == (True, "a b c")
    assert out.fields == {"done_reason": "length"}
    assert [(e.event_type, e.text) for e in r.events][-1] == ("status", LENGTH_NOTICE)


async def test_a_normal_stop_adds_no_field_and_no_notice(srv: OllamaServer, run: Callable[..., Run]) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="a b", done_reason="stop")
    r = run()
    out = await r(make_task(host_port(srv.url)))
    assert (out.ok, out.fields) == (True, None)
    assert {e.event_type for e in r.events} == {"token"}


@pytest.mark.parametrize("done_reason", ["load", "unload"])
async def test_a_load_or_unload_line_is_no_reply(
    srv: OllamaServer, run: Callable[..., Run], done_reason: str
) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="", done_reason=done_reason)
    out = await run()(make_task(host_port(srv.url)))
    assert (out.ok, out.reason, out.transient) == (False, "ollama_no_reply", True)
    assert f"done_reason {done_reason!r} and no reply" in (out.error or "")


async def test_malformed_json_line_is_a_failure(srv: OllamaServer, run: Callable[..., Run]) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="a b c d", bad_line_after=1)
    out = await run()(make_task(host_port(srv.url)))
    assert (out.ok, out.reason, out.transient) == (False, "ollama_bad_json", False)
    assert "malformed JSON line" in (out.error or "")


async def test_connection_reset_mid_stream(srv: OllamaServer, run: Callable[..., Run]) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="a b c d e f", reset_after=2)
    out = await run()(make_task(host_port(srv.url)))
    assert (out.ok, out.reason, out.transient) == (False, "ollama_connection_lost", True)
    assert "lost mid-stream" in (out.error or "")
    assert out.output == "a b"


async def test_connection_refused(run: Callable[..., Run]) -> None:
    with socket.socket() as s:  # a port that was free a moment ago and now has no listener
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = await run()(make_task(f"127.0.0.1:{port}"))
    assert (out.ok, out.reason, out.transient) == (False, "ollama_unreachable", True)
    assert (out.error or "").startswith(f"cannot reach Ollama at http://127.0.0.1:{port}: ")


async def test_connect_timeout(run: Callable[..., Run], autojump_clock: trio.abc.Clock) -> None:
    """A listener whose accept queue is full drops new SYNs: connect hangs until
    `connect_timeout_s` (on the mock clock: no real waiting)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for s in fillers:
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
            start = trio.current_time()
            out = await run(ollama={"connect_timeout_s": 10})(make_task(f"127.0.0.1:{port}"))
            elapsed = trio.current_time() - start
        finally:
            for s in fillers:
                s.close()
    assert (out.ok, out.reason, out.transient) == (False, "ollama_unreachable", True)
    assert out.error == f"cannot reach Ollama at http://127.0.0.1:{port}: connect timed out"
    assert 10 <= elapsed < 11


async def test_idle_timeout(
    srv: OllamaServer, run: Callable[..., Run], autojump_clock: trio.abc.Clock
) -> None:
    """The server stalls forever after 2 chunks; on the mock clock the idle timeout
    fires after exactly `idle_timeout_s` of silence, with no real waiting."""
    srv.scripts["qwen3:8b"] = Script(reply="a b c d", stall_after=2)
    r = run(ollama={"idle_timeout_s": 30})
    start = trio.current_time()
    out = await r(make_task(host_port(srv.url)))
    elapsed = trio.current_time() - start
    assert (out.ok, out.reason, out.transient) == (False, "ollama_idle_timeout", True)
    assert "sent nothing for 30 s" in (out.error or "")
    assert 30 <= elapsed < 31
    assert out.output == "a b"
    with trio.fail_after(5):
        await srv.chat_requests[0].client_gone.wait()


async def test_a_cold_model_load_is_not_an_idle_timeout(
    srv: OllamaServer, run: Callable[..., Run], autojump_clock: trio.abc.Clock
) -> None:
    """Ollama loads a cold model before its answer begins, which can take longer
    than the idle timeout (a large model from a slow disk): that wait is bounded
    by `load_timeout_s`, not `idle_timeout_s`."""
    srv.scripts["qwen3:8b"] = Script(reply="a b c", load_s=200)
    r = run(ollama={"idle_timeout_s": 30})
    start = trio.current_time()
    out = await r(make_task(host_port(srv.url)))
    assert out.ok, out
    assert out.output == "a b c"
    assert trio.current_time() - start >= 200


async def test_load_timeout(
    srv: OllamaServer, run: Callable[..., Run], autojump_clock: trio.abc.Clock
) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="a b", load_s=10_000)
    r = run(ollama={"idle_timeout_s": 30, "load_timeout_s": 120})
    start = trio.current_time()
    out = await r(make_task(host_port(srv.url)))
    elapsed = trio.current_time() - start
    assert (out.ok, out.reason, out.transient) == (False, "ollama_load_timeout", True)
    assert "did not begin its answer within 120 s" in (out.error or "")
    assert "ollama.load_timeout_s" in (out.error or "")
    assert 120 <= elapsed < 121


async def test_slow_tokens_are_not_idle(
    srv: OllamaServer, run: Callable[..., Run], autojump_clock: trio.abc.Clock
) -> None:
    """The idle timeout bounds silence between bytes, not the whole stream."""
    srv.scripts["qwen3:8b"] = Script(reply="a b c d e", delay_s=20)
    r = run(ollama={"idle_timeout_s": 30})
    start = trio.current_time()
    out = await r(make_task(host_port(srv.url)))
    assert out.ok, out
    assert out.output == "a b c d e"
    assert trio.current_time() - start >= 100


async def test_cancellation_closes_the_stream(srv: OllamaServer, run: Callable[..., Run]) -> None:
    srv.scripts["qwen3:8b"] = Script(reply="a b c d", stall_after=3)
    r = run()
    finished = False
    with trio.CancelScope() as scope:

        async def cancel_after_three() -> None:
            while len(r.events) < 3:
                await r.got_event.wait()
                r.got_event = trio.Event()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_after_three)
            await r(make_task(host_port(srv.url)))
            finished = True
    assert scope.cancelled_caught and not finished
    req = srv.chat_requests[0]
    with trio.fail_after(5):  # a bound on a bug, not a timing assertion
        await req.client_gone.wait()
    assert req.chunks_sent == 3


async def test_connection_is_reused_after_success(srv: OllamaServer, run: Callable[..., Run]) -> None:
    r = run()
    for _ in range(3):
        assert (await r(make_task(host_port(srv.url)))).ok
    assert [req.connection for req in srv.chat_requests] == [1, 1, 1]  # kept alive, one TCP connection


@pytest.mark.parametrize(
    ("endpoint", "configured", "expected"),
    [
        ("gpu-box:11434", None, "http://gpu-box:11434"),
        ("10.0.0.5:11434", "http://other:1", "http://10.0.0.5:11434"),
        ("http://gpu-box:11434/", None, "http://gpu-box:11434"),
        ("https://ollama.example/prefix", None, "https://ollama.example/prefix"),
        ("[::1]:11434", None, "http://[::1]:11434"),
        ("localhost", None, "http://localhost:11434"),  # a bare host: Ollama's port, not 80
        ("gpu-box", "cfg:1", "http://gpu-box:11434"),
        ("[::1]", None, "http://[::1]:11434"),
        ("http://gpu-box", None, "http://gpu-box"),  # a URL says what it means
        (None, "http://cfg-host:9999", "http://cfg-host:9999"),
        ("", "cfg-host:9999", "http://cfg-host:9999"),
        (None, None, DEFAULT_URL),
        ("  ", "", "http://localhost:11434"),
    ],
)
def test_endpoint_resolution(endpoint: str | None, configured: str | None, expected: str) -> None:
    assert resolve_url(endpoint, configured) == expected


async def test_target_uses_routing_then_config(
    make_config: MakeConfig, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    ex = OllamaExecutor(
        ExecContext(make_config(ollama_url="http://cfg:1", ollama={"default_model": "m:1"}), http, tmp_path)
    )
    assert ex.target(make_task("box:2", model="q:8b")) == ("http://box:2", "q:8b")
    assert ex.target(make_task(None, model=None)) == ("http://cfg:1", "m:1")
    no_routing = parse_task({"type": "task_assign", "task_id": "x"})
    assert ex.target(no_routing) == ("http://cfg:1", "m:1")
