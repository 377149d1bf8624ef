"""End to end in one process, on a shortened clock: the real Sidecar and the dev hub.

Long work is the point here (a woken agent that takes 70 s, a Claude model that
answers after 65 s, a verification that runs 75 s), so time is a MockClock that
jumps once the loop has been idle for 10 ms of real time. The real children
involved (wake agent, Claude stand-in, the check) wait for a file the test
creates when its virtual clock says the time has come.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.app import Sidecar, open_sidecar
from sidecar.config import Config
from sidecar.devhub import DevHub, open_dev_hub
from tests.gitrepos import commit_command, git, install_gh, make_origin

from .harness import AGENT, SidecarProcess
from .harness import TOKEN as E2E_TOKEN

FAKES = Path(__file__).parent / "fakes"
STANDIN = FAKES / "claude_standin.py"
WAKE_AGENT = FAKES / "proc_wake_agent.py"
RECORDINGS = FAKES / "claude_recordings"
TOKEN = "secret-token-123"
PY = shlex.quote(sys.executable)


@asynccontextmanager
async def running(make_config: Any, **overrides: Any) -> AsyncIterator[tuple[DevHub, Sidecar]]:
    async with open_dev_hub(tokens={"agent-1": TOKEN}) as hub:
        cfg: Config = make_config(hub_url=hub.ws_url, kill_grace_s=0.5, **overrides)
        async with open_sidecar(cfg) as sc:
            await hub.wait_until(lambda: sc.link.identified, 30)
            yield hub, sc


async def completed(hub: DevHub, tid: str, timeout: float) -> Any:  # noqa: ASYNC109
    rec = await hub.wait_until(
        lambda: hub.task(tid) if hub.task(tid).status in ("completed", "failed", "dead_letter") else None,
        timeout,
    )
    return rec


async def test_woken_agent_finishing_after_70_s_completes(
    make_config: Any, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    results = tmp_path / "results"
    results.mkdir()
    agent = f"{PY} {shlex.quote(str(WAKE_AGENT))} {shlex.quote(str(results))}"
    wake = f'{agent} wait-go "${{TASK_ID}}" >/dev/null 2>&1 &'
    async with running(make_config, wake_command=wake, results_dir=str(results)) as (hub, _sc):
        tid = hub.submit(description="a long job for a woken agent")  # no routing_decision: wake
        await hub.wait_until(lambda: (results / f"{tid}.started").exists(), 30)
        t0 = trio.current_time()
        await trio.sleep(70)  # virtual: the old 60 s default would have killed it by now
        assert hub.task(tid).status == "accepted" and not hub.task(tid).failures
        (results / f"{tid}.go").write_text("")
        rec = await completed(hub, tid, 60)
    assert rec.status == "completed", rec.failures
    assert rec.result["output"] == f"did {tid}" and rec.result["verification_status"] == "auto_pass"
    assert rec.verification_report["status"] == "auto_pass"
    assert trio.current_time() - t0 >= 70


async def test_claude_answering_after_65_s_completes(
    make_config: Any, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    binary = tmp_path / "claude"
    binary.write_text(f'#!/bin/sh\nexec {PY} {shlex.quote(str(STANDIN))} "$@"\n')
    binary.chmod(0o755)
    go = tmp_path / "answer-now"
    extra = ["--standin-replay", str(RECORDINGS / "success.jsonl"), "--standin-wait-file", str(go)]
    claude = {"binary": str(binary), "extra_args": extra}
    async with running(make_config, claude=claude, repo_dir=str(tmp_path)) as (hub, _sc):
        tid = hub.submit(
            description="think hard",
            routing_decision={
                "target_type": "claude",
                "selected_endpoint": "claude_api",
                "effective_tier": "complex",
            },
        )
        await hub.wait_until(lambda: hub.task(tid).status == "accepted", 30)
        await trio.sleep(65)
        assert not hub.task(tid).failures
        go.write_text("")
        rec = await completed(hub, tid, 60)
    assert rec.status == "completed", rec.failures
    expected = [json.loads(line) for line in (RECORDINGS / "success.jsonl").read_text().splitlines()][-1]
    assert rec.result["output"] == expected["result"]


async def test_a_trivial_llm_task_is_bounded_at_10_minutes(
    make_config: Any, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    binary = tmp_path / "claude"
    binary.write_text(f'#!/bin/sh\nexec {PY} {shlex.quote(str(STANDIN))} "$@"\n')
    binary.chmod(0o755)
    claude = {"binary": str(binary), "extra_args": ["--standin-hang", "--standin-ignore-sigint"]}
    async with running(make_config, claude=claude, repo_dir=str(tmp_path)) as (hub, _sc):
        tid = hub.submit(
            description="quick one",
            routing_decision={"target_type": "claude", "effective_tier": "trivial"},
            max_retries=0,
        )
        await hub.wait_until(lambda: hub.task(tid).status == "accepted", 30)
        t0 = trio.current_time()
        rec = await completed(hub, tid, 900)
    assert rec.failures and rec.failures[0]["reason"] == "timeout"
    assert 600 <= trio.current_time() - t0 < 660


async def test_heartbeats_go_on_during_a_75_s_verification(
    make_config: Any, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    go = tmp_path / "go"
    script = tmp_path / "slow_check.py"
    wait = f"while not pathlib.Path({str(go)!r}).exists():\n    time.sleep(0.01)\n"
    script.write_text(f"import pathlib, time\n{wait}print('checked')\n")
    check = f"{PY} {shlex.quote(str(script))}"
    async with running(make_config, repo_dir=str(tmp_path)) as (hub, sc):
        tid = hub.submit(
            # A shell task's own limit is 60 s, and it bounds its verification too.
            metadata={"shell_command": "echo built", "timeout_ms": 300_000},
            routing_decision={"target_type": "sidecar"},
            verification_steps=[{"type": "command_succeeds", "target": check, "description": "slow check"}],
        )
        await hub.wait_until(
            lambda: any("verification 1/1:" in e["text"] for e in hub.task(tid).progress_events), 30
        )
        started, pongs = trio.current_time(), []
        reconnects = sc.link.reconnects
        while trio.current_time() - started < 75:
            await trio.sleep(5)
            if sc.link.last_pong_at is not None and sc.link.last_pong_at > started:
                pongs.append(sc.link.last_pong_at)
        assert hub.task(tid).status == "accepted"
        go.write_text("")
        rec = await completed(hub, tid, 60)
        assert sc.link.reconnects == reconnects and sc.link.identified
    assert len(set(pongs)) >= 2  # pings every 30 s, each answered while the check ran
    assert rec.status == "completed"
    report = rec.verification_report
    assert report["status"] == "pass" and report["checks"][0]["output"] == "checked\n"
    assert report["checks"][0]["duration_ms"] >= 75_000
    assert [e["text"] for e in rec.progress_events].count("built\n") == 1  # one run, never timed out
    assert rec.result["verification_status"] == "pass"


async def test_failed_verification_reaches_the_hub_top_level(
    make_config: Any, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with running(make_config, repo_dir=str(tmp_path)) as (hub, _sc):
        tid = hub.submit(
            metadata={"shell_command": "echo done"},
            routing_decision={"target_type": "sidecar"},
            verification_steps=[{"type": "file_exists", "target": "missing.txt"}],
        )
        rec = await completed(hub, tid, 60)
    assert rec.status == "completed"
    assert "verification_report" not in rec.result  # top level, beside `result`
    assert rec.verification_report["status"] == "fail"
    assert rec.verification_history == [rec.verification_report]
    assert rec.result["verification_status"] == "fail" and rec.result["verification_attempts"] == 1
    # Status events may be coalesced into one frame: look in the text they make.
    assert "verification 1/1 fail: file_exists missing.txt" in "".join(e["text"] for e in rec.progress_events)
    assert hub.violations == []


async def test_real_process_on_the_onboarding_config_json_verifies_and_opens_a_pr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sidecar run` on a config.json as the original's onboarding tool writes it (real clock)."""
    gh = install_gh(monkeypatch, tmp_path)
    bare, checkout = make_origin(tmp_path / "git")
    async with open_dev_hub(tokens={AGENT: E2E_TOKEN}) as hub:
        sc = SidecarProcess(
            tmp_path / "sc",
            hub.ws_url,
            fmt="json",
            hub_api_url="http://hub.example:4000",
            repo_dir=str(checkout),
            reviewer="",
            capabilities=[],
            confirmation_timeout_ms=30000,
            results_dir="./results",
            log_file=str(tmp_path / "sc" / "original.log"),
        )
        try:
            await sc.start()
            tid = hub.submit(
                description="Add the feature file",
                metadata={"shell_command": commit_command(), "priority": "urgent"},
                routing_decision={"target_type": "sidecar"},
                verification_steps=[
                    {"type": "file_exists", "target": "feature.txt", "description": "the file is there"},
                    {"type": "git_clean", "target": None, "description": "everything committed"},
                ],
            )
            rec = await completed(hub, tid, 60)
            assert rec.status == "completed", rec.failures
            assert rec.result["pr_url"] == "https://github.com/acme/widgets/pull/1"
            assert rec.verification_report["status"] == "pass"
            assert [c["status"] for c in rec.verification_report["checks"]] == ["pass", "pass"]
            branch = "agent/add-the-feature-file"
            assert git(bare, "log", "-1", "--format=%s", branch).strip() == "add feature.txt"
            pr = gh.calls()[-1]
            assert (
                "priority:urgent" in pr["argv"] and "http://hub.example:4000/api/tasks/" + tid in pr["body"]
            )
            assert hub.violations == []
        finally:
            await sc.cleanup()
