"""ClaudeExecutor against a stand-in CLI replaying recorded real stream-json output.

These run everywhere (no npm needed): parsing of success, API errors, missing
result, non-zero exit and junk lines; process handling (SIGINT path, SIGKILL
after the grace period, the Bash tool's own-session children swept by marker);
argv (`--model`), stdin prompt, environment and the missing-binary message.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from sidecar import procs
from sidecar.config import Config
from sidecar.executors import ExecContext
from sidecar.executors.claude import ClaudeExecutor, cli_model, usage_tokens
from sidecar.messages import Outcome, ProgressEvent, parse_task
from sidecar.progress import ProgressSender, open_progress
from sidecar.taskrun import TaskRun, run_and_sweep
from tests.conftest import Logs
from tests.fakes.proc_helpers import task_run

STANDIN = Path(__file__).parent / "fakes" / "claude_standin.py"
REC = Path(__file__).parent / "fakes" / "claude_recordings"


def lines(name: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (REC / f"{name}.jsonl").read_text().splitlines() if ln.strip()]


def result_line(name: str) -> dict[str, Any]:
    return next(obj for obj in lines(name) if obj.get("type") == "result")


@pytest.fixture
def standin(tmp_path: Path) -> str:
    """An executable that runs the stand-in with this venv's python."""
    path = tmp_path / "claude"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STANDIN}" "$@"\n')
    path.chmod(0o755)
    return str(path)


class Harness:
    def __init__(self, config: Config, tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.tmp_path = tmp_path
        self.env = env or {}
        self.send, self.recv = open_progress(100_000)
        self.record = tmp_path / "record.json"
        self.last_run: TaskRun | None = None

    def events(self, kind: str | None = None) -> list[ProgressEvent]:
        out = []
        while True:
            try:
                ev = self.recv.receive_nowait()
            except trio.WouldBlock:
                break
            out.append(ev)
        self._seen = getattr(self, "_seen", []) + out
        return [e for e in self._seen if kind is None or e.event_type == kind]

    def recorded(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.record.read_text())
        return data

    async def run(self, task_fields: dict[str, Any] | None = None, marker: str | None = None) -> Outcome:
        frame = {"type": "task_assign", "task_id": "t-1", "description": "Say hello.", **(task_fields or {})}
        async with httpx.AsyncClient() as http:
            ctx = ExecContext(config=self.config, http=http, state_dir=self.tmp_path / "state")
            ex = ClaudeExecutor(ctx, env=self.env)
            run = task_run(ctx, parse_task(frame), ProgressSender(self.send, "t-1"), marker)
            self.last_run = run
            return await run_and_sweep(ex, run)  # as the supervisor runs it


MakeHarness = Callable[..., Harness]


@pytest.fixture
def harness(make_config: Callable[..., Config], standin: str, tmp_path: Path) -> MakeHarness:
    def make(*args: str, env: dict[str, str] | None = None, **overrides: Any) -> Harness:
        extra = [*args, "--standin-record", str(tmp_path / "record.json")]
        overrides.setdefault("kill_grace_s", 5.0)
        overrides.setdefault("repo_dir", str(tmp_path))
        # Our own agent id: no other test's marker sweep can reach our children.
        overrides.setdefault("agent_id", f"claude-standin-{uuid.uuid4().hex[:8]}")
        cfg = make_config(claude={"binary": standin, "extra_args": extra}, **overrides)
        return Harness(cfg, tmp_path, env)

    return make


def marked_alive(config: Config, task_id: str = "t-1") -> list[int]:
    return procs.find_marked(procs.task_marker(config.agent_id, task_id))


# ---------------------------------------------------------------------------
# Parsing recorded output


async def test_success_text_tokens_cost_and_streamed_deltas(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "success.jsonl"))
    out = await h.run()
    res = result_line("success")
    assert out.ok, out
    assert out.output == res["result"] == "Hello from the fake API. All done."
    u = res["usage"]
    assert (
        out.tokens_in == u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]
    )
    assert out.tokens_out == u["output_tokens"]
    assert out.cost_usd == res["total_cost_usd"] > 0
    assert out.model_used == next(o["model"] for o in lines("success") if o.get("subtype") == "init")
    tokens = h.events("token")
    assert len(tokens) > 3  # many deltas, relayed one by one
    assert "".join(e.text for e in tokens) == res["result"]
    assert [e.tokens_so_far for e in tokens] == list(range(1, len(tokens) + 1))
    assert any("started" in e.text for e in h.events("status"))
    assert out.exit_code == 0 and not out.output_truncated


