"""What the sidecar does with the hub's answers when they are not the plain ones:
a `task_recovering` dropped or never answered, a result resent and its duplicate
refused, a result in flight for a task taken back, an accept dropped for a task
that ends at once, a `task_continue` that comes after the task's end.

Each runs a real sidecar (`open_sidecar`, real child processes) against
`tests.scripted_hub`, a real WebSocket server answering as each test says, on
virtual time. Found by probing `sidecar run` from outside with such a hub.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from pathlib import Path
from typing import Any

import trio
import trio.testing

from sidecar.app import open_sidecar
from sidecar.procs import task_marker
from sidecar.store import Store
from tests.conftest import Logs
from tests.harness import shell_assign
from tests.scripted_hub import Frame, ScriptedHub, open_scripted_hub

LONG_MS = 3_600_000


def waiting_assign(task_id: str, go: Path, generation: int = 1) -> Frame:
    """A task that runs until the test creates `go` (its own limit: an hour)."""
    frame = shell_assign(task_id, f"while [ ! -e '{go}' ]; do sleep 0.01; done; echo done", generation)
    frame["metadata"]["timeout_ms"] = LONG_MS
    return frame


def config_for(make_config: Any, hub: ScriptedHub, **overrides: Any) -> Any:
    return make_config(hub_url=f"ws://127.0.0.1:{hub.port}/ws", backoff_initial_s=0.1, **overrides)


def rate_limited(ms: int = 1000, tier: str = "normal") -> Frame:
    return {"type": "rate_limited", "retry_after_ms": ms, "tier": tier}


async def test_a_task_recovering_dropped_by_the_rate_limit_is_sent_again(
    clock: trio.testing.MockClock, make_config: Any, tmp_path: Path
) -> None:
    """After a reconnect the hub drops our `task_recovering` (`rate_limited`):
    it is sent again after the pause, and the hub's answer (a new generation)
    is obeyed. Sent once, the task would run on unconfirmed and report under a
    generation the hub no longer holds."""
    go = tmp_path / "go"
    async with open_scripted_hub() as hub:
        recovering: list[Frame] = []

        def answer(frame: Frame) -> list[Frame] | None:
            if frame["type"] != "task_recovering":
                return None
            recovering.append(frame)
            if len(recovering) == 1:
                return [rate_limited(1000)]
            return [{"type": "task_continue", "task_id": frame["task_id"], "generation": 2}]

        hub.answer = answer
        async with open_sidecar(config_for(make_config, hub)):
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(waiting_assign("T", go))
            await hub.wait_for(lambda: hub.of("task_accepted", "T"))
            await hub.close_session()
            await hub.wait_for(lambda: len(hub.of("task_accepted", "T")) == 2)  # after the continue
            go.touch()
            await hub.wait_for(lambda: hub.of("task_complete", "T"))
        [done] = hub.of("task_complete", "T")
    assert len(recovering) == 2
    assert done["generation"] == 2


async def test_a_recovered_task_whose_task_recovering_gets_no_answer_asks_again(
    clock: trio.testing.MockClock, make_config: Any, logs: Logs
) -> None:
    """A task found in the store at start waits for the hub's answer before it
    runs. An answer that never comes (the frame lost) is asked for again after
    30 s, instead of the task holding its slot, and refusing every new task,
    for ever. Its `last_status` is what the store knew: it had started."""
    async with open_scripted_hub() as hub:
        config = config_for(make_config, hub)
        db = config.resolved_state_dir() / "sidecar.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        store = await Store.open(db, durable=False)
        await store.put_task("K", 1, shell_assign("K", "echo recovered"), task_marker(config.agent_id, "K"))
        await store.mark_running("K")  # it had started when the process died
        await store.close()
        asked: list[float] = []

        def answer(frame: Frame) -> list[Frame] | None:
            if frame["type"] != "task_recovering":
                return None
            asked.append(trio.current_time())
            if len(asked) == 1:
                return []  # lost
            return [{"type": "task_continue", "task_id": "K", "generation": 2}]

        hub.answer = answer
        async with open_sidecar(config):
            await hub.wait_for(lambda: hub.of("task_complete", "K"))
        [done] = hub.of("task_complete", "K")
    assert len(asked) == 2 and asked[1] - asked[0] >= 30
    assert [f["last_status"] for f in hub.of("task_recovering", "K")] == ["running", "running"]
    assert done["generation"] == 2 and done["result"]["output"] == "recovered\n"
    assert logs.named("task_recovering_resent")


async def test_the_refusal_of_a_resent_results_duplicate_does_not_retire_the_next_result(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    """A result is sent again after a `rate_limited` that was not its own drop,
    so the hub gets it twice: it acks one and refuses the other, with an
    `error` that names no task. That refusal answers the duplicate, not the
    next result, which the hub has meanwhile dropped: the next result is sent
    again until acked, not retired unsent."""
    async with open_scripted_hub() as hub:
        results: list[Frame] = []

        def answer(frame: Frame) -> list[Frame] | None:
            if frame["type"] != "task_complete":
                return None
            results.append(frame)
            tid = frame["task_id"]
            match len(results):
                case 1:
                    return [rate_limited(500)]  # as if for another frame: the result is kept
                case 2:
                    ack = {"type": "task_ack", "task_id": tid, "status": "complete"}
                    return [ack, {"type": "error", "error": f"task_complete_failed: {tid} is not assigned"}]
                case 3:
                    return [rate_limited(500)]  # this one is dropped
            return None

        hub.answer = answer
        async with open_sidecar(config_for(make_config, hub, capacity=2)):
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(shell_assign("R1", "true"))
            await hub.send(shell_assign("R2", "true"))
            await hub.wait_for(lambda: len(results) == 4)
        first, second = results[0]["task_id"], results[2]["task_id"]
    assert [r["task_id"] for r in results] == [first, first, second, second]
    assert {first, second} == {"R1", "R2"}


async def test_a_rate_limit_of_another_tier_does_not_resend_the_result(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    """A light-tier `rate_limited` drops a ping or a listing, never a result:
    the result in flight is not sent a second time (a duplicate the hub would
    refuse, with an error naming no task)."""
    async with open_scripted_hub() as hub:

        def answer(frame: Frame) -> list[Frame] | None:
            if frame["type"] == "task_complete":
                ack = {"type": "task_ack", "task_id": frame["task_id"], "status": "complete"}
                return [rate_limited(500, tier="light"), ack]
            return None

        hub.answer = answer
        async with open_sidecar(config_for(make_config, hub)):
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(shell_assign("L", "true"))
            await hub.wait_for(lambda: hub.of("task_complete", "L"))
            await trio.sleep(60)
        assert len(hub.of("task_complete", "L")) == 1


async def test_a_result_in_flight_of_a_reassigned_task_is_not_sent_again(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    """`task_reassign`: the task is no longer ours, its result is dropped. One
    already in flight (the hub not answering it) is not resent every 30 s
    either, and the next result does not wait behind it."""
    async with open_scripted_hub() as hub:

        def answer(frame: Frame) -> list[Frame] | None:
            if frame["type"] == "task_complete" and frame["task_id"] == "X":
                return []  # never answered
            return None

        hub.answer = answer
        async with open_sidecar(config_for(make_config, hub)):
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(shell_assign("X", "true"))
            await hub.wait_for(lambda: hub.of("task_complete", "X"))
            await hub.send({"type": "task_reassign", "task_id": "X"})
            reassigned_at = trio.current_time()
            await hub.send(shell_assign("Y", "true"))
            await hub.wait_for(lambda: hub.of("task_complete", "Y"))
            y_after = trio.current_time() - reassigned_at
            await trio.sleep(90)
        assert y_after < 5
        assert len(hub.of("task_complete", "X")) == 1


async def test_a_dropped_accept_of_a_task_that_ends_at_once_goes_before_its_result(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    """The hub drops a `task_accepted` (`rate_limited`) and the task ends within
    the pause: the accept is sent again before the result, so the hub never
    gets a result for a task it did not hear accepted."""
    async with open_scripted_hub() as hub:
        accepts: list[Frame] = []

        def answer(frame: Frame) -> list[Frame] | None:
            if frame["type"] == "task_accepted":
                accepts.append(frame)
                if len(accepts) == 1:
                    return [rate_limited(1500)]
            return None

        hub.answer = answer
        async with open_sidecar(config_for(make_config, hub)):
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(shell_assign("F", "true"))
            await hub.wait_for(lambda: hub.of("task_complete", "F"))
        kinds = [f["type"] for f in hub.received if f.get("task_id") == "F" and f["type"] != "task_progress"]
    assert kinds == ["task_accepted", "task_accepted", "task_complete"]


async def test_a_task_continue_after_the_tasks_end_relabels_its_unanswered_result(
    clock: trio.testing.MockClock, make_config: Any, tmp_path: Path, logs: Logs
) -> None:
    """The task ends while the hub is still answering our `task_recovering`; its
    answer, `task_continue` with a new generation, then names a task we no
    longer hold. The result it has not acked goes again under that generation
    (the hub refuses the old one as stale), and the refusal of the old copy is
    not taken for the new one's answer."""
    go = tmp_path / "go"
    async with open_scripted_hub() as hub:
        held_back: list[Frame] = []

        def answer(frame: Frame) -> list[Frame] | None:
            if frame["type"] == "task_recovering":
                return []  # answered later, by the test
            if frame["type"] == "task_complete" and frame["generation"] == 1:
                held_back.append(frame)
                return []
            return None

        hub.answer = answer
        async with open_sidecar(config_for(make_config, hub)):
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(waiting_assign("G", go))
            await hub.wait_for(lambda: hub.of("task_accepted", "G"))
            await hub.close_session()
            await hub.wait_for(lambda: hub.of("task_recovering", "G"))
            go.touch()
            await hub.wait_for(lambda: held_back)
            await hub.send({"type": "task_continue", "task_id": "G", "generation": 2})
            stale = "task_complete_failed: stale generation 1 (current 2)"
            await hub.send({"type": "error", "error": stale})
            await hub.wait_for(lambda: any(f["generation"] == 2 for f in hub.of("task_complete", "G")))
            await trio.sleep(90)
        generations = [f["generation"] for f in hub.of("task_complete", "G")]
    assert generations == [1, 2]  # and no resend after the ack of the second
    assert logs.named("task_continue_after_end")
    assert not logs.named("result_refused")


