"""End to end: the real `sidecar run` process against the dev hub.

Real sockets, real processes, a real SQLite file. The dev hub enforces the real
hub's validation and rate limits, and records every violation, so each test
also asserts that the sidecar never sent a frame the real hub would refuse.
"""

from __future__ import annotations

import json
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from sidecar.devhub import DevHub, open_dev_hub

from .fakes.proc_helpers import catches_sigterm
from .harness import AGENT, TOKEN, SidecarProcess, alive, read_pids, shell_assign
from .scripted_hub import open_scripted_hub

SHELL = {"target_type": "sidecar"}


@pytest.fixture
async def sidecar(tmp_path: Path, hub: DevHub) -> AsyncIterator[SidecarProcess]:
    sc = SidecarProcess(tmp_path / "sc", hub.ws_url)
    try:
        yield sc
    finally:
        await sc.cleanup()


def no_violations(hub: DevHub) -> None:
    assert [(v.kind, v.detail) for v in hub.violations] == []
    assert hub.internal_errors == []


def stubborn_script(tmp_path: Path) -> str:
    """A child that ignores SIGTERM, forks a grandchild that does too, and records both pids."""
    pids, terms = tmp_path / "pids", tmp_path / "terms"
    code = textwrap.dedent(
        f"""
        import os, signal, sys, time
        def on_term(*_):
            with open({str(terms)!r}, "a") as f:
                f.write(f"{{os.getpid()}} {{time.time()}}\\n")
        signal.signal(signal.SIGTERM, on_term)
        os.fork()
        with open({str(pids)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        print("running", os.getpid(), flush=True)
        while True:
            time.sleep(0.05)
        """
    )
    script = tmp_path / "stubborn.py"
    script.write_text(code)
    return f"{sys.executable} {script}"


async def start_sleeper(tmp_path: Path, hub: DevHub, sidecar: SidecarProcess) -> tuple[str, int]:
    """Start the sidecar and a task that sleeps; return its id and its child's pid once running."""
    await sidecar.start()
    pidfile = tmp_path / "p"
    tid = hub.submit(
        metadata={"shell_command": f"echo $$ > {pidfile}; exec sleep 60"}, routing_decision=SHELL
    )
    await _wait_for(lambda: hub.task(tid).status == "accepted" and read_pids(pidfile))
    return tid, read_pids(pidfile)[0]


async def test_shell_task_streams_and_completes_with_original_config_json(
    tmp_path: Path, hub: DevHub
) -> None:
    sc = SidecarProcess(tmp_path / "sc", hub.ws_url, fmt="json")
    try:
        await sc.start()
        await hub.wait_until(lambda: hub.connected(AGENT), timeout=20)
        tid = hub.submit(
            description="stream",
            metadata={"shell_command": "for i in 1 2 3 4 5; do echo line-$i; echo err-$i >&2; done"},
            routing_decision=SHELL,
        )
        rec = await hub.wait_until(lambda: hub.task(tid) if hub.task(tid).status == "completed" else None, 20)
        result = rec.result
        assert result is not None
        assert result["status"] == "success" and result["exit_code"] == 0
        assert [f"line-{i}" for i in range(1, 6)] == [
            x for x in result["output"].split() if x.startswith("line")
        ]
        assert result["model_used"] == "none" and result["tokens_in"] == 0
        assert isinstance(result["execution_ms"], int)
        assert rec.ack_statuses[-1] == "complete"
        # task_accepted came before the result, and the assign→accept order held.
        kinds = [f.type for f in hub.frames(AGENT) if f.type and f.type.startswith("task_")]
        assert kinds.index("task_accepted") < kinds.index("task_complete")
        # Progress: every line arrives (no drops at this size, though the rate budget
        # may deliver the tail after the result), and seq rises by one per frame.
        await hub.wait_until(
            lambda: (
                "line-5" in "".join(e["text"] for e in rec.progress_events if e["event_type"] == "stdout")
                and "err-5" in "".join(e["text"] for e in rec.progress_events if e["event_type"] == "stderr")
            ),
            30,
        )
        events = rec.progress_events
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        streamed = "".join(e["text"] for e in events if e["event_type"] == "stdout")
        assert all(f"line-{i}" in streamed for i in range(1, 6))

        # Full output in the task's log file under the state dir. A short task's
        # result does not wait for its log's create (the store's thread opens it),
        # and the file exists, empty, from the create until its text is written:
        # read once, right after the result, it was empty in one CI run.
        def logged() -> bool:
            logs = list((sc.state_dir / "logs").glob("*.log"))
            return len(logs) == 1 and "line-5" in logs[0].read_text()

        await _wait_for(logged, timeout=10)
        no_violations(hub)
        assert await sc.stop() == 0
    finally:
        await sc.cleanup()
    assert TOKEN not in sc.log_text()