async def test_without_partial_messages_assistant_text_is_relayed(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "success_no_partial.jsonl"))
    out = await h.run()
    assert out.ok
    assert [e.text for e in h.events("token")] == ["Hello without partial messages."]


async def test_stream_retry_output_is_result_not_sum_of_deltas(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "stream_error_fallback.jsonl"))
    out = await h.run()
    res = result_line("stream_error_fallback")
    assert out.ok
    assert out.output == res["result"]
    streamed = "".join(e.text for e in h.events("token"))
    assert streamed != out.output  # the broken stream's deltas, then the fallback's text
    # usage on the result line is summed over both requests
    assert out.tokens_out == res["usage"]["output_tokens"]
    assert out.tokens_in == sum(
        res["usage"][k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )


async def test_api_error_400_is_permanent_failure_with_cli_message(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "api_error_400.jsonl"))
    out = await h.run()
    res = result_line("api_error_400")
    assert res["subtype"] == "success" and res["is_error"] is True  # the quirk we guard against
    assert not out.ok
    assert "API Error: 400 fake: prompt is not acceptable" in (out.error or "")
    assert out.reason == "claude_api_400"
    assert out.transient is False
    assert out.exit_code == 1


async def test_api_error_529_is_transient(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "api_error_529.jsonl"))
    out = await h.run()
    assert not out.ok and out.transient is True
    assert out.reason == "claude_api_529"
    assert "Overloaded" in (out.error or "")


@pytest.mark.parametrize(("exit_code", "transient"), [(0, False), (1, True)])
async def test_no_result_line_is_failure(
    harness: MakeHarness, tmp_path: Path, exit_code: int, transient: bool
) -> None:
    """Exit 0 without the line: a CLI that does not speak stream-json as we expect,
    which another run will not change. Exit 1 after it ran: a crash, worth one more run."""
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(json.dumps(o) + "\n" for o in lines("success") if o.get("type") != "result"))
    h = harness("--standin-replay", str(cut), "--standin-exit", str(exit_code))
    out = await h.run()
    assert not out.ok
    assert out.reason == "claude_no_result"
    assert out.transient is transient
    assert "without a result line" in (out.error or "")


async def test_nonzero_exit_without_output_carries_stderr(harness: MakeHarness) -> None:
    h = harness("--standin-exit", "1", "--standin-stderr", "error: unknown option '--bogus'")
    out = await h.run()
    assert not out.ok
    assert "unknown option '--bogus'" in (out.error or "")
    assert "exit code 1" in (out.error or "")
    assert out.transient is False  # the CLI never started: retrying cannot help
    assert out.exit_code == 1


async def test_success_result_but_nonzero_exit_is_failure(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "success.jsonl"), "--standin-exit", "3")
    out = await h.run()
    assert not out.ok
    assert out.reason == "claude_exit_code"
    assert "code 3" in (out.error or "")
    assert out.cost_usd == result_line("success")["total_cost_usd"]  # still counted


async def test_garbage_lines_are_tolerated(harness: MakeHarness, tmp_path: Path) -> None:
    junk = ["not json at all", "[1, 2, 3]", "42", '{"type": "unknown_kind"}', '{"truncated": ', "\x00\x01"]
    rows = [json.dumps(o) for o in lines("success")]
    mixed = [rows[0], *junk[:3], *rows[1:-1], *junk[3:], rows[-1]]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(mixed) + "\n")
    h = harness("--standin-replay", str(path))
    out = await h.run()
    assert out.ok
    assert out.output == result_line("success")["result"]
    noise = [e.text for e in h.events("stderr")]
    assert "not json at all" in noise and "[1, 2, 3]" in noise and '{"truncated":' in noise


async def test_output_is_capped(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "success.jsonl"), output_cap_bytes=10)
    out = await h.run()
    assert out.ok and out.output_truncated
    assert out.output == result_line("success")["result"][:10]