async def test_a_graceful_stop_reports_a_task_whose_teardown_takes_both_graces(
    clock: trio.testing.MockClock, make_config: Any, tmp_path: Path
) -> None:
    """SIGTERM to the sidecar with a task that ignores SIGTERM and has left a
    process in another session holding its stdout, without the task's marker
    (`env -i`: nothing can find it until the group is gone): the teardown takes
    the kill grace, then the drain grace (10 s with the defaults). Its
    `task_failed` (`sidecar_shutdown`) is stored after that and still reaches
    the hub before the sidecar stops. (A marked one shares the group's grace:
    `tests/test_procs.py`.)"""
    pidfile = tmp_path / "escapee"
    command = (
        f"trap '' TERM; (env -i setsid /bin/sh -c 'echo $$ > {pidfile}; exec sleep 300' &); "
        "echo started; sleep 300"
    )
    async with open_scripted_hub() as hub:
        async with open_sidecar(config_for(make_config, hub)) as sc:
            await hub.wait_for(lambda: hub.of("identify"))
            frame = shell_assign("S", command)
            frame["metadata"]["timeout_ms"] = LONG_MS
            await hub.send(frame)
            await hub.wait_for(lambda: "started" in str(hub.of("task_progress", "S")))
            while not pidfile.exists() or not pidfile.read_text().strip():  # noqa: ASYNC110 - a file offers no event
                await trio.sleep(0.01)
            stopped_at = trio.current_time()
            await sc.shutdown()
        took = trio.current_time() - stopped_at
        [failed] = hub.of("task_failed", "S")
    # A test process is no subreaper: `sidecar run` kills such an escapee once idle.
    with contextlib.suppress(ProcessLookupError, ValueError):
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert failed["reason"] == "sidecar_shutdown"
    assert took >= 2 * 5  # both graces: the case the old bound cut short


