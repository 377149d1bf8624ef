"""Regression tests for bugs the chaos suite found, one per bug, each written before its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.devhub import open_dev_hub
from sidecar.executors.wake import WakeExecutor
from sidecar.frames import RateLimited
from sidecar.messages import parse_task
from sidecar.procs import MARKER_VAR, task_marker
from sidecar.store import Store
from tests.fakes.proc_helpers import RecordingProgress, make_ctx, task_run
from tests.harness import feed, running_link


@asynccontextmanager
async def offline_sidecar(config: Config, db: str = "r.db") -> AsyncIterator[tuple[Sidecar, Store]]:
    """A real Sidecar (store, supervisor, executors) with no hub: nothing leaves its outbox."""
    store = await Store.open(Path(config.resolved_state_dir()) / db, durable=False)
    try:
        async with httpx.AsyncClient() as http:
            sc = Sidecar(config, store, http)
            async with trio.open_nursery() as nursery:
                await nursery.start(sc.run)
                yield sc, store
                sc.stopped.set()
    finally:
        await store.close()


def shell_assign(task_id: str, command: str, generation: int = 1) -> dict[str, Any]:
    return {
        "type": "task_assign",
        "task_id": task_id,
        "generation": generation,
        "metadata": {"shell_command": command},
        "routing_decision": {"target_type": "sidecar"},
    }


async def test_session_dropped_by_our_side_still_reports_disconnect(make_config: Any) -> None:
    """Chaos seed 1: a failed send ended the session without `on_disconnected`.

    `_drop_session()` (a failed or stalled send, `force_reconnect`, the
    half-open remedy) cleared `identified` before the run loop looked at it, so
    the outbox never heard of the disconnect and waited its full answer
    time-out (30 s) before resending a result whose ack had been lost; every
    result behind it waited too.
    """
    async with open_dev_hub(tokens={"agent-1": "secret-token-123"}) as hub:
        cfg: Config = make_config(hub_url=hub.ws_url, backoff_initial_s=0.01, backoff_max_s=0.05)
        async with running_link(cfg) as (link, rec):
            with trio.fail_after(10):
                await rec.wait(lambda: rec.identified >= 1)
                link.force_reconnect()
                await rec.wait(lambda: rec.identified >= 2)
            assert rec.disconnects == 1


async def test_wake_ignores_result_files_left_by_a_killed_run(make_config: Any, tmp_path: Path) -> None:
    """Chaos seed 5: a kill -9 during a wake task left `<id>.started`/`<id>.json`.

    The next run of the same task (recovered with task_continue, or assigned
    again) found the old result file at once and reported it as its own,
    before the newly woken agent had done anything.
    """
    results, repo = tmp_path / "results", tmp_path / "repo"
    results.mkdir()
    repo.mkdir()
    (results / "task-1.started").write_text("")
    (results / "task-1.json").write_text(json.dumps({"status": "success", "output": "stale"}))
    agent = Path(__file__).parent / "fakes" / "proc_wake_agent.py"
    # Like a real wake command: start the agent in the background and return.
    cmd = f'(sleep 0.3; {sys.executable} {agent} {results} success "${{TASK_ID}}") >/dev/null 2>&1 &'
    cfg = make_config(repo_dir=str(repo), results_dir=str(results), wake_command=cmd, kill_grace_s=0.5)
    ex = WakeExecutor(make_ctx(cfg))
    task = parse_task({"type": "task_assign", "task_id": "task-1", "description": "x", "generation": 2})
    with trio.fail_after(20):
        outcome = await ex(task_run(ex.ctx, task, RecordingProgress(task.task_id)))
    assert outcome.ok and outcome.output == "did task-1"
    assert list(results.iterdir()) == []


async def test_absurd_rate_limited_pause_stays_below_the_hub_acceptance_clock(make_config: Any) -> None:
    """Chaos seed 101: `rate_limited` with `retry_after_ms: 1e308` paused every
    lifecycle frame for 600 s (the old cap), far past the hub's 60 s acceptance
    clock: the sidecar stopped accepting and reporting, and the hub reclaimed
    each of its tasks again and again (Invariant 5: a malformed frame must not
    stop it serving). A real hub asks for at most its 60 s skip window.
    """
    async with open_dev_hub(tokens={"agent-1": "secret-token-123"}) as hub:
        cfg: Config = make_config(hub_url=hub.ws_url, backoff_initial_s=0.01)
        async with running_link(cfg) as (link, rec):
            with trio.fail_after(10):
                await rec.wait(lambda: rec.identified >= 1)
                await hub.send_frame("agent-1", {"type": "rate_limited", "retry_after_ms": 1e308})
                # The link sets its pause, then hands the frame on.
                await rec.wait(lambda: any(isinstance(f, RateLimited) for f in rec.frames))
            assert link.rate_limited_hits == 1
            assert link.paused_until - trio.current_time() <= 30.0


async def test_unhashable_fields_in_ack_and_error_frames_are_not_a_crash(make_config: Any) -> None:
    """Found by the frame fuzzer: a `task_ack` whose `status` is a list (while
    that task's result was in flight) and an `error` whose `message_type` is a
    list raised TypeError out of the frame handler. Both must be ignored, and
    a well-formed ack afterwards still retires the result."""

    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, _store):
        await feed(sc, shell_assign("t-1", "echo hi"))
        with trio.fail_after(20):
            while True:  # the outbox has no public "taken up" event: poll it
                if sc.outbox._inflight is not None:
                    break
                await trio.sleep(0.01)
        await feed(sc, {"type": "task_ack", "task_id": "t-1", "status": ["complete"]})
        await feed(sc, {"type": "error", "error": "validation_failed", "message_type": [1, 2]})
        await feed(sc, {"type": "error", "error": ["stale_generation"], "message_type": {}})
        assert not sc.outbox._answered.is_set()  # none of those answered the result
        assert sc.refused_types == set()
        # (No hub here, so the link never connects: the outbox cannot retire the
        # item until it is ready; the answer itself is what a valid ack gives.)
        await feed(sc, {"type": "task_ack", "task_id": "t-1", "status": "complete"})
        assert sc.outbox._answered.is_set()


async def test_wake_files_of_a_task_reassigned_after_a_crash_are_removed(
    make_config: Any, tmp_path: Path
) -> None:
    """Found by the chaos suite (counted as `wake_leftovers_after_kill9` until now):
    a wake task held when the sidecar was killed with kill -9, then taken away by
    the hub (`task_reassign`) after the restart, never reaches the wake executor
    again, so the result files its agent wrote stayed in results_dir."""
    results = tmp_path / "results"
    results.mkdir()
    config = make_config(backoff_initial_s=60.0, results_dir=str(results), wake_command="true")
    frame = {"type": "task_assign", "task_id": "w-1", "generation": 3, "description": "wake me"}
    db = Path(config.resolved_state_dir()) / "r.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    # What a kill -9 mid-task leaves: the task in the store, the agent's files on disk.
    store = await Store.open(db, durable=False)
    await store.put_task("w-1", 3, frame, task_marker(config.agent_id, "w-1"))
    await store.mark_running("w-1")
    await store.close()
    left = [results / "w-1.started", results / "w-1.json"]
    for path in left:
        path.write_text("{}")
    unrelated = results / "other.json"
    unrelated.write_text("{}")

    async with offline_sidecar(config, db.name) as (sc, store):
        held = sc.supervisor.held["w-1"]  # recovered, waiting for the hub's answer
        await feed(sc, {"type": "task_reassign", "task_id": "w-1"})
        with trio.fail_after(10):
            await held.done.wait()
        assert [p.name for p in left if p.exists()] == []
        assert unrelated.exists()  # only that task's files
        assert await store.outbox() == []  # reassigned: no result of ours


async def test_results_of_older_generations_leave_the_outbox_when_the_task_comes_back(
    make_config: Any,
) -> None:
    """Found by the chaos soak: after a storm of reconnects the outbox held
    dozens of results of older generations of the same tasks, each sent and
    refused as stale one round trip at a time, so the results that mattered
    waited behind them. Once the hub gives a task out again as generation N,
    results of generations below N are dropped: the hub would refuse them."""

    config = make_config(backoff_initial_s=60.0)  # no hub: nothing leaves the outbox
    async with offline_sidecar(config) as (sc, store):

        async def results_of(tid: str) -> list[int]:
            return [i.generation for i in await store.outbox() if i.task_id == tid]

        async def wait_for_result(tid: str, gen: int) -> None:
            with trio.fail_after(20):
                while True:  # the store has no change event: poll it
                    if gen in await results_of(tid):
                        return
                    await trio.sleep(0.01)

        await feed(sc, shell_assign("t-1", "echo run-1", generation=1))
        await wait_for_result("t-1", 1)
        await feed(sc, shell_assign("t-1", "echo run-3", generation=3))
        await wait_for_result("t-1", 3)
        assert await results_of("t-1") == [3]


async def test_a_process_that_escaped_the_end_of_task_scan_is_killed_soon_after(
    make_config: Any,
) -> None:
    """Found by the chaos soak (I2: `setsid sleep 30` of a task that ended 12 ms
    after it began, alive 13 s later): a process caught mid-exec by the
    end-of-task scan escapes it. Stand-in: a process carrying the task's marker
    that appears right after the task ended must still die, by a later sweep."""

    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, _store):
        await feed(sc, shell_assign("t-esc", "true"))
        with trio.fail_after(20):
            await sc.supervisor.held["t-esc"].done.wait()
        env = {**os.environ, MARKER_VAR: task_marker(config.agent_id, "t-esc")}
        escapee = await trio.lowlevel.open_process(
            ["sleep", "30"], env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            with trio.fail_after(5):
                code = await escapee.wait()
        finally:
            if escapee.returncode is None:
                escapee.kill()
        assert code == -signal.SIGKILL
