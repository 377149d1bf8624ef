"""The daemon in-process against the dev hub, under a virtual clock."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import trio
import trio.testing

from sidecar.app import open_sidecar, settle_heap
from sidecar.devhub import open_dev_hub
from sidecar.toolcheck import missing_tools
from tests.conftest import Logs
from tests.harness import feed, offline_sidecar, shell_assign

AGENT, TOKEN = "agent-1", "app-test-token-7"


async def test_reports_sent_per_session_and_stopped_after_a_refusal(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, ollama_url="http://127.0.0.1:9")
        async with open_sidecar(cfg):
            await hub.wait_until(lambda: len(hub.frames(AGENT, type="resource_report")) >= 2, timeout=120)
            first = hub.frames(AGENT, type="identify")[0].at
            reports = hub.frames(AGENT, type="resource_report")
            assert reports[0].at - first == pytest.approx(5, abs=1)
            assert reports[1].at - reports[0].at == pytest.approx(30, abs=1)
            assert all(r.frame is not None and r.frame["agent_id"] == AGENT for r in reports)  # as original
            assert hub.frames(AGENT, type="ollama_report")
            # An older hub refuses the type: the sidecar stops sending it.
            await hub.send_frame(
                AGENT,
                {
                    "type": "error",
                    "error": "validation_failed",
                    "message_type": "resource_report",
                    "errors": [],
                },
            )
            refused_at = trio.current_time()
            await trio.sleep(100)
            later = [f for f in hub.frames(AGENT, type="resource_report") if f.at > refused_at + 1]
            assert later == []
        assert [v for v in hub.violations if v.kind != "rate_limited"] == []


async def test_reassign_then_new_assign_of_same_task_runs_it_again(make_config: Any, tmp_path: Any) -> None:
    """Regression: a task_assign (new generation) arriving while a reassigned run of
    the same task is still being torn down was "adopted" by the dying run and lost."""
    runs = tmp_path / "runs"
    cmd = f'echo run >> {runs}; if [ "$(wc -l < {runs})" -ge 2 ]; then echo second; exit 0; fi; exec sleep 60'
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, kill_grace_s=1.0)
        async with open_sidecar(cfg):
            tid = hub.submit(metadata={"shell_command": cmd}, routing_decision={"target_type": "sidecar"})
            await hub.wait_until(lambda: hub.task(tid).status == "accepted", timeout=30)
            with trio.fail_after(30):
                while not runs.exists():  # noqa: ASYNC110 - a file offers no event
                    await trio.sleep(0.01)
            # The hub took the task back and gives it out again under a new generation:
            # task_reassign, then at once a task_assign for the same task.
            rec = hub.task(tid)
            rec.generation += 2
            assign = {**rec.assigns[-1], "generation": rec.generation}
            await hub.send_frame(AGENT, {"type": "task_reassign", "task_id": tid})
            await hub.send_frame(AGENT, assign)
            done = await hub.wait_until(
                lambda: hub.task(tid) if hub.task(tid).status == "completed" else None, 30
            )
    assert done.result is not None and "second" in done.result["output"]
    assert runs.read_text().split() == ["run", "run"]
    complete = hub.frames(AGENT, type="task_complete")[-1].frame
    assert complete is not None and complete["generation"] == rec.generation


async def test_new_assign_while_a_timed_out_run_is_torn_down_runs_it_again(
    make_config: Any, tmp_path: Any
) -> None:
    """Regression (found by the chaos soak, seed 849652888): a new-generation
    task_assign that arrived while the old run was being killed for its time
    limit was adopted by that dying run, so the new generation got the old run's
    time-out failure without ever running."""
    runs, terms = tmp_path / "runs", tmp_path / "terms"
    cmd = (
        f'echo run >> {runs}; if [ "$(wc -l < {runs})" -ge 2 ]; then echo second; exit 0; fi; '
        f"trap 'echo term >> {terms}' TERM; sleep 60 & wait; sleep 60"
    )
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, kill_grace_s=2.0)
        async with open_sidecar(cfg):
            meta = {"shell_command": cmd, "timeout_ms": 500}
            tid = hub.submit(metadata=meta, routing_decision={"target_type": "sidecar"})
            with trio.fail_after(30):
                while not terms.exists():  # noqa: ASYNC110 - a file offers no event
                    await trio.sleep(0.01)
            # The run is past its time limit, in its SIGTERM grace. The hub now gives
            # the task out again under a new generation.
            rec = hub.task(tid)
            rec.generation += 2
            new_gen = rec.generation
            await hub.send_frame(AGENT, {**rec.assigns[-1], "generation": new_gen})
            done = await hub.wait_until(
                lambda: hub.task(tid) if hub.task(tid).status in ("completed", "dead_letter") else None, 30
            )
    assert runs.read_text().split() == ["run", "run"]
    assert done.status == "completed" and done.result is not None and "second" in done.result["output"]
    # The new generation ran afresh: it completed, and never carried the old run's time-out.
    failed = [f.frame for f in hub.frames(AGENT, type="task_failed") if f.frame]
    assert [f["generation"] for f in failed if f["generation"] >= new_gen] == []
    complete = hub.frames(AGENT, type="task_complete")[-1].frame
    assert complete is not None and complete["generation"] == new_gen


async def test_ack_and_error_frames_with_mistyped_fields_answer_nothing(make_config: Any) -> None:
    """A `task_ack` whose `status` is a list and `error` frames whose fields have
    the wrong types are bad frames: none answers the result in flight, nor
    marks a type as refused; a well-formed ack afterwards still answers it."""

    config = make_config(backoff_initial_s=60.0)
    async with offline_sidecar(config) as (sc, _store):
        await feed(sc, shell_assign("t-1", "echo hi"))
        with trio.fail_after(20):
            await sc.outbox.wait_inflight("t-1")
        await feed(sc, {"type": "task_ack", "task_id": "t-1", "status": ["complete"]})
        await feed(sc, {"type": "error", "error": "validation_failed", "message_type": [1, 2]})
        await feed(sc, {"type": "error", "error": ["stale_generation"], "message_type": {}})
        assert not sc.outbox.inflight_answered  # none of those answered the result
        assert sc.refused_types == set()
        # (No hub here, so the link never connects: the outbox cannot retire the
        # item until it is ready; the answer itself is what a valid ack gives.)
        await feed(sc, {"type": "task_ack", "task_id": "t-1", "status": "complete"})
        assert sc.outbox.inflight_answered


def test_settle_heap_collects_start_up_garbage_then_freezes_what_is_left() -> None:
    """`sidecar run` calls it once it runs: a full collection then never walks the
    start-up heap again (measured: one 18-34 ms stall per ~2,000 tasks without it)."""
    import gc
    import weakref

    class Node:
        def __init__(self) -> None:
            self.me = self

    gc.unfreeze()
    cycle = Node()
    gone = weakref.ref(cycle)
    del cycle  # unreachable now; only the cyclic collector frees it
    assert gone() is not None
    try:
        settle_heap()
        assert gone() is None  # collected before the freeze, not frozen with the rest
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


async def test_missing_tools_are_warned_about_at_start_up(
    make_config: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, logs: Logs
) -> None:
    """With a repo_dir and nothing on PATH but git: claude and gh are named, with
    what fails without them; git is not."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    git = bin_dir / "git"
    git.write_text("#!/bin/sh\nexit 0\n")
    git.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    repo = tmp_path / "repo"
    repo.mkdir()
    cfg = make_config(repo_dir=str(repo), claude={"binary": "claude"})
    assert dict(missing_tools(cfg)) == {
        "claude": "Claude tasks will fail",
        "gh": "task branches are pushed but no pull request is opened",
    }
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        async with open_sidecar(attrs.evolve(cfg, hub_url=hub.ws_url, token=TOKEN)):
            pass
    assert {(w["tool"], w["effect"]) for w in logs.named("tool_missing")} == set(missing_tools(cfg))
    assert missing_tools(attrs.evolve(cfg, repo_dir=None)) == [("claude", "Claude tasks will fail")]
