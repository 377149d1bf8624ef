"""`sidecar exec`, `sidecar check`, `--version`/`--help`, and the live view under a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from sidecar import __version__
from sidecar.check import check_repo_tools
from sidecar.cli import _parser
from sidecar.devhub import open_dev_hub
from sidecar.view import LiveView
from tests.fakes.ollama_server import open_ollama_server

TOKEN = "cli-check-token-77"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}


async def _sidecar(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "sidecar", *args],
            cwd=cwd,
            env=_env(),
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )


def _lines(out: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.decode().splitlines()]


# -- sidecar exec ------------------------------------------------------------------


async def test_exec_shell_success_json(tmp_path: Path) -> None:
    (tmp_path / "here.txt").write_text("x")
    proc = await _sidecar("exec", "--json", "--shell", "ls; echo done; echo warn >&2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = _lines(proc.stdout)
    progress = [x for x in lines if x["event"] == "progress"]
    texts = "\n".join(x["text"] for x in progress if x["event_type"] == "stdout")
    assert "here.txt" in texts and "done" in texts  # ran in the current directory
    assert any(x["event_type"] == "stderr" and "warn" in x["text"] for x in progress)
    result = lines[-1]
    assert result["event"] == "result" and result["outcome"] == "success" and result["exit_code"] == 0
    assert result["result"]["exit_code"] == 0 and result["result"]["model_used"] == "none"
    assert "done" in result["result"]["output"]


async def test_exec_shell_failure_exit_1(tmp_path: Path) -> None:
    proc = await _sidecar("exec", "--json", "--shell", "echo bad >&2; exit 7", cwd=tmp_path)
    assert proc.returncode == 1
    result = _lines(proc.stdout)[-1]
    assert result["outcome"] == "failure" and result["exit_code"] == 1
    assert "exit code 7" in result["error"] and result["attempts"] == 2  # the shell tier retries once


async def test_exec_timeout_exit_124_kills_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    proc = await _sidecar(
        "exec", "--json", "--timeout", "0.5", "--shell", f"echo $$ > {pidfile}; exec sleep 60", cwd=tmp_path
    )
    assert proc.returncode == 124
    result = _lines(proc.stdout)[-1]
    assert result["outcome"] == "timeout" and result["exit_code"] == 124 and result["result"] is None
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_exec_plain_output_when_not_a_terminal(tmp_path: Path) -> None:
    proc = await _sidecar("exec", "--shell", "echo one; echo two", cwd=tmp_path)
    assert proc.returncode == 0
    out = proc.stdout.decode()
    assert "\x1b[" not in out  # no escapes into a pipe
    assert out.splitlines()[:2] == ["one", "two"]
    assert "success" in out.splitlines()[-1]


async def test_exec_ollama_streams_tokens_and_reports_tokens(tmp_path: Path) -> None:
    async with open_ollama_server() as srv:
        proc = await _sidecar(
            "exec",
            "--json",
            "--ollama",
            "qwen3:8b",
            "--ollama-url",
            srv.url,
            "--prompt",
            "say hi",
            cwd=tmp_path,
        )
    assert proc.returncode == 0, proc.stderr
    lines = _lines(proc.stdout)
    tokens = [x for x in lines if x["event"] == "progress" and x["event_type"] == "token"]
    assert tokens and all(x["model"] == "qwen3:8b" for x in tokens)
    counts = [x["tokens_so_far"] for x in tokens if x["tokens_so_far"] is not None]
    assert counts == sorted(counts)
    result = lines[-1]["result"]
    assert result["model_used"] == "qwen3:8b" and result["tokens_out"] > 0 and result["tokens_in"] > 0
    assert "".join(x["text"] for x in tokens).strip() == result["output"].strip()


async def test_exec_usage_errors(tmp_path: Path) -> None:
    proc = await _sidecar("exec", "--ollama", "qwen3:8b", cwd=tmp_path)
    assert proc.returncode == 2 and b"--prompt" in proc.stderr
    proc = await _sidecar("exec", "--shell", "true", "--claude", cwd=tmp_path)
    assert proc.returncode == 2


# -- --version, --help ------------------------------------------------------------


def test_version_and_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out
    for command in ("run", "hub", "demo", "exec", "check"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "example" in text and f"sidecar {command}" in text, command


# -- sidecar check ----------------------------------------------------------------


def _write_config(tmp_path: Path, hub_url: str, token: str, **extra: Any) -> Path:
    data = {"agent_id": "agent-1", "token": token, "hub_url": hub_url, "state_dir": str(tmp_path / "st")}
    data.update(extra)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


async def test_check_against_live_dev_hub(tmp_path: Path) -> None:
    async with open_ollama_server() as srv, open_dev_hub(tokens={"agent-1": TOKEN}) as hub:
        cfg = _write_config(
            tmp_path, hub.ws_url, TOKEN, ollama_url=srv.url, claude={"binary": "definitely-not-claude-xyz"}
        )
        proc = await _sidecar("check", "--config", str(cfg), cwd=tmp_path)
        assert hub.violations == []
        # Identified, then closed: the session is gone again.
        await hub.wait_until(lambda: not hub.connected("agent-1"))
    out = proc.stdout.decode()
    assert proc.returncode == 0, out

    def row(name: str) -> str:
        return next(line for line in out.splitlines() if line.startswith(name + " "))

    for name in ("config", "state dir", "hub tcp", "hub websocket", "hub identify", "ollama"):
        assert row(name)[len(name) :].split()[0] == "ok", row(name)
    assert "will be created" in row("state dir")
    assert "ollama" in out and "version 0.12.6" in out
    assert "definitely-not-claude-xyz" in out and "warn" in out  # a warning, not a failure
    assert out.rstrip().endswith("ready")
    assert TOKEN not in out + proc.stderr.decode()


async def test_check_wrong_token_fails(tmp_path: Path) -> None:
    async with open_dev_hub(tokens={"agent-1": TOKEN}) as hub:
        cfg = _write_config(tmp_path, hub.ws_url, "not-the-token")
        proc = await _sidecar("check", "--config", str(cfg), cwd=tmp_path)
    out = proc.stdout.decode()
    assert proc.returncode == 1, out
    identify = next(line for line in out.splitlines() if line.startswith("hub identify"))
    assert "FAIL" in identify and "invalid_token" in identify
    assert "not ready: hub identify" in out


async def test_check_hub_down_and_bad_config(tmp_path: Path) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there now
    cfg = _write_config(tmp_path, f"ws://127.0.0.1:{port}/ws", TOKEN)
    proc = await _sidecar("check", "--config", str(cfg), cwd=tmp_path)
    assert proc.returncode == 1
    assert any(line.startswith("hub tcp") and "FAIL" in line for line in proc.stdout.decode().splitlines())
    bad = tmp_path / "bad.toml"
    bad.write_text('agent_id = "a"\ntoken = "tok"\nhub_url = "http://nope"\n')
    proc = await _sidecar("check", "--config", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and b"hub_url" in proc.stdout


# -- the live view on a terminal ------------------------------------------------------


async def _run_in_pty(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run `sidecar ARGS` with stdout on a pseudo-terminal; return exit code and all it wrote."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    env = {**_env(), "TERM": "xterm-256color", "COLUMNS": "80"}
    chunks: list[bytes] = []
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "sidecar", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave
        )
        os.close(slave)
        slave = -1
        with trio.fail_after(30):
            while True:
                await trio.lowlevel.wait_readable(master)
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer to the terminal is gone
                    break
                if not data:
                    break
                chunks.append(data)
            code = await proc.wait()
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return code, b"".join(chunks).decode("utf-8", "replace")


async def test_exec_live_view_under_a_pty(tmp_path: Path) -> None:
    script = "echo first; sleep 0.4; echo second; echo oops >&2"
    code, out = await _run_in_pty(["exec", "--shell", script], tmp_path)
    assert code == 0, out
    assert "\x1b[" in out  # colours and cursor control on a terminal
    assert any(ch in out for ch in "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")  # the spinner was drawn
    assert "first" in out and "second" in out and "oops" in out
    assert "✔ success" in out
    assert "Traceback" not in out


async def test_exec_timeout_under_a_pty(tmp_path: Path) -> None:
    code, out = await _run_in_pty(["exec", "--timeout", "0.3", "--shell", "sleep 30"], tmp_path)
    assert code == 124 and "timed out after 0.3 s" in out


def test_live_view_streams_tokens_and_redraws_status() -> None:
    now = [100.0]
    buf = io.StringIO()
    view = LiveView(buf, tty=True, clock=lambda: now[0])
    view.add("t", "ollama qwen3:8b")
    view.event("t", "token", "Hello, ", tokens_so_far=2, model="qwen3:8b")
    now[0] += 1.5
    view.event("t", "token", "world\nsecond li", tokens_so_far=5)
    view.tick()
    text = buf.getvalue()
    assert "Hello, world\n" in text  # a completed line scrolls up whole
    assert "5 tokens" in text and "1.5s" in text and "second li" in text  # status: tokens, elapsed, tail
    assert "\r\x1b[J" in text  # the status line is erased before each redraw
    view.event("t", "status", "retrying")
    view.finish("t", True, "success in 1.5 s")
    view.close()
    tail = buf.getvalue()[len(text) :]
    assert "· retrying" in tail and "second li\n" in tail and "✔ success in 1.5 s" in tail
    assert tail.endswith("\r\x1b[J") or tail.endswith("\n")


def test_live_view_plain_has_no_escapes_and_labels_lines() -> None:
    buf = io.StringIO()
    view = LiveView(buf, tty=False, labels=True, clock=lambda: 5.0)
    view.add("a", "stream")
    view.add("b", "fail")
    view.event("a", "stdout", "line 1\nline 2\n")
    view.event("b", "stderr", "bad")
    view.tick()
    view.finish("b", False, "fail: exit 3")
    view.close()
    lines = buf.getvalue().splitlines()
    assert "\x1b" not in buf.getvalue()
    assert lines == [
        "   0.0s  stream   line 1",
        "   0.0s  stream   line 2",
        "   0.0s  fail     bad",
        "✘ fail: exit 3",
    ]


def test_check_shows_git_and_gh_only_with_a_repo_dir(
    make_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gh").write_text("#!/bin/sh\n")
    (bin_dir / "gh").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert check_repo_tools(make_config()) == []
    rows = {r.name: (r.status, r.detail) for r in check_repo_tools(make_config(repo_dir=str(tmp_path)))}
    assert rows["gh"] == ("ok", str(bin_dir / "gh"))
    assert rows["git"][0] == "warn" and "branch workflow is skipped" in rows["git"][1]
