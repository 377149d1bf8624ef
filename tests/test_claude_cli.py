"""ClaudeExecutor driving the real Claude Code CLI, offline, against the fake Messages API.

Install the CLI with `.ci/install-claude.sh` (into `.tools/claude`), or point
SIDECAR_TEST_CLAUDE_BIN at a `claude` binary. Without one, these tests skip.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sidecar import procs
from sidecar.config import Config
from sidecar.executors import ExecContext
from sidecar.executors.claude import ClaudeExecutor
from sidecar.messages import Outcome, ProgressEvent, parse_task
from sidecar.progress import ProgressSender, open_progress
from sidecar.taskrun import run_and_sweep
from tests.conftest import Logs
from tests.fakes.anthropic_api import FakeAnthropic, Scenario, serve_fake_anthropic
from tests.fakes.proc_helpers import task_run

ROOT = Path(__file__).resolve().parents[1]
CLAUDE_BIN = os.environ.get("SIDECAR_TEST_CLAUDE_BIN") or str(ROOT / ".tools/claude/node_modules/.bin/claude")

pytestmark = [
    pytest.mark.claude_cli,
    pytest.mark.skipif(
        not (os.path.isfile(CLAUDE_BIN) and os.access(CLAUDE_BIN, os.X_OK)),
        reason=f"Claude Code CLI not installed at {CLAUDE_BIN}: run .ci/install-claude.sh "
        "or set SIDECAR_TEST_CLAUDE_BIN",
    ),
]


@pytest.fixture
async def api() -> AsyncIterator[FakeAnthropic]:
    async with serve_fake_anthropic() as fake:
        yield fake


class Run:
    """One executor run with its collected progress events."""

    def __init__(self, config: Config, env: dict[str, str], tmp_path: Path) -> None:
        self.config = config
        self.env = env
        self.tmp_path = tmp_path
        self.events: list[ProgressEvent] = []
        self.first_token = trio.Event()
        self.outcome: Outcome | None = None

    @property
    def marker(self) -> str:
        return procs.task_marker(self.config.agent_id, "t-1")

    def of(self, kind: str) -> list[ProgressEvent]:
        return [e for e in self.events if e.event_type == kind]

    async def __call__(self, **task_fields: Any) -> Outcome:
        frame = {"type": "task_assign", "task_id": "t-1", "description": "Say hello.", **task_fields}
        send, recv = open_progress(100_000)

        async def collect() -> None:
            async for ev in recv:
                self.events.append(ev)
                if ev.event_type == "token":
                    self.first_token.set()

        async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
            nursery.start_soon(collect)
            ctx = ExecContext(config=self.config, http=http, state_dir=self.tmp_path / "state")
            try:
                run = task_run(ctx, parse_task(frame), ProgressSender(send, "t-1"))
                # As the supervisor runs it: the end-of-task sweep is part of the run.
                self.outcome = await run_and_sweep(ClaudeExecutor(ctx, env=self.env), run)
            finally:
                await send.aclose()
        return self.outcome


@pytest.fixture
def make_run(make_config: Callable[..., Config], api: FakeAnthropic, tmp_path: Path) -> Callable[..., Run]:
    home = tmp_path / "home"
    work = tmp_path / "work"
    home.mkdir()
    work.mkdir()

    def make(extra_args: list[str] | None = None, **env_over: str) -> Run:
        env = {
            "ANTHROPIC_BASE_URL": api.base_url,
            "ANTHROPIC_API_KEY": "test",
            "HOME": str(home),
            "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
            "CLAUDE_CODE_MAX_RETRIES": "0",
            **env_over,
        }
        cfg = make_config(
            agent_id=f"claude-cli-{uuid.uuid4().hex[:8]}",
            repo_dir=str(work),
            kill_grace_s=5.0,
            claude={"binary": CLAUDE_BIN, "extra_args": extra_args or []},
        )
        return Run(cfg, env, tmp_path)

    return make


async def test_success_text_tokens_cost(api: FakeAnthropic, make_run: Callable[..., Run]) -> None:
    text = "The quick brown fox jumps over the lazy dog, many times over. " * 3
    api.scenario = Scenario(
        text=text,
        chunk=7,
        input_tokens=120,
        output_tokens=40,
        cache_creation_input_tokens=11,
        cache_read_input_tokens=13,
    )
    run = make_run()
    with trio.fail_after(60):
        out = await run()
    assert out.ok, out
    assert out.output == text
    assert out.tokens_in == 120 + 11 + 13
    assert out.tokens_out == 40
    assert out.cost_usd is not None and out.cost_usd > 0
    assert out.model_used and out.model_used != "claude"  # the CLI's default model, from system/init
    tokens = run.of("token")
    assert len(tokens) >= len(text) // 7
    assert "".join(e.text for e in tokens) == text
    assert procs.find_marked(run.marker) == []


async def test_prompt_arrives_via_stdin_with_context(
    api: FakeAnthropic, make_run: Callable[..., Run]
) -> None:
    run = make_run()
    desc = "Please rename function foo_bar_7731 to baz. Careful with $(echo pwned) and `ticks`."
    with trio.fail_after(60):
        out = await run(
            description=desc,
            repo="acme/widgets",
            branch="feature/x",
            file_hints=["src/foo.py"],
            success_criteria=["tests pass"],
        )
    assert out.ok
    reqs = api.message_requests()
    assert reqs and reqs[0].query.get("beta") == ["true"]
    sent = reqs[0].text_of_messages()
    assert desc in sent
    for part in ("acme/widgets", "feature/x", "src/foo.py", "tests pass"):
        assert part in sent
    assert reqs[0].json()["stream"] is True


async def test_real_model_id_is_passed(api: FakeAnthropic, make_run: Callable[..., Run]) -> None:
    run = make_run()
    rd = {"target_type": "claude", "selected_endpoint": "claude_api", "selected_model": "claude-sonnet-4-5"}
    with trio.fail_after(60):
        out = await run(routing_decision=rd)
    assert out.ok
    assert api.message_requests()[0].json()["model"].startswith("claude-sonnet-4-5")
    assert out.model_used.startswith("claude-sonnet-4-5")


async def test_long_description_over_200kb(api: FakeAnthropic, make_run: Callable[..., Run]) -> None:
    line = "Line {n:06d}: the sidecar must pass this whole description through stdin intact.\n"
    desc = "".join(line.format(n=n) for n in range(2600))
    assert len(desc.encode()) > 200_000
    run = make_run()
    with trio.fail_after(90):
        out = await run(description=desc)
    assert out.ok, out
    assert desc.rstrip("\n") in api.message_requests()[0].text_of_messages()


async def test_api_error_400_fails_with_cli_message(api: FakeAnthropic, make_run: Callable[..., Run]) -> None:
    api.scenario = Scenario(kind="error", status=400, message="fake: this prompt is refused")
    run = make_run()
    with trio.fail_after(60):
        out = await run()
    assert not out.ok
    assert "400" in (out.error or "") and "fake: this prompt is refused" in (out.error or "")
    assert out.transient is False
    assert out.reason == "claude_api_400"


async def test_api_error_529_is_transient(api: FakeAnthropic, make_run: Callable[..., Run]) -> None:
    api.scenario = Scenario(kind="error", status=529, error_type="overloaded_error", message="Overloaded")
    run = make_run()
    with trio.fail_after(60):
        out = await run()
    assert not out.ok and out.transient is True
    assert "Overloaded" in (out.error or "")
    assert len(api.message_requests()) == 1  # CLAUDE_CODE_MAX_RETRIES=0 reached the CLI


async def test_unreachable_api_is_transient(make_run: Callable[..., Run]) -> None:
    with trio.socket.socket() as s:  # a port with nobody listening
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = make_run(ANTHROPIC_BASE_URL=f"http://127.0.0.1:{port}")
    with trio.fail_after(60):
        out = await run()
    assert not out.ok and out.transient is True
    assert "API Error" in (out.error or "")


async def test_slow_stream_cancelled_with_sigint(
    api: FakeAnthropic, make_run: Callable[..., Run], logs: Logs
) -> None:
    api.scenario = Scenario(kind="slow", text="tick ", delay_s=0.05)
    run = make_run()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await run.first_token.wait()
            assert procs.find_marked(run.marker)  # the CLI is running
            t0 = trio.current_time()
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - t0
    assert run.outcome is None  # cancellation propagated
    assert procs.find_marked(run.marker) == []
    # SIGINT made the CLI stop and print its final result, well inside the 5 s grace.
    cancelled = logs.named("claude_cancelled")
    assert cancelled and cancelled[0]["result_seen"] is True
    assert elapsed < 4.0


async def _wait_for_tool(run: Run, program: str) -> tuple[int, int]:
    """Poll /proc (there is nothing to wait on) until the Bash tool runs `program`.

    Returns (CLI pid, tool command pid).
    """
    while True:
        by_cmd = {p: _cmdline(p) for p in procs.find_marked(run.marker)}
        cli = [p for p, c in by_cmd.items() if "--output-format" in c]
        tool = [p for p, c in by_cmd.items() if c.startswith(program)]
        if cli and tool:
            return cli[0], tool[0]
        assert run.outcome is None, run.outcome
        await trio.sleep(0.02)


async def test_bash_tool_own_session_is_killed_on_cancel(
    api: FakeAnthropic, make_run: Callable[..., Run]
) -> None:
    api.scenario = Scenario(
        kind="tool_use", tool_input={"command": "tail -f /dev/null", "description": "wait"}
    )
    run = make_run(extra_args=["--allowedTools", "Bash"])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            cli, tool = await _wait_for_tool(run, "tail")
            assert os.getsid(tool) != os.getsid(cli)  # out of reach of a group kill
            nursery.cancel_scope.cancel()
    assert run.outcome is None
    assert procs.find_marked(run.marker) == []
    assert _state(tool) in ("Z", "X")


async def test_cli_killed_mid_tool_leaves_nothing_behind(
    api: FakeAnthropic, make_run: Callable[..., Run]
) -> None:
    """A CLI that dies hard (SIGKILL, OOM) cannot kill its tools: the marker sweep must."""
    api.scenario = Scenario(
        kind="tool_use", tool_input={"command": "tail -f /dev/null", "description": "wait"}
    )
    run = make_run(extra_args=["--allowedTools", "Bash"])
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            cli, tool = await _wait_for_tool(run, "tail")
            os.kill(cli, signal.SIGKILL)
    out = run.outcome
    assert out is not None and not out.ok
    assert out.reason == "claude_no_result" and out.transient is True
    assert "SIGKILL" in (out.error or "")
    assert procs.find_marked(run.marker) == []
    assert _state(tool) in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"
