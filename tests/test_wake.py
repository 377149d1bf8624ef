"""The legacy wake executor: no injection, retries, confirmation, result files.

Time runs on a MockClock (autojump): back-offs and timeouts pass instantly and
exactly. Each wake attempt's own timeout is infinite in these tests unless a
test is about it, so that the clock never jumps past a real child still
running.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sidecar.executors import wake
from sidecar.executors.wake import RETRY_DELAYS_S, WakeExecutor
from sidecar.executors.waketemplate import expand_in_single_quotes
from sidecar.messages import Outcome, parse_task
from tests.fakes.proc_helpers import RecordingProgress, kill_quietly, make_ctx, task_run, wait_dead

AGENT = Path(__file__).parent / "fakes" / "proc_wake_agent.py"


def agent_cmd(results: Path, mode: str) -> str:
    exe, agent, res = (shlex.quote(str(x)) for x in (sys.executable, AGENT, results))
    return f'{exe} {agent} {res} {mode} "${{TASK_ID}}"'


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    repo, results = tmp_path / "repo", tmp_path / "results"
    repo.mkdir()
    return repo, results


@pytest.fixture
def make_wake(make_config, dirs):  # type: ignore[no-untyped-def]
    repo, results = dirs

    def _make(wake_command: str | None, **overrides: Any) -> WakeExecutor:
        settings: dict[str, Any] = {
            "repo_dir": str(repo),
            "results_dir": str(results),
            "wake_command": wake_command,
            "wake_attempt_timeout_s": math.inf,
            "kill_grace_s": 0.5,
        }
        settings.update(overrides)
        return WakeExecutor(make_ctx(make_config(**settings)))

    return _make


def wake_task(task_id: str = "task-1", description: str = "do the thing") -> Any:
    return parse_task(
        {
            "type": "task_assign",
            "task_id": task_id,
            "description": description,
            "metadata": {"k": "v"},
            "generation": 3,
        }
    )


async def run(ex: WakeExecutor, task: Any = None) -> tuple[Outcome, RecordingProgress]:
    task = task or wake_task()
    progress = RecordingProgress(task.task_id)
    outcome = await ex(task_run(ex.ctx, task, progress))
    return outcome, progress


# --------------------------------------------------------------------------


async def test_no_wake_command_fails_at_once(make_wake, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    t0 = trio.current_time()
    outcome, progress = await run(make_wake(None))
    assert trio.current_time() == t0
    assert not outcome.ok and not outcome.transient
    assert outcome.reason == "no_wake_command" and "wake_command" in (outcome.error or "")
    assert progress.events == []


async def test_success_result_is_reported_and_files_removed(make_wake, dirs, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    _, results = dirs
    outcome, progress = await run(make_wake(agent_cmd(results, "success")))
    assert outcome.ok
    assert outcome.result == {"status": "success", "output": "did task-1", "extra": 1}
    assert outcome.output == "did task-1"
    assert list(results.iterdir()) == []
    assert progress.texts("status")[0] == "wake attempt 1/4"


async def test_failure_result_carries_reason_and_error(make_wake, dirs, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    _, results = dirs
    outcome, _ = await run(make_wake(agent_cmd(results, "fail")))
    assert not outcome.ok and not outcome.transient
    assert outcome.reason == "tests_failed" and outcome.error == "3 tests failed"
    assert list(results.iterdir()) == []


@pytest.mark.parametrize("mode", ["garbage", "array"])
async def test_unparsable_result_fails(make_wake, dirs, autojump_clock, mode: str) -> None:  # type: ignore[no-untyped-def]
    _, results = dirs
    outcome, _ = await run(make_wake(agent_cmd(results, mode)))
    assert not outcome.ok and outcome.reason == "result_parse_error"
    assert (outcome.error or "").startswith("result_parse_error: ")
    assert list(results.iterdir()) == []


async def test_results_dir_defaults_to_state_dir(make_config, dirs, tmp_path: Path, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    repo, _ = dirs
    default = tmp_path / "state" / "results"
    cfg = make_config(
        repo_dir=str(repo), wake_attempt_timeout_s=math.inf, wake_command=agent_cmd(default, "success")
    )
    assert cfg.results_dir is None and Path(cfg.resolved_state_dir()) == tmp_path / "state"
    ex = WakeExecutor(make_ctx(cfg))
    assert ex.results_dir == default
    outcome, _ = await run(ex)
    assert outcome.ok


async def test_confirmation_timeout(make_wake, dirs, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    _, results = dirs
    ex = make_wake(agent_cmd(results, "nothing"), confirmation_timeout_ms=30_000)
    t0 = trio.current_time()
    outcome, _ = await run(ex)
    waited = trio.current_time() - t0
    assert not outcome.ok and outcome.reason == "confirmation_timeout"
    assert "task-1.started" in (outcome.error or "") and not outcome.transient
    assert 30.0 <= waited <= 30.5


async def test_confirmed_agent_is_waited_for_past_the_confirmation_timeout(
    make_wake: Any, dirs: tuple[Path, Path], autojump_clock: trio.abc.Clock
) -> None:
    _, results = dirs
    ex = make_wake(agent_cmd(results, "confirm-only"), confirmation_timeout_ms=1000)
    progress = RecordingProgress("task-1")
    box: list[Outcome] = []
    async with trio.open_nursery() as nursery:

        async def go() -> None:
            box.append(await ex(task_run(ex.ctx, wake_task(), progress)))

        nursery.start_soon(go)
        await progress.wait_for("agent confirmed")
        await trio.sleep(3600)  # an hour later: still waiting, not failed
        assert box == []
        (results / "task-1.json").write_text(json.dumps({"status": "success", "output": "late"}))
    assert box[0].ok and box[0].output == "late"
    assert list(results.iterdir()) == []


async def test_failing_wake_command_is_retried_after_5_15_30_seconds(make_wake, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    ex = make_wake("echo 'no agent here' >&2; exit 1")
    t0 = trio.current_time()
    outcome, progress = await run(ex)
    starts = [
        t - t0
        for t, kind, text in progress.events
        if kind == "status" and text.startswith("wake attempt") and text.endswith("/4")
    ]
    assert starts == pytest.approx([0.0, 5.0, 20.0, 50.0], abs=0.01)
    assert RETRY_DELAYS_S == (5.0, 15.0, 30.0)
    assert not outcome.ok and not outcome.transient and outcome.reason == "wake_failed"
    assert "after 4 attempts" in (outcome.error or "") and "no agent here" in (outcome.error or "")
    backoffs = [text for _, kind, text in progress.events if kind == "status" and "retrying in" in text]
    assert [b.rsplit("retrying in ", 1)[1] for b in backoffs] == ["5 s", "15 s", "30 s"]
    assert progress.texts("stderr") == ["no agent here\n"] * 4


async def test_wake_command_succeeding_on_third_attempt(make_wake, dirs, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    repo, results = dirs
    counter = repo / "count"
    cmd = f"echo x >> {counter}; [ $(wc -l < {counter}) -ge 3 ] || exit 1; {agent_cmd(results, 'success')}"
    t0 = trio.current_time()
    outcome, _ = await run(make_wake(cmd))
    assert outcome.ok
    assert trio.current_time() - t0 == pytest.approx(20.0, abs=0.5)


async def test_each_attempt_is_bounded_and_its_processes_killed(
    make_wake: Any, dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real clock here: a MockClock would jump past the attempt's deadline before
    # the child had even started. Back-offs shrunk so the test stays fast.
    monkeypatch.setattr(wake, "RETRY_DELAYS_S", (0.01, 0.01, 0.01))
    repo, _ = dirs
    pids = repo / "pids"
    ex = make_wake(f"echo $$ >> {pids}; exec sleep 1000", wake_attempt_timeout_s=0.5, kill_grace_s=0.2)
    with trio.fail_after(20):
        outcome, progress = await run(ex)
    assert (
        not outcome.ok
        and outcome.reason == "wake_failed"
        and "timed out after 0.5 s" in (outcome.error or "")
    )
    assert (
        len([t for t in progress.texts("status") if t.startswith("wake attempt") and t.endswith("/4")]) == 4
    )
    seen = [int(p) for p in pids.read_text().split()]
    assert len(seen) == 4
    for pid in seen:
        assert await wait_dead(pid, limit_s=2)


async def test_injection_through_description_or_task_id_never_runs(
    make_wake: Any, dirs: tuple[Path, Path], tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    repo, results = dirs
    keep = tmp_path / "keep"
    keep.write_text("precious")
    p = tmp_path
    description = (
        f'"; touch {p}/pwned1; echo " $(touch {p}/pwned2) `touch {p}/pwned3` ; rm -f {keep}; '
        f"' ; touch {p}/pwned6 ; '"
    )
    task_id = "id-$(touch pwned4)-`touch pwned5`;rm -f keep"
    template = (
        'echo "${TASK_DESCRIPTION}" > desc.txt; echo ${TASK_DESCRIPTION} > desc_unquoted.txt; '
        'echo ${TASK_ID} > id.txt; printf "%s" "${TASK_JSON}" > task.json; ' + agent_cmd(results, "success")
    )
    task = wake_task(task_id, description)
    outcome, _ = await run(make_wake(template), task)
    assert outcome.ok, outcome
    assert sorted(x.name for x in await trio.to_thread.run_sync(lambda: list(tmp_path.rglob("pwned*")))) == []
    assert keep.read_text() == "precious"
    assert (repo / "desc.txt").read_text() == description + "\n"
    assert (repo / "id.txt").read_text() == task_id + "\n"
    # Unquoted: split into words and re-joined by echo, but nothing executed.
    assert "$(touch" in (repo / "desc_unquoted.txt").read_text()
    assert json.loads((repo / "task.json").read_text()) == task.raw
    assert outcome.result is not None and outcome.result["output"] == f"did {task_id}"


async def test_placeholders_in_single_quotes_get_the_value_and_still_never_run_it(
    make_wake: Any, dirs: tuple[Path, Path], tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The original pasted values into the text, so `'${TASK_ID}'` gave the id; a
    value that closes the quote and runs code must stay text."""
    repo, results = dirs
    p = tmp_path
    description = f"it's '; touch {p}/pwned1; ' $(touch {p}/pwned2) \\' `touch {p}/pwned3`"
    template = (
        "printf '%s' '${TASK_DESCRIPTION}' > desc.txt; printf '%s' 'id=${TASK_ID}!' > id.txt; "
        "printf '%s' \"'${TASK_ID}'\" > dq.txt; " + agent_cmd(results, "success")
    )
    outcome, _ = await run(make_wake(template), wake_task("task-7", description))
    assert outcome.ok, outcome
    assert sorted(x.name for x in await trio.to_thread.run_sync(lambda: list(tmp_path.rglob("pwned*")))) == []
    assert (repo / "desc.txt").read_text() == description
    assert (repo / "id.txt").read_text() == "id=task-7!"
    assert (repo / "dq.txt").read_text() == "'task-7'"  # inside double quotes: expanded by sh already