async def test_failure_is_retried_once_then_reported(hub: DevHub, sidecar: SidecarProcess) -> None:
    await sidecar.start()
    tid = hub.submit(
        metadata={"shell_command": "echo nope >&2; exit 7"}, routing_decision=SHELL, max_retries=0
    )
    rec = await hub.wait_until(lambda: hub.task(tid) if hub.task(tid).failures else None, 30)
    failure = rec.failures[0]
    assert failure["reason"] == "exit_code"
    assert "exit code 7" in failure["error"] and "nope" in failure["error"]
    assert "2 attempts" in failure["error"]
    assert rec.status == "dead_letter"
    no_violations(hub)


async def test_timeout_kills_whole_group_with_sigkill_after_grace(
    tmp_path: Path, hub: DevHub, sidecar: SidecarProcess
) -> None:
    await sidecar.start()
    cmd = stubborn_script(tmp_path)
    tid = hub.submit(
        metadata={"shell_command": cmd, "timeout_ms": 1500}, routing_decision=SHELL, max_retries=0
    )
    await _wait_for(lambda: len(read_pids(tmp_path / "pids")) == 2)
    pids = read_pids(tmp_path / "pids")
    assert all(alive(p) for p in pids)
    rec = await hub.wait_until(lambda: hub.task(tid) if hub.task(tid).failures else None, 30)
    assert rec.failures[0]["reason"] == "timeout"
    # Both got SIGTERM (and ignored it); SIGKILL followed the 2 s grace.
    terms = [line.split() for line in (tmp_path / "terms").read_text().splitlines()]
    assert sorted(int(p) for p, _ in terms) == sorted(pids)
    assert not any(alive(p) for p in pids)
    # Measured: the failure was reported about kill_grace_s after SIGTERM.
    term_at = min(float(t) for _, t in terms)
    finished = [e for e in sidecar.events("task_finished") if e.get("task_id") == tid]
    assert finished and finished[0]["outcome"] == "timeout"
    end_wall = _wall(finished[0]["ts"])
    assert 1.5 <= end_wall - term_at <= 5.0, end_wall - term_at
    no_violations(hub)


async def test_hub_cancel_kills_task_and_sends_no_result(
    tmp_path: Path, hub: DevHub, sidecar: SidecarProcess
) -> None:
    tid, pid = await start_sleeper(tmp_path, hub, sidecar)
    assert hub.cancel(tid)
    await hub.wait_until(lambda: any(e.get("task_id") == tid for e in sidecar.events("task_finished")), 30)
    assert not alive(pid)
    assert [f.type for f in hub.frames(AGENT) if f.type in ("task_complete", "task_failed")] == []
    # The sidecar is free again: a next task runs.
    tid2 = hub.submit(metadata={"shell_command": "echo after"}, routing_decision=SHELL)
    await hub.wait_until(lambda: hub.task(tid2).status == "completed", 30)
    no_violations(hub)


