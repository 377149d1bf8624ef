"""The supervisor with a real store, executors and progress path, and no hub: what it keeps and removes."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.messages import parse_task
from sidecar.procs import MARKER_VAR, task_marker
from sidecar.store import Store
from sidecar.supervisor import Held
from tests.conftest import Logs
from tests.harness import feed, offline_sidecar, shell_assign


async def test_wake_files_of_a_task_that_never_ran_here_are_removed(make_config: Any, tmp_path: Path) -> None:
    """A wake task recovered from the store after a crash and then taken away by
    the hub never reaches the wake executor here: its result files are removed
    at its end all the same, and only that task's files."""
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
    """Once the hub gives a task out again as generation N, stored results of
    generations below N are dropped: the hub would only refuse them as stale,
    one round trip at a time, ahead of the results that matter."""

    config = make_config(backoff_initial_s=60.0)  # no hub: nothing leaves the outbox
    async with offline_sidecar(config) as (sc, store):

        async def results_of(tid: str) -> list[int]:
            return [i.generation for i in await store.outbox() if i.task_id == tid]

        async def run_to_its_end(tid: str, command: str, gen: int) -> None:
            await feed(sc, shell_assign(tid, command, generation=gen))
            with trio.fail_after(20):
                await sc.supervisor.held[tid].done.wait()  # set once the end is stored

        await run_to_its_end("t-1", "echo run-1", 1)
        assert await results_of("t-1") == [1]
        await run_to_its_end("t-1", "echo run-3", 3)
        assert await results_of("t-1") == [3]


async def test_a_process_that_escaped_the_end_of_task_scan_is_killed_soon_after(
    make_config: Any,
) -> None:
    """A process caught mid-exec by the end-of-task scan escapes it; a later sweep
    of the task's marker kills it. Stand-in: a process carrying the marker that
    appears right after the task ended."""

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


async def test_escapees_of_tasks_that_ended_together_are_killed_by_one_late_sweep(
    make_config: Any, logs: Logs
) -> None:
    """Tasks ending within half the late-sweep delay of each other share one scan,
    which finds each one's escapee; a task due later gets a sweep of its own."""

    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, _store):
        escapees = {}
        for tid in ("t-a", "t-b", "t-c"):
            env = {**os.environ, MARKER_VAR: task_marker(config.agent_id, tid)}
            escapees[tid] = await trio.lowlevel.open_process(
                ["sleep", "30"], env=env, stdin=subprocess.DEVNULL, start_new_session=True
            )
        try:
            now = trio.current_time()
            # As `_finish` queues them: (due, task_id, marker), in order of their ends.
            for tid, due in (("t-a", 0.05), ("t-b", 0.06), ("t-c", 2.0)):
                sc.supervisor._late_send.send_nowait((now + due, tid, task_marker(config.agent_id, tid)))
            with trio.fail_after(10):
                codes = {tid: await p.wait() for tid, p in escapees.items()}
        finally:
            for p in escapees.values():
                if p.returncode is None:
                    p.kill()
        assert codes == dict.fromkeys(escapees, -signal.SIGKILL)
        sweeps = [(e["task_ids"], e["killed"]) for e in logs.named("late_leftovers_killed")]
        assert sweeps == [(["t-a", "t-b"], 2), (["t-c"], 1)]


async def test_an_assign_stored_while_the_daemon_begins_to_stop_is_left_for_the_next_start(
    make_config: Any, logs: Logs
) -> None:
    """Chaos seed 469759890: a SIGTERM landed while a new task's row was being written;
    holding it then hit the closed task nursery and the frame handler logged a traceback.
    Now it is neither accepted nor run, and stays in the store as in flight."""

    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, store):
        sup = sc.supervisor
        real_admit = store.admit

        async def admit_then_stop(*args: Any, **kw: Any) -> int | None:
            dropped = await real_admit(*args, **kw)
            sup.stop_taking_work()  # as shutdown() does, while the row was being written
            return dropped

        store.admit = admit_then_stop  # type: ignore[method-assign]
        await feed(sc, shell_assign("t-late", "true"))
        assert "t-late" not in sup.held
        assert not logs.named("frame_handler_failed")
        [stored] = logs.named("task_stored_while_stopping")
        assert stored["task_id"] == "t-late"
        assert [t.task_id for t in await store.in_flight()] == ["t-late"]
        assert sc.accepts._pending == {}  # no task_accepted for it


async def test_holding_a_task_after_the_task_nursery_closed_is_refused_not_raised(make_config: Any) -> None:
    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, _store):
        sup = sc.supervisor
    # offline_sidecar has stopped the daemon: the supervisor's task nursery is closed.
    task = parse_task(shell_assign("t-after", "true"))
    assert sup._hold(Held(task, 1, "m")) is False
    assert "t-after" not in sup.held


async def test_a_fresh_task_runs_only_once_its_accept_is_on_the_wire(make_config: Any) -> None:
    """The hub hears `task_accepted` before the run's set-up and spawn: while the
    accept's send is under way, the task is held but its run has not begun; once the
    send returns, it runs to its end."""
    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, _store):
        sup = sc.supervisor
        sending = trio.Event()
        release = trio.Event()
        real_accept = sc.accepts.accept

        async def slow_accept(task_id: str) -> None:
            sending.set()
            await release.wait()  # the frame still on its way to the socket
            await real_accept(task_id)

        sc.accepts.accept = slow_accept  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed, sc, shell_assign("t-first", "true"))
            with trio.fail_after(10):
                await sending.wait()
            await trio.testing.wait_all_tasks_blocked()
            held = sup.held["t-first"]
            assert not held.started
            release.set()
        with trio.fail_after(20):
            await held.done.wait()
        assert held.started
        assert sup.outcomes == {"success": 1}