@pytest.mark.parametrize(
    ("template", "expected", "count"),
    [
        ("a '${TASK_ID}' b", """a ''"${TASK_ID}"'' b""", 1),
        ("a '--id=${TASK_ID} x ${TASK_JSON}'", """a '--id='"${TASK_ID}"' x '"${TASK_JSON}"''""", 2),
        ('a "${TASK_ID}" "it\'s ${TASK_ID}"', 'a "${TASK_ID}" "it\'s ${TASK_ID}"', 0),
        ("a \\'${TASK_ID}", "a \\'${TASK_ID}", 0),  # an escaped quote starts nothing
        ("a '${OTHER}' '$TASK_ID'", "a '${OTHER}' '$TASK_ID'", 0),  # only the three, braced
        ("a 'open ${TASK_ID}", "a 'open ${TASK_ID}", 0),  # unterminated: left for sh to refuse
        ("${TASK_ID}", "${TASK_ID}", 0),
    ],
)
def test_expand_in_single_quotes(template: str, expected: str, count: int) -> None:
    assert expand_in_single_quotes(template) == (expected, count)


async def test_woken_agent_left_running_is_killed_when_the_task_ends(make_wake, dirs, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    _, results = dirs
    outcome, _ = await run(make_wake(agent_cmd(results, "background")))
    assert outcome.ok
    pid = int(await trio.Path(results / "bg.pid").read_text())
    try:
        assert await wait_dead(pid, limit_s=2)
    finally:
        kill_quietly(pid)


@pytest.mark.parametrize("task_id", ["../escape", "a/b", ".", ".."])
async def test_task_id_that_cannot_name_a_file_is_refused(
    make_wake: Any, dirs: tuple[Path, Path], task_id: str, autojump_clock: trio.abc.Clock
) -> None:
    _, results = dirs
    outcome, _ = await run(make_wake(agent_cmd(results, "success")), wake_task(task_id))
    assert not outcome.ok and outcome.reason == "bad_task_id"


async def test_cancel_while_waiting_removes_files_and_kills_agent(make_wake, dirs, autojump_clock) -> None:  # type: ignore[no-untyped-def]
    _, results = dirs
    cmd = f"sleep 1000 >/dev/null 2>&1 & echo $! > {results}/agent.pid; {agent_cmd(results, 'confirm-only')}"
    ex = make_wake(cmd)
    progress = RecordingProgress("task-1")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ex, task_run(ex.ctx, wake_task(), progress))
            await progress.wait_for("agent confirmed")
            assert (results / "task-1.started").exists()
            scope.cancel()
    assert scope.cancelled_caught
    assert not (results / "task-1.started").exists()
    pid = int((results / "agent.pid").read_text())
    try:
        assert await wait_dead(pid, limit_s=2)
    finally:
        kill_quietly(pid)


