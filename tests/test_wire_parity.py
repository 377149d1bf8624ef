"""Wire parity with the newer original: `wake_result`, `agent_restarting` before a drained
`restart_sidecar`, `resource_report` with `agent_id`, each only to a hub that accepts the type."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from sidecar.app import RESTART_EXIT_CODE, open_sidecar
from sidecar.devhub import DevHub, open_dev_hub
from sidecar.executors.wake import WakeExecutor
from sidecar.messages import parse_task
from tests.fakes.proc_helpers import RecordingProgress, make_ctx, task_run
from tests.test_wake import agent_cmd

AGENT, TOKEN = "agent-1", "parity-token-42"
SHELL = {"target_type": "sidecar"}
NEWER: dict[str, Any] = {"knows_wake_result": True, "knows_agent_restarting": True}


def frames_of(hub: DevHub, mtype: str) -> list[dict[str, Any]]:
    return [f.frame for f in hub.frames(AGENT, type=mtype) if f.frame is not None]


# -- wake_result, per attempt ------------------------------------------------------


async def test_wake_executor_reports_each_attempt(
    make_config: Any, tmp_path: Path, autojump_clock: Any
) -> None:
    results, counter = tmp_path / "results", tmp_path / "count"
    sent: list[dict[str, Any]] = []

    async def notify(frame: dict[str, Any]) -> None:
        sent.append(frame)

    cmd = f"echo x >> {counter}; [ $(wc -l < {counter}) -ge 3 ] || exit 1; {agent_cmd(results, 'success')}"
    cfg = make_config(results_dir=str(results), wake_command=cmd, wake_attempt_timeout_s=math.inf)
    executor = WakeExecutor(attrs.evolve(make_ctx(cfg), notify=notify))
    task = parse_task({"type": "task_assign", "task_id": "w-1", "description": "", "generation": 4})
    outcome = await executor(task_run(executor.ctx, task, RecordingProgress("w-1")))
    assert outcome.ok
    assert [(f["type"], f["task_id"], f["status"], f["attempt"], f["generation"]) for f in sent] == [
        ("wake_result", "w-1", "failed", 1, 4),
        ("wake_result", "w-1", "failed", 2, 4),
        ("wake_result", "w-1", "success", 3, 4),
    ]
    assert sent[0]["error"] == "exit code 1" and "error" not in sent[2]

    sent.clear()
    slow = make_config(results_dir=str(results), wake_command="exec sleep 100", wake_attempt_timeout_s=1.0)
    executor = WakeExecutor(attrs.evolve(make_ctx(slow), notify=notify))
    task = parse_task({"type": "task_assign", "task_id": "w-2"})
    outcome = await executor(task_run(executor.ctx, task, RecordingProgress("w-2")))
    assert not outcome.ok
    assert [(f["status"], f["attempt"]) for f in sent] == [("timeout", n) for n in (1, 2, 3, 4)]


@pytest.mark.parametrize("newer", [True, False])
async def test_wake_result_reaches_only_a_hub_that_knows_it(
    make_config: Any, tmp_path: Path, newer: bool
) -> None:
    results = tmp_path / "results"
    async with open_dev_hub(tokens={AGENT: TOKEN}, knows_wake_result=newer) as hub:
        cfg = make_config(
            hub_url=hub.ws_url,
            token=TOKEN,
            results_dir=str(results),
            wake_command=agent_cmd(results, "success"),
        )
        async with open_sidecar(cfg) as sidecar:
            tid = hub.submit(description="wake up")  # no routing_decision: the legacy wake path
            await hub.wait_until(lambda: hub.task(tid).status == "completed", 30)
            assert sidecar.hub_types.known is not None  # learnt from GET /api/schemas
    if newer:
        [frame] = hub.wake_results
        assert (frame["task_id"], frame["status"], frame["attempt"]) == (tid, "success", 1)
    else:
        assert frames_of(hub, "wake_result") == []  # never sent
    assert hub.violations == []


async def test_without_schemas_the_first_refusal_stops_wake_result(make_config: Any, tmp_path: Path) -> None:
    results = tmp_path / "results"
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(
            hub_url=hub.ws_url,
            token=TOKEN,
            results_dir=str(results),
            wake_command=agent_cmd(results, "success"),
            hub_api_url="http://127.0.0.1:9",
        )
        async with open_sidecar(cfg) as sidecar:
            first = hub.submit(description="one")
            await hub.wait_until(lambda: hub.task(first).status == "completed", 30)
            await hub.wait_until(lambda: "wake_result" in sidecar.refused_types, 10)
            second = hub.submit(description="two")
            await hub.wait_until(lambda: hub.task(second).status == "completed", 30)
            assert sidecar.hub_types.known is None
    assert [f["task_id"] for f in frames_of(hub, "wake_result")] == [first]
    assert [v.kind for v in hub.violations] == ["validation_failed"]


# -- restart_sidecar -------------------------------------------------------------


async def test_restart_waits_for_running_task_and_announces_itself(make_config: Any, tmp_path: Path) -> None:
    go = tmp_path / "go"
    cmd = f"while [ ! -e {go} ]; do sleep 0.05; done; echo finished"
    async with open_dev_hub(tokens={AGENT: TOKEN}, concurrency=2, **NEWER) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, queue_length=1, restart_drain_s=60.0)
        async with open_sidecar(cfg) as sidecar:
            tid = hub.submit(metadata={"shell_command": cmd}, routing_decision=SHELL)
            await hub.wait_until(lambda: hub.task(tid).status == "accepted", 30)
            await hub.send_frame(AGENT, {"type": "restart_sidecar", "reason": "upgrade"})
            [notice] = await hub.wait_until(lambda: hub.restart_notices, 10)
            assert (notice["reason"], notice["running_tasks"], notice["wait_ms"]) == ("upgrade", 1, 60_000)
            # Draining: new work is refused so the hub gives it elsewhere; the running task goes on.
            late = hub.submit(metadata={"shell_command": "echo late"}, routing_decision=SHELL, max_retries=1)
            failed = await hub.wait_until(lambda: frames_of(hub, "task_failed"), 10)
            assert (failed[0]["task_id"], failed[0]["reason"]) == (late, "sidecar_busy")
            assert not sidecar.stop_requested.is_set()
            go.touch()
            with trio.fail_after(30):
                await sidecar.stop_requested.wait()
            assert sidecar.supervisor.held == {}  # it ended before the restart
            assert sidecar.exit_code == RESTART_EXIT_CODE
        # Its result went out (the graceful stop flushes it); it was not cut short.
        done = hub.task(tid)
        assert done.status == "completed" and done.result is not None and "finished" in done.result["output"]
    assert hub.violations == []


@pytest.mark.parametrize("newer", [True, False])
async def test_restart_drain_is_bounded(make_config: Any, newer: bool) -> None:
    async with open_dev_hub(tokens={AGENT: TOKEN}, **(NEWER if newer else {})) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, restart_drain_s=0.5, kill_grace_s=0.5)
        async with open_sidecar(cfg) as sidecar:
            tid = hub.submit(metadata={"shell_command": "exec sleep 60"}, routing_decision=SHELL)
            await hub.wait_until(lambda: hub.task(tid).status == "accepted", 30)
            await hub.send_frame(AGENT, {"type": "restart_sidecar", "reason": "now"})
            with trio.fail_after(10):
                await sidecar.stop_requested.wait()
            assert tid in sidecar.supervisor.held  # still running at the bound: the shutdown cancels it
        failed = await hub.wait_until(lambda: frames_of(hub, "task_failed"), 10)
        assert failed[0]["reason"] == "sidecar_shutdown"
    assert len(hub.restart_notices) == (1 if newer else 0)
    assert frames_of(hub, "agent_restarting") == ([hub.restart_notices[0]] if newer else [])
    assert hub.violations == []