async def test_the_daemon_opens_task_logs_in_its_store_thread(
    make_config: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's thread is awake and idle while a task's child runs: the daemon
    creates the task's log file there, not in a trio worker thread (its limiter
    and hand-off cost more on every task's path); `sidecar exec` has no store and
    uses a worker thread."""
    import threading

    from sidecar import output

    opened_in: list[str] = []
    real_open = output._open_append_fd

    def recording_open(path: Path) -> int:
        opened_in.append(threading.current_thread().name)
        return real_open(path)

    monkeypatch.setattr(output, "_open_append_fd", recording_open)
    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, _store):
        await feed(sc, shell_assign("t-log", "echo logged"))
        with trio.fail_after(20):
            await sc.supervisor.held["t-log"].done.wait()
        log_file = sc.supervisor.context.log_path("t-log")
    assert opened_in == ["sidecar-store"]
    assert "logged" in log_file.read_text()


async def test_an_exception_that_escapes_a_run_fails_that_task_and_the_daemon_goes_on(
    make_config: Any, logs: Logs
) -> None:
    """A bug, or input nothing foresaw, raising out of a run: before, it left the
    supervisor's nursery and stopped the daemon, and the task was reported as
    timed out. Now that task fails as `internal_error`, saying what was raised."""
    config = make_config(backoff_initial_s=60.0)  # no hub: results stay in the outbox
    async with offline_sidecar(config) as (sc, store):
        real = sc.supervisor.dispatch

        async def broken(run: Any) -> Any:
            if run.task_id == "t-bug":
                raise ValueError("a bug")
            return await real(run)

        sc.supervisor.dispatch = broken
        for tid, command in (("t-bug", "true"), ("t-ok", "echo fine")):
            await feed(sc, shell_assign(tid, command))
            with trio.fail_after(20):
                await sc.supervisor.held[tid].done.wait()
        frames = {i.task_id: i.frame for i in await store.outbox()}
    assert frames["t-bug"]["type"] == "task_failed" and frames["t-bug"]["reason"] == "internal_error"
    assert frames["t-bug"]["error"] == "internal error: ValueError: a bug"
    assert frames["t-ok"]["type"] == "task_complete"
    (crashed,) = logs.named("task_crashed")
    assert crashed["task_id"] == "t-bug"


async def test_a_timeout_ms_that_is_not_a_number_of_milliseconds_is_named_in_a_warning(
    make_config: Any, logs: Logs
) -> None:
    """`metadata.timeout_ms` of "5000" (or 0, or true) is no limit the task can
    have: the default applies, and a warning says which value was ignored."""
    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, _store):
        frame = shell_assign("t-limit", "true")
        frame["metadata"]["timeout_ms"] = "5000"
        await feed(sc, frame)
        with trio.fail_after(20):
            await sc.supervisor.held["t-limit"].done.wait()
    [warning] = logs.named("task_field_ignored")
    assert warning["field"] == "metadata.timeout_ms"
    assert warning["value"] == "'5000'" and warning["using"] == config.default_timeout_ms / 1000
    assert warning["task_id"] == "t-limit"


async def test_verification_fields_of_the_wrong_kind_are_named_in_warnings(
    make_config: Any, logs: Logs
) -> None:
    """`skip_verification: "yes"` does not skip, a `verification_timeout_ms` of "abc"
    means the default: the task runs, and the log says which value was ignored."""
    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, _store):
        frame = shell_assign("t-v", "true")
        frame.update(skip_verification="yes", verification_timeout_ms="abc", max_verification_retries=9)
        await feed(sc, frame)
        with trio.fail_after(20):
            await sc.supervisor.held["t-v"].done.wait()
    seen = {w["field"]: (w["value"], w["using"]) for w in logs.named("task_field_ignored")}
    assert seen == {
        "skip_verification": ("'yes'", False),
        "verification_timeout_ms": ("'abc'", 120_000),
        "max_verification_retries": ("9", 5),
    }


async def test_a_task_that_empties_its_directory_leaves_the_state_dir_alone(make_config: Any) -> None:
    """Without a `repo_dir` a task works in the state dir's `work/`, not in the
    state dir: `rm -rf ./*` (an ordinary clean step) leaves the database, its
    journal and the logs where they are, and after `rm -rf "$PWD"` the next
    task gets its directory back."""
    config = make_config(backoff_initial_s=60.0)
    state = Path(config.resolved_state_dir())
    async with offline_sidecar(config) as (sc, store):
        for tid, command in (
            ("t-clean", "pwd; rm -rf ./* ./.[!.]*"),
            ("t-gone", 'rm -rf "$PWD"'),
            ("t-next", "pwd"),
        ):
            await feed(sc, shell_assign(tid, command))
            with trio.fail_after(20):
                await sc.supervisor.held[tid].done.wait()
        results = {item.task_id: item.frame for item in await store.outbox()}
    assert results["t-clean"]["result"]["output"] == f"{state / 'work'}\n"
    assert (state / "r.db").exists() and (state / "logs").is_dir()
    assert results["t-next"]["type"] == "task_complete"
    assert results["t-next"]["result"]["output"] == f"{state / 'work'}\n"