async def test_result_files_of_an_earlier_run_are_not_this_runs(make_config: Any, tmp_path: Path) -> None:
    """Result files an earlier, killed run of the task left behind are removed
    before the agent is woken: only what the newly woken agent writes counts."""
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


@pytest.fixture
def frozen_clock() -> trio.testing.MockClock:
    """Virtual time that moves only when the test says (it turns autojump on)."""
    return trio.testing.MockClock()


def _wait_for_file(path: Path, limit_s: float = 20.0) -> bool:
    """Block (in a worker thread) until `path` exists, at most `limit_s` of real time."""
    import time

    end = time.monotonic() + limit_s
    while not path.exists():
        if time.monotonic() > end:
            return False
        time.sleep(0.005)
    return True


async def test_a_confirmed_agent_in_the_foreground_outlives_the_attempt_bound(
    make_wake: Any, dirs: tuple[Path, Path], frozen_clock: trio.testing.MockClock
) -> None:
    """Found from outside: a wake command that runs the agent in the foreground
    (the onboarding tool's `openclaw agent --message …`) was killed at the attempt
    bound (60 s) although the agent had confirmed, and woken again, four times.
    The agent here confirms at once and works for an hour (virtual) before its
    result; it must run once, unkilled, and its result be the task's."""
    _, results = dirs
    ex = make_wake(agent_cmd(results, "wait-go"), wake_attempt_timeout_s=60.0)
    progress = RecordingProgress("task-1")
    box: list[Outcome] = []
    done = trio.Event()
    async with trio.open_nursery() as nursery:

        async def go() -> None:
            box.append(await ex(task_run(ex.ctx, wake_task(), progress)))
            done.set()

        nursery.start_soon(go)
        # Time stands still until the agent has confirmed (a real process, in real time).
        assert await trio.to_thread.run_sync(_wait_for_file, results / "task-1.started")
        frozen_clock.autojump_threshold = 0
        t0 = trio.current_time()
        with trio.fail_after(600):
            await progress.wait_for("agent confirmed")
        await trio.sleep(3600)
        assert box == []
        assert not any("timed out" in text or "failed" in text for text in progress.texts("status"))
        (results / "task-1.go").write_text("")
        with trio.move_on_after(7200):
            await done.wait()
    assert box and box[0].ok and box[0].output == "did task-1", box
    assert trio.current_time() - t0 >= 3600
    attempts = [t for t in progress.texts("status") if t.startswith("wake attempt")]
    assert attempts == ["wake attempt 1/4"]
    assert sorted(p.name for p in results.iterdir()) == ["task-1.go"]  # the test's own file
