"""A chaos violation's dossier: the task's frames at the hub, in order, and its sidecar log lines."""

from __future__ import annotations

import time
from typing import Any

import trio

from sidecar.devhub import open_dev_hub
from sidecar.devhub.testclient import open_agent
from sidecar.procs import task_marker

from .dossier import PROGRESS_RUN_SHOWN, Clock, task_dossier

TOKENS = {"a1": "tok-1"}


def _log(event: str, **fields: Any) -> dict[str, Any]:
    return {"ts": "2026-12-01T08:00:00.123Z", "level": "info", "logger": "sidecar", "event": event, **fields}


async def test_dossier_lists_the_tasks_frames_in_order_and_its_log_lines_only() -> None:
    start = trio.current_time()
    clock = Clock(start, time.time() - start)
    async with open_dev_hub(tokens=TOKENS, concurrency=2) as hub:
        tid = hub.submit({"task_id": "c1-t3", "description": "chaos task tok", "metadata": {}})
        other = hub.submit({"task_id": "c1-t30", "description": "another", "metadata": {}})
        async with open_agent(hub.ws_url, "a1", "tok-1") as agent:
            for want in (tid, other):
                await agent.expect("task_assign", task_id=want)
            await agent.send({"type": "task_accepted", "task_id": tid})
            await agent.expect("task_ack", task_id=tid, status="accepted")
            for seq in range(1, PROGRESS_RUN_SHOWN + 4):
                event = {"event_type": "stdout", "text": f"line {seq}", "seq": seq, "timestamp": 1}
                await agent.send({"type": "task_progress", "task_id": tid, "execution_event": event})
            result = {"output": "", "exit_code": 0}
            await agent.send({"type": "task_complete", "task_id": tid, "generation": 1, "result": result})
            await agent.expect("task_ack", task_id=tid, status="complete")
        marker = task_marker("a1", tid)
        logs = [
            _log("task_accepted", task_id=tid, generation=1),
            _log("task_accepted", task_id=other, generation=1),
            _log("child_output_read_late", marker=marker, salvaged_bytes=4),
            _log("child_drain_timed_out", marker=task_marker("a1", other)),
            _log("task_finished", task_id=tid, outcome="success"),
        ]
        text = task_dossier(
            tid, kind="shell_ok", state=hub.state, hubs=[hub], logs={"a1": (marker, logs)}, clock=clock
        )

    lines = text.splitlines()
    assert lines[0] == "task c1-t3 (shell_ok)"
    assert "status completed, generation 1" in lines[1]
    frames = lines[
        lines.index(" frames at the hubs (<- received, -> sent):") + 1 : lines.index(" sidecar log lines:")
    ]
    kinds = [line.split()[6] if line.split()[0].startswith("+") else line.strip() for line in frames]
    # In order: the assignment, the accept and its ack, a folded run of progress, the result and its ack.
    assert kinds[:3] == ["task_assign", "task_accepted", "task_ack"]
    assert kinds[-2:] == ["task_complete", "task_ack"]
    assert sum("more task_progress frames" in k for k in kinds) == 1
    assert "output='' exit_code=0" in frames[-2]
    assert all(" -> a1 " in line for line in frames if "task_assign" in line or "task_ack" in line)
    times = [float(line.split()[0][1:-1]) for line in frames if line.split()[0].startswith("+")]
    assert times == sorted(times)
    assert "c1-t30" not in text and "another" not in text
    sessions_at = lines.index(" sessions of the agents that held it:")
    log_lines = lines[lines.index(" sidecar log lines:") + 1 : sessions_at]
    assert [line.split()[3] for line in log_lines] == [
        "task_accepted",
        "child_output_read_late",
        "task_finished",
    ]
    assert log_lines[0].split()[:2] == ["08:00:00.123", "a1"]


async def test_dossier_lists_each_session_of_the_agents_that_held_the_task() -> None:
    """An agent that went quiet shows in its sessions, whatever task its silence concerned."""
    start = trio.current_time()
    clock = Clock(start, time.time() - start)
    async with open_dev_hub(tokens=TOKENS) as hub:
        tid = hub.submit({"task_id": "c1-t3", "description": "", "metadata": {}})
        async with open_agent(hub.ws_url, "a1", "tok-1") as agent:
            await agent.expect("task_assign", task_id=tid)
            await agent.send({"type": "task_accepted", "task_id": tid})
            await agent.expect("task_ack", task_id=tid, status="accepted")
        await hub.wait_until(lambda: not hub.connected("a1"))
        async with open_agent(hub.ws_url, "a1", "tok-1") as agent:
            await agent.expect("task_assign", task_id=tid)  # reclaimed when the first one went
            await agent.send({"type": "ping"})
            await agent.expect("pong")
        text = task_dossier(tid, kind="shell_ok", state=hub.state, hubs=[hub], logs={}, clock=clock)

    sessions = text.splitlines()[text.splitlines().index(" sessions of the agents that held it:") + 1 :]
    assert len(sessions) == 2, sessions
    first, second = (line.split() for line in sessions)
    assert first[0] == "hub1" and first[2] == "a1:" and second[2] == "a1:"
    assert first[1] != second[1]  # two connections
    assert sessions[0].endswith("last in: task_accepted") and sessions[1].endswith("last in: ping")