def test_interrupted_result_tokens_come_from_model_usage() -> None:
    res = result_line("interrupted")
    assert res["is_error"] is True and res["subtype"] == "error_during_execution"
    assert res["usage"]["output_tokens"] == 0  # the CLI zeroes usage after SIGINT…
    tin, tout = usage_tokens(res)
    (m,) = res["modelUsage"].values()  # …but modelUsage keeps the counts
    assert tout == m["outputTokens"] > 0
    assert tin == m["inputTokens"] + m["cacheReadInputTokens"] + m["cacheCreationInputTokens"]


# ---------------------------------------------------------------------------
# argv, stdin, environment, missing binary


def test_cli_model_mapping() -> None:
    assert cli_model(None) is None
    assert cli_model("claude") is None
    assert cli_model("") is None
    assert cli_model("Claude ") is None
    assert cli_model("claude-sonnet-4-5") == "claude-sonnet-4-5"


@pytest.mark.parametrize(
    ("selected", "expected"),
    [("claude", None), (None, None), ("claude-sonnet-4-5", "claude-sonnet-4-5")],
)
async def test_model_argument(harness: MakeHarness, selected: str | None, expected: str | None) -> None:
    h = harness("--standin-replay", str(REC / "success.jsonl"))
    rd = {"target_type": "claude", "selected_endpoint": "claude_api", "selected_model": selected}
    out = await h.run({"routing_decision": rd})
    assert out.ok
    argv = h.recorded()["argv"]
    assert argv[:5] == ["-p", "--output-format", "stream-json", "--verbose", "--include-partial-messages"]
    if expected is None:
        assert "--model" not in argv
    else:
        assert argv[argv.index("--model") + 1] == expected
    assert "claude" not in argv[5:] or expected is not None


async def test_prompt_on_stdin_with_task_context(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "success.jsonl"))
    out = await h.run(
        {
            "description": "Fix the flaky test in $(rm -rf /) `x`",
            "repo": "git@example.com:acme/app.git",
            "branch": "fix/flaky",
            "file_hints": ["tests/test_io.py"],
            "success_criteria": ["pytest passes"],
        }
    )
    assert out.ok
    rec = h.recorded()
    assert "Fix the flaky test in $(rm -rf /) `x`" in rec["stdin"]
    for part in ("acme/app.git", "fix/flaky", "tests/test_io.py", "pytest passes"):
        assert part in rec["stdin"]
    # The prompt is not in argv. (Not the bare word "flaky": a checkout's own path may hold it.)
    for part in ("Fix the flaky test", "rm -rf", "fix/flaky", "tests/test_io.py", "pytest passes"):
        assert all(part not in a for a in rec["argv"]), part


async def test_env_passes_through_and_secrets_are_dropped(harness: MakeHarness, tmp_path: Path) -> None:
    dump = tmp_path / "env.json"
    script = tmp_path / "envdump"
    dumper = f"import json, os; json.dump(dict(os.environ), open({str(dump)!r}, 'w'))"
    script.write_text(
        f'#!/bin/sh\n"{sys.executable}" -c "{dumper}"\nexec "{sys.executable}" "{STANDIN}" "$@"\n'
    )
    script.chmod(0o755)
    h = harness(
        "--standin-replay",
        str(REC / "success.jsonl"),
        env={"LEAKY": "Bearer secret-token-123", "SIDECAR_TOKEN": "x", "ANTHROPIC_BASE_URL": "http://h:1"},
    )
    h.config = attrs.evolve(h.config, claude=attrs.evolve(h.config.claude, binary=str(script)))
    out = await h.run()
    assert out.ok
    env = json.loads(dump.read_text())
    assert env["ANTHROPIC_BASE_URL"] == "http://h:1"
    assert "LEAKY" not in env and "SIDECAR_TOKEN" not in env
    assert env[procs.MARKER_VAR] == procs.task_marker(h.config.agent_id, "t-1")


@pytest.mark.parametrize("binary", ["/nonexistent/dir/claude", "definitely-not-a-claude-binary-xyz"])
async def test_missing_binary_fails_at_once_with_install_hint(
    make_config: Callable[..., Config], tmp_path: Path, binary: str
) -> None:
    h = Harness(make_config(claude={"binary": binary}), tmp_path)
    out = await h.run()
    assert not out.ok
    assert out.transient is False
    assert out.reason == "claude_not_installed"
    assert "npm install -g @anthropic-ai/claude-code" in (out.error or "")
    assert "claude.binary" in (out.error or "")