async def test_a_task_queued_behind_a_long_one_is_kept_alive_until_it_runs(
    clock: trio.testing.MockClock, make_config: Any, tmp_path: Path
) -> None:
    """With `queue_length`, a task accepted while the slot is taken waits for it.
    The hub takes back a task that shows no progress for 10 minutes, so the
    queued one gets keep-alives of its own ("queued (N s)") while it waits, as
    the running one does. It had none: behind a 12-minute task it was reclaimed."""
    go = tmp_path / "go"
    async with open_scripted_hub() as hub:
        seen: list[tuple[float, Frame]] = []

        def answer(frame: Frame) -> list[Frame] | None:
            seen.append((trio.current_time(), frame))
            return None

        hub.answer = answer
        async with open_sidecar(config_for(make_config, hub, capacity=1, queue_length=1)):
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(waiting_assign("A", go))
            await hub.wait_for(lambda: hub.of("task_accepted", "A"))
            await hub.send(shell_assign("B", "echo B ran", 1))
            await hub.wait_for(lambda: hub.of("task_accepted", "B"))
            await trio.sleep(720)
            go.touch()
            await hub.wait_for(lambda: hub.of("task_complete", "A") and hub.of("task_complete", "B"))
            await trio.sleep(600)
        [done] = hub.of("task_complete", "B")
    assert done["result"]["output"] == "B ran\n"

    mine = [(t, f) for t, f in seen if f.get("task_id") == "B"]
    [accepted_at] = [t for t, f in mine if f["type"] == "task_accepted"]
    kept = [(t, f["execution_event"]) for t, f in mine if f["type"] == "task_progress"]
    queued = [(t, e) for t, e in kept if e["text"].startswith("queued")]
    assert len(queued) >= 5, kept
    assert all(e["event_type"] == "status" for _, e in queued)
    stamps = [accepted_at] + [t for t, _ in queued]
    assert max(b - a for a, b in itertools.pairwise(stamps)) < 130
    assert [e["seq"] for _, e in kept] == list(range(1, len(kept) + 1))
    order = [(f["type"], f.get("execution_event", {}).get("text")) for _, f in mine]
    assert order[-2:] == [("task_progress", "B ran\n"), ("task_complete", None)]  # nothing once it ended