async def test_hub_restart_mid_task_result_delivered_after(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        port = hub.port
        sc = SidecarProcess(tmp_path / "sc", hub.ws_url)
        try:
            await sc.start()
            tid = hub.submit(
                metadata={
                    "shell_command": f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done-after-restart"
                },
                routing_decision=SHELL,
            )
            await hub.wait_until(lambda: hub.task(tid).status == "accepted", 30)
            state = hub.state
            gate_hub = hub
        except BaseException:
            await sc.cleanup()
            raise
    # The hub is gone. The task finishes while it is down; the result must wait on disk.
    try:
        assert not gate_hub.connected(AGENT)
        gate.touch()
        await _wait_for(lambda: any(e.get("task_id") == tid for e in sc.events("task_finished")))
        async with open_dev_hub(tokens={AGENT: TOKEN}, port=port, state=state.restarted()) as hub2:
            rec = await hub2.wait_until(
                lambda: hub2.task(tid) if hub2.task(tid).status == "completed" else None, 30
            )
            assert rec.result is not None and "done-after-restart" in rec.result["output"]
            no_violations(hub2)
    finally:
        await sc.cleanup()


async def test_kill9_and_restart_recovers_task_and_kills_orphans(
    tmp_path: Path, hub: DevHub, sidecar: SidecarProcess
) -> None:
    await sidecar.start()
    pidfile = tmp_path / "pids"
    marker = tmp_path / "second-run"
    # First run: records its pid and sleeps. The re-run after recovery finishes at once.
    cmd = (
        f"if [ -e {marker} ]; then echo recovered-run; exit 0; fi;"
        f" echo $$ >> {pidfile}; touch {marker}; sleep 60"
    )
    tid = hub.submit(metadata={"shell_command": cmd, "timeout_ms": 120_000}, routing_decision=SHELL)
    await _wait_for(lambda: hub.task(tid).status == "accepted" and read_pids(pidfile))
    orphan = read_pids(pidfile)[0]
    await sidecar.kill9()
    assert alive(orphan)  # kill -9 of the sidecar leaves the child: the restart must deal with it
    await sidecar.start()
    rec = await hub.wait_until(lambda: hub.task(tid) if hub.task(tid).status == "completed" else None, 30)
    assert not alive(orphan)
    assert rec.result is not None and "recovered-run" in rec.result["output"]
    assert any(f.type == "task_recovering" for f in hub.frames(AGENT))
    no_violations(hub)


async def test_a_leftover_that_shed_its_marker_and_session_is_killed_once_idle(
    tmp_path: Path, hub: DevHub, sidecar: SidecarProcess
) -> None:
    """A task's process that clears its environment (`env -i`, as `sudo` and
    `su -` do) and leaves the group (`setsid`) escapes both the group kill and
    the marker sweep. It is re-parented to the sidecar (a subreaper), and with
    no task running anything below the sidecar is a task's leftover: killed."""
    pidfile = tmp_path / "stray.pid"
    script = f"echo $$ > {pidfile}; exec sleep 300"
    command = f"(env -i setsid sh -c '{script}' >/dev/null 2>&1 &); sleep 0.5; echo spawned"
    await sidecar.start()
    tid = hub.submit(metadata={"shell_command": command}, routing_decision=SHELL)
    await hub.wait_until(lambda: hub.task(tid).status == "completed", timeout=30)
    [pid] = read_pids(pidfile)
    await _wait_for(lambda: not alive(pid), timeout=10)
    assert sidecar.events("unmarked_leftovers_killed")
    assert await sidecar.stop(signal.SIGTERM, timeout=20) == 0


async def test_sigterm_shutdown_cancels_tasks_reports_and_exits_zero(
    tmp_path: Path, hub: DevHub, sidecar: SidecarProcess
) -> None:
    tid, pid = await start_sleeper(tmp_path, hub, sidecar)
    code = await sidecar.stop(signal.SIGTERM, timeout=20)
    assert code == 0
    assert not alive(pid)
    failed = [f.frame for f in hub.frames(AGENT, type="task_failed") if f.frame is not None]
    assert failed and failed[0]["reason"] == "sidecar_shutdown"
    assert "retried" in hub.task(tid).ack_statuses
    assert not psutil.pid_exists(sidecar.pid) or not alive(sidecar.pid)
    no_violations(hub)


async def test_a_leftover_that_shed_its_marker_and_session_dies_with_a_graceful_stop(
    tmp_path: Path, hub: DevHub, sidecar: SidecarProcess
) -> None:
    """The same escapee, from a task still running when SIGTERM comes: the stop
    kills the task, then, once no task is held, what is left below the sidecar.
    Nothing the sidecar started outlives it."""
    pidfile = tmp_path / "stray.pid"
    script = f"echo $$ > {pidfile}; exec sleep 300"
    command = f"(env -i setsid sh -c '{script}' >/dev/null 2>&1 &); exec sleep 300"
    await sidecar.start()
    tid = hub.submit(metadata={"shell_command": command}, routing_decision=SHELL)
    await _wait_for(lambda: hub.task(tid).status == "accepted" and read_pids(pidfile), timeout=30)
    [pid] = read_pids(pidfile)
    assert alive(pid)
    assert await sidecar.stop(signal.SIGTERM, timeout=20) == 0
    assert not alive(pid)
    assert sidecar.events("unmarked_leftovers_killed")


async def test_sigterm_closes_the_hub_session_with_going_away(tmp_path: Path) -> None:
    """The hub sees our close frame (1001) when `sidecar run` stops on SIGTERM,
    after the task's failure: not a dropped socket (1006), which reads like a
    crash. A trio-websocket hub, since hypercorn (the dev hub's server) reports
    every close its client starts as 1006."""
    async with open_scripted_hub() as hub:
        sc = SidecarProcess(tmp_path / "sc", f"ws://127.0.0.1:{hub.port}/ws")
        await sc.start()
        try:
            with trio.fail_after(30):
                await hub.wait_for(lambda: hub.of("identify"))
                await hub.send(shell_assign("T", "exec sleep 60", 1))
                await hub.wait_for(lambda: hub.of("task_accepted", "T"))
            assert await sc.stop(signal.SIGTERM, timeout=20) == 0
            with trio.fail_after(10):
                await hub.wait_for(lambda: hub.closes)
        finally:
            if sc.proc is not None and sc.proc.returncode is None:
                await sc.kill9()
    [failed] = hub.of("task_failed", "T")
    assert failed["reason"] == "sidecar_shutdown"
    [closed] = hub.closes
    assert (closed.code, closed.reason) == (1001, "sidecar stopping")


async def test_sighup_is_a_graceful_stop(tmp_path: Path, hub: DevHub, sidecar: SidecarProcess) -> None:
    """SIGHUP (a closed terminal or ssh session, an operator's "reload") stops the
    daemon as SIGTERM does: its task is killed and reported, exit 0. By the
    default action it died at once, leaving the task's processes to init."""
    tid, pid = await start_sleeper(tmp_path, hub, sidecar)
    code = await sidecar.stop(signal.SIGHUP, timeout=20)
    assert code == 0
    assert not alive(pid)
    failed = [f.frame for f in hub.frames(AGENT, type="task_failed") if f.frame is not None]
    assert failed and failed[0]["task_id"] == tid and failed[0]["reason"] == "sidecar_shutdown"
    assert [e["signal"] for e in sidecar.events("signal")] == ["SIGHUP"]


async def test_a_second_sidecar_on_the_same_state_dir_exits_2_and_harms_nothing(
    tmp_path: Path, hub: DevHub, sidecar: SidecarProcess
) -> None:
    """Two daemons on one state dir would kill each other's task processes (each
    takes the other's tasks for a dead process's leftovers). The second one
    finds the state dir locked, says by whom, and exits 2 before touching it."""
    tid, pid = await start_sleeper(tmp_path, hub, sidecar)
    with trio.fail_after(60):  # without the lock it serves (and fights the first) until killed
        second = await trio.run_process(
            sidecar.argv(sidecar.write_config()), capture_stdout=True, capture_stderr=True, check=False
        )
    assert second.returncode == 2
    err = second.stderr.decode()
    assert "in use by another sidecar" in err and f"pid {sidecar.pid}" in err
    assert alive(pid) and hub.task(tid).status == "accepted"  # the first one's task runs on
    code = await sidecar.stop(signal.SIGTERM, timeout=20)
    assert code == 0


@pytest.mark.parametrize("field", ["state_dir", "log_file"])
async def test_an_unusable_state_dir_or_log_file_exits_2_naming_it(tmp_path: Path, field: str) -> None:
    """A file where the state dir should be, a directory given as the log file:
    exit 2 and the field's name (systemd's unit does not restart on 2), not a
    traceback and exit 1."""
    taken = tmp_path / "a-file"
    taken.write_text("")
    sc = SidecarProcess(tmp_path / "sc", "ws://127.0.0.1:9/ws")
    sc.config[field] = str(taken if field == "state_dir" else tmp_path)
    with trio.fail_after(60):
        res = await trio.run_process(
            sc.argv(sc.write_config()), capture_stdout=True, capture_stderr=True, check=False
        )
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert field in err and "Traceback" not in err


async def test_second_sigterm_during_shutdown_still_exits_zero(tmp_path: Path, hub: DevHub) -> None:
    """Regression (found by the chaos soak): trio re-delivers a signal it caught
    but nobody consumed when its receiver closes, so a second SIGTERM during the
    graceful shutdown killed the process at its very end (exit 143, not 0)."""
    sc = SidecarProcess(tmp_path / "sc", hub.ws_url, kill_grace_s=2.0)
    try:
        await sc.start()
        cmd = stubborn_script(tmp_path)
        hub.submit(metadata={"shell_command": cmd}, routing_decision=SHELL)
        await _wait_for(lambda: len(read_pids(tmp_path / "pids")) == 2)
        assert sc.proc is not None
        sc.proc.send_signal(signal.SIGTERM)
        await _wait_for(lambda: sc.events("shutdown_started"))  # the children now ignore SIGTERM for 2 s
        sc.proc.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            code = await sc.proc.wait()
        assert code == 0
        assert sc.events("stopped")
        assert not any(alive(pid) for pid in read_pids(tmp_path / "pids"))
    finally:
        await sc.cleanup()


async def test_sigterm_while_starting_is_a_clean_stop(tmp_path: Path) -> None:
    """Regression (found by the chaos soak): a SIGTERM before the daemon's
    signal handling was up (imports, config) killed it by the signal (exit 143).
    The config file is a FIFO here, so the process is held in its start-up for
    as long as the test wants: SIGTERM must already be caught there."""
    import os
    import subprocess

    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    state = tmp_path / "state"
    log = (tmp_path / "out.log").open("wb")
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "sidecar", "--log-format", "json", "run", "--config", str(fifo)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log.close()
    try:
        await _wait_for(lambda: catches_sigterm(proc.pid) is not False, timeout=20)
        proc.send_signal(signal.SIGTERM)
        config = {
            "agent_id": AGENT,
            "token": TOKEN,
            "hub_url": "ws://127.0.0.1:9/ws",
            "state_dir": str(state),
        }
        await trio.to_thread.run_sync(fifo.write_text, json.dumps(config))
        with trio.fail_after(30):
            code = await proc.wait()
        out = (tmp_path / "out.log").read_text()
        assert code == 0, out
        events = [json.loads(line).get("event") for line in out.splitlines() if line.startswith("{")]
        assert "signal" in events and events[-1] == "stopped"
        assert TOKEN not in out
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_busy_sidecar_answers_sidecar_busy_and_queue_holds_one(tmp_path: Path) -> None:
    async with open_dev_hub(tokens={AGENT: TOKEN}, concurrency=3) as hub:
        sc = SidecarProcess(tmp_path / "sc", hub.ws_url, capacity=1, queue_length=1)
        try:
            await sc.start()
            gate = tmp_path / "gate"
            slow = {"shell_command": f"while [ ! -e {gate} ]; do sleep 0.05; done; echo slow"}
            t1 = hub.submit(metadata=slow, routing_decision=SHELL)
            await hub.wait_until(lambda: hub.task(t1).status == "accepted", 30)
            t2 = hub.submit(metadata={"shell_command": "echo queued"}, routing_decision=SHELL)
            await hub.wait_until(lambda: hub.task(t2).status == "accepted", 30)
            t3 = hub.submit(metadata={"shell_command": "echo refused"}, routing_decision=SHELL, max_retries=0)
            rec3 = await hub.wait_until(lambda: hub.task(t3) if hub.task(t3).failures else None, 30)
            assert rec3.failures[0]["reason"] == "sidecar_busy"
            assert hub.task(t2).status == "accepted"  # stored and waiting for the slot
            gate.touch()
            await hub.wait_until(lambda: hub.task(t1).status == hub.task(t2).status == "completed", 30)
            no_violations(hub)
        finally:
            await sc.cleanup()


async def test_duplicate_assign_is_reacknowledged_not_run_twice(
    tmp_path: Path, hub: DevHub, sidecar: SidecarProcess
) -> None:
    await sidecar.start()
    runs = tmp_path / "runs"
    gate = tmp_path / "gate"
    cmd = f"echo run >> {runs}; while [ ! -e {gate} ]; do sleep 0.05; done"
    tid = hub.submit(metadata={"shell_command": cmd}, routing_decision=SHELL)
    await hub.wait_until(lambda: hub.task(tid).status == "accepted", 30)
    assign = next(f.frame for f in hub.sent(AGENT, type="task_assign"))
    assert assign is not None
    await hub.send_frame(AGENT, assign)
    await hub.wait_until(lambda: len(hub.frames(AGENT, type="task_accepted")) == 2, 30)
    gate.touch()
    await hub.wait_until(lambda: hub.task(tid).status == "completed", 30)
    assert runs.read_text().split() == ["run"]
    no_violations(hub)


BAD_FRAMES: list[Any] = [
    "this is not json",
    "[1, 2, 3]",
    '{"no_type": true}',
    '{"type": 42}',
    '{"type": "no_such_type", "x": 1}',
    '{"type": "task_assign"}',
    '{"type": "task_assign", "task_id": 17}',
    '{"type": "task_cancelled"}',
    '{"type": "task_ack", "task_id": null, "status": 5}',
    '{"type": "rate_limited", "retry_after_ms": "soon"}',
    '{"type": "task_continue", "task_id": "nope", "generation": "x"}',
    '{"type": "' + "x" * 5000 + '"}',
    "{" * 100_000,
    '{"type": "task_assign", "task_id": "x", "routing_decision": [[[[[[[[[[]]]]]]]]]]}',
]


async def test_bad_frames_never_crash_and_next_task_runs(hub: DevHub, sidecar: SidecarProcess) -> None:
    sidecar.config["max_frame_bytes"] = 256 * 1024
    await sidecar.start()
    await hub.wait_until(lambda: hub.connected(AGENT), 30)
    with trio.fail_after(30):
        for raw in BAD_FRAMES:
            await hub.send_raw(AGENT, raw)
    # A task_assign with a task_id but wrong field types fails that task, naming the field.
    await hub.send_frame(
        AGENT, {"type": "task_assign", "task_id": "bad-1", "generation": 0, "metadata": "not-an-object"}
    )

    def failed_for(tid: str) -> dict[str, Any] | None:
        return next(
            (f.frame for f in hub.frames(AGENT, type="task_failed") if f.frame and f.frame["task_id"] == tid),
            None,
        )

    failed = await hub.wait_until(lambda: failed_for("bad-1"), 30)
    assert "metadata" in failed["error"] and failed["reason"] == "invalid_task"
    nested = await hub.wait_until(lambda: failed_for("x"), 30)
    assert "routing_decision" in nested["error"]
    # An oversized frame closes the socket (1009); the sidecar reconnects.
    await hub.send_raw(AGENT, '{"type":"message","body":"' + "y" * 400_000 + '"}')
    await hub.wait_until(lambda: hub.connected(AGENT), 30)
    tid = hub.submit(metadata={"shell_command": "echo still-serving"}, routing_decision=SHELL)
    rec = await hub.wait_until(lambda: hub.task(tid) if hub.task(tid).status == "completed" else None, 30)
    assert rec.result is not None and "still-serving" in rec.result["output"]
    assert sidecar.proc is not None and sidecar.proc.returncode is None
    assert sidecar.events("bad_frame")
    no_violations(hub)


async def test_lone_surrogate_ids_and_text_never_crash(hub: DevHub, sidecar: SidecarProcess) -> None:
    """JSON can escape a lone surrogate (`"\\ud800"`), which neither UTF-8 nor SQLite can hold.

    A task whose id holds one is failed at once, answered under that very id;
    one holding it only in its text runs as usual. The sidecar lived through
    neither before: the answer's UTF-8 encoding raised in the outbox, and the
    task row's journaled write stopped the store.
    """
    await sidecar.start()
    odd = "t\ud800x"
    bad = hub.submit(task_id=odd, metadata={"shell_command": "true"}, routing_decision=SHELL, max_retries=0)
    rec = await hub.wait_until(lambda: hub.task(bad) if hub.task(bad).failures else None, 30)
    assert rec.failures[0]["reason"] == "invalid_task"
    assert "task_id" in rec.failures[0]["error"] and "surrogate" in rec.failures[0]["error"]
    assert [f.frame["task_id"] for f in hub.frames(AGENT, type="task_failed") if f.frame] == [odd]
    text = hub.submit(
        description="broken \udcff text",
        metadata={"shell_command": "printf 'done'", "note": "\udfff"},
        routing_decision=SHELL,
    )
    done = await hub.wait_until(lambda: hub.task(text) if hub.task(text).status == "completed" else None, 30)
    assert done.result is not None and done.result["output"] == "done"
    assert sidecar.proc is not None and sidecar.proc.returncode is None
    assert sidecar.events("bad_task_assign")
    no_violations(hub)


async def test_absurd_numbers_and_nul_characters_fail_their_task_not_the_sidecar(
    hub: DevHub, sidecar: SidecarProcess
) -> None:
    """Each of these stopped `sidecar run` (exit 1) before: a generation SQLite
    cannot hold (in the journal's owed write, so every start after it too), a
    time limit of 10**400 ms (the deadline's float overflowed; the task stayed in
    flight, so every start after it too), and a NUL in a verification command
    (Popen's ValueError escaped the run). And these were never answered, so a
    real hub would have sent them again every 60 s for ever, holding the agent:
    a 5,000-digit integer in the task, and a task id of 513 characters."""
    await sidecar.start()
    await hub.wait_until(lambda: hub.connected(AGENT), 30)
    long_limit = hub.submit(
        metadata={"shell_command": "echo limitless", "timeout_ms": 10**400}, routing_decision=SHELL
    )
    long_id = hub.submit(
        task_id="t" * 513, metadata={"shell_command": "true"}, routing_decision=SHELL, max_retries=0
    )
    digits = (
        '{"type":"task_assign","task_id":"many-digits","generation":1,'
        '"metadata":{"shell_command":"true","x":'
        + "1" * 5000
        + '},"routing_decision":{"target_type":"sidecar"}}'
    )
    await hub.send_raw(AGENT, digits)
    huge = {
        "type": "task_assign",
        "task_id": "huge-generation",
        "generation": 2**70,
        "metadata": {"shell_command": "true"},
        "routing_decision": SHELL,
    }
    await hub.send_raw(AGENT, json.dumps(huge))
    nul_check = hub.submit(
        metadata={"shell_command": "true"},
        routing_decision=SHELL,
        verification_steps=[{"type": "command_succeeds", "target": "true\x00"}],
        max_retries=0,
    )
    nul_command = hub.submit(metadata={"shell_command": "echo a\x00b"}, routing_decision=SHELL, max_retries=0)
    after = hub.submit(metadata={"shell_command": "echo still-serving"}, routing_decision=SHELL)
    rec = await hub.wait_until(lambda: hub.task(after) if hub.task(after).status == "completed" else None, 30)
    assert rec.result is not None and "still-serving" in rec.result["output"]

    def sent(tid: str) -> dict[str, Any]:
        (frame,) = [
            f.frame
            for f in hub.frames(AGENT)
            if f.frame
            and f.frame.get("task_id") == tid
            and f.frame["type"] != "task_accepted"
            and f.frame["type"] != "task_progress"
        ]
        return frame

    failed = sent("huge-generation")
    assert failed["type"] == "task_failed" and failed["reason"] == "invalid_task"
    assert "generation" in failed["error"] and failed["generation"] == 0
    checked = sent(nul_check)  # a check that cannot start is a failed check, reported as such
    assert checked["type"] == "task_complete"
    assert checked["verification_report"]["checks"][0]["status"] in ("fail", "error")
    refused = sent(nul_command)
    assert refused["type"] == "task_failed" and refused["reason"] == "spawn_failed"
    assert "null" in refused["error"]
    limitless = hub.task(long_limit)
    assert limitless.status == "completed" and limitless.result is not None
    assert "limitless" in limitless.result["output"]
    for tid, field in ((long_id, "task_id"), ("many-digits", "$")):
        answer = sent(tid)
        assert answer["type"] == "task_failed" and answer["reason"] == "invalid_task"
        assert f"field '{field}'" in answer["error"]
    assert sidecar.proc is not None and sidecar.proc.returncode is None
    assert not sidecar.events("task_crashed") and not sidecar.events("journal_record_skipped")
    no_violations(hub)


def _wall(ts: str) -> float:
    import datetime

    return datetime.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()


async def _wait_for(pred: Any, timeout: float = 30) -> None:  # noqa: ASYNC109
    """Wait for a condition the hub cannot signal (files, processes, a hub that is down).

    Re-checked on a short period: this only orders the test, it measures nothing.
    """
    with trio.fail_after(timeout):
        while not pred():  # noqa: ASYNC110 - files and processes offer no event to wait on
            await trio.sleep(0.05)


async def test_restart_request_from_hub_exits_75_gracefully(hub: DevHub, sidecar: SidecarProcess) -> None:
    await sidecar.start()
    await hub.wait_until(lambda: hub.connected(AGENT), 30)
    await hub.send_frame(AGENT, {"type": "restart_sidecar", "reason": "config changed"})
    assert sidecar.proc is not None
    with trio.fail_after(30):
        code = await sidecar.proc.wait()
    assert code == 75  # EX_TEMPFAIL: the service manager starts it again
    assert sidecar.events("shutdown_done")
    no_violations(hub)