async def test_empty_description_fails_without_running(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "success.jsonl"))
    out = await h.run({"description": "   "})
    assert not out.ok and out.reason == "claude_empty_prompt" and not out.transient
    assert not h.record.exists()


async def test_missing_workdir_is_a_clear_failure(harness: MakeHarness, tmp_path: Path) -> None:
    h = harness("--standin-replay", str(REC / "success.jsonl"), repo_dir=str(tmp_path / "gone"))
    out = await h.run()
    assert not out.ok and out.reason == "claude_spawn_failed" and not out.transient
    assert "gone" in (out.error or "")


# ---------------------------------------------------------------------------
# Cancellation and leftovers


async def _run_until_token_then_cancel(h: Harness) -> tuple[Outcome | None, float]:
    """Start the executor, wait for its first token event, cancel; return (outcome, seconds)."""
    outcome: Outcome | None = None
    first = trio.Event()
    relay_send, relay_recv = open_progress(100_000)
    orig_send = h.send
    h.send = relay_send

    async def pump() -> None:
        async for ev in relay_recv:
            await orig_send.send(ev)
            if ev.event_type == "token":
                first.set()

    async def run() -> None:
        nonlocal outcome
        outcome = await h.run()

    elapsed = 0.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump)
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:
                inner.start_soon(run)
                with trio.fail_after(20):
                    await first.wait()
                # The stand-in must still be running when we cancel (else the test proves nothing).
                assert marked_alive(h.config), "the CLI stand-in ended before the cancel"
                t0 = trio.current_time()
                scope.cancel()
        elapsed = trio.current_time() - t0
        nursery.cancel_scope.cancel()
    return outcome, elapsed


async def test_hang_after_last_line_cancelled_with_sigint(
    harness: MakeHarness, tmp_path: Path, logs: Logs
) -> None:
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(json.dumps(o) + "\n" for o in lines("success") if o.get("type") != "result"))
    h = harness("--standin-replay", str(cut), "--standin-hang", "--standin-orphan", str(tmp_path / "orphan"))
    outcome, elapsed = await _run_until_token_then_cancel(h)
    assert outcome is None  # Cancelled propagated
    assert elapsed < 4.0  # SIGINT ended it, not SIGKILL after the 5 s grace
    # SIGINT came first: the stand-in answers it, as the CLI does, with a final result.
    cancelled = logs.named("claude_cancelled")
    assert cancelled and cancelled[0]["result_seen"] is True
    # What the session cost so far is kept for the metrics (found from outside:
    # sidecar_cost_usd_total ignored cancelled and timed-out Claude runs).
    final = json.loads(cut.read_text().splitlines()[0])  # the init line names the model
    assert h.last_run is not None
    spent = h.last_run.spent
    assert spent.model == final.get("model") and spent.cost_usd > 0 and spent.tokens_out > 0
    assert marked_alive(h.config) == []
    orphan = int((tmp_path / "orphan").read_text())
    assert not _alive(orphan)


async def test_sigint_and_sigterm_ignored_then_sigkill(harness: MakeHarness, tmp_path: Path) -> None:
    h = harness(
        "--standin-replay",
        str(REC / "success.jsonl"),
        "--standin-hang",
        "--standin-ignore-sigint",
        "--standin-ignore-sigterm",
        kill_grace_s=0.3,
    )
    outcome, elapsed = await _run_until_token_then_cancel(h)
    assert outcome is None
    assert elapsed >= 0.3  # it took the SIGKILL
    assert marked_alive(h.config) == []


async def test_own_session_descendant_is_swept_after_normal_exit(
    harness: MakeHarness, tmp_path: Path
) -> None:
    h = harness("--standin-replay", str(REC / "success.jsonl"), "--standin-orphan", str(tmp_path / "orphan"))
    out = await h.run()
    assert out.ok
    orphan = int((tmp_path / "orphan").read_text())
    assert not _alive(orphan)
    assert marked_alive(h.config) == []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def test_the_runs_marker_reaches_the_cli(harness: MakeHarness) -> None:
    h = harness("--standin-replay", str(REC / "success.jsonl"))
    out = await h.run(marker="supervisor-marker-42")
    assert out.ok
    assert h.recorded()["marker"] == "supervisor-marker-42"