async def test_a_graceful_stop_closes_the_session_with_going_away(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    """The hub sees a close frame, 1001, when the sidecar stops: not a dropped
    socket (1006), which reads like a crash. The link's session used to be
    cancelled with the daemon's nursery before its close handshake ran."""
    async with open_scripted_hub() as hub:
        async with open_sidecar(config_for(make_config, hub)):
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(shell_assign("T", "echo hi", 1))
            await hub.wait_for(lambda: hub.of("task_complete", "T"))
        await hub.wait_for(lambda: hub.closes)
    [closed] = hub.closes
    assert (closed.code, closed.reason) == (1001, "sidecar stopping")


async def test_a_result_dropped_again_and_again_is_resent_when_the_hub_says(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    """Each `rate_limited` says when the hub's bucket holds a token again: the
    dropped result goes again then, each time. The emptied and penalised model
    alone had waited 2, 4, then 8 s where the hub asked for 0.5 s."""
    async with open_scripted_hub() as hub:
        sent: list[float] = []

        def answer(frame: Frame) -> list[Frame] | None:
            if frame["type"] != "task_complete":
                return None
            sent.append(trio.current_time())
            return [rate_limited(500)] if len(sent) <= 3 else None

        hub.answer = answer
        async with open_sidecar(config_for(make_config, hub)):
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(shell_assign("T", "echo hi", 1))
            await hub.wait_for(lambda: len(sent) == 4)
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(sent)]
    assert all(0.5 <= gap <= 0.6 for gap in gaps), gaps


async def test_a_busy_refusal_while_the_state_disk_stalls_does_not_hold_up_the_link(
    clock: trio.testing.MockClock, make_config: Any, tmp_path: Path
) -> None:
    """A task refused as busy while the store's thread is stuck (a frozen or
    dying state disk) is refused at once, and the link goes on reading: the
    refusal asked the store whether the task had finished here, and waited
    behind the disk, so pongs went unread and the link dropped as dead."""
    go = tmp_path / "go"
    stalled = threading.Event()
    release = threading.Event()

    def stall() -> None:
        stalled.set()
        release.wait(60)

    async with open_scripted_hub() as hub:
        config = config_for(make_config, hub, ping_interval_s=2.0, pong_timeout_s=1.0)
        async with open_sidecar(config) as sidecar, trio.open_nursery() as nursery:
            await hub.wait_for(lambda: hub.of("identify"))
            await hub.send(waiting_assign("A", go))
            await hub.wait_for(lambda: hub.of("task_accepted", "A"))
            nursery.start_soon(sidecar.store.run_blocking, stall)
            try:
                await trio.to_thread.run_sync(stalled.wait)
                await hub.send(shell_assign("B", "echo never", 1))
                await hub.wait_for(lambda: hub.of("task_failed", "B"), timeout=5)
                pings = len(hub.of("ping"))
                await trio.sleep(10)
                assert len(hub.of("ping")) >= pings + 4
                assert hub.sessions == 1
            finally:
                release.set()
            go.touch()
            await hub.wait_for(lambda: hub.of("task_complete", "A"))
    [refused] = hub.of("task_failed", "B")
    assert refused["reason"] == "sidecar_busy"
    assert hub.sessions == 1
