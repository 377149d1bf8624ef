"""The supervisor's decisions as tables: what a task_assign does, and how a run's end is reported."""

from __future__ import annotations

import pytest

from sidecar.decisions import (
    HUB_CANCEL,
    REASSIGN,
    SHUTDOWN,
    TIMED_OUT,
    AssignAction,
    HeldView,
    decide_assign,
    decide_end,
)
from sidecar.dispatcher import DispatchResult
from sidecar.store import DONE, QUEUED, RUNNING, StoredTask

A = AssignAction


def stored(state: str, generation: int) -> StoredTask:
    return StoredTask(task_id="t", generation=generation, frame={}, state=state, marker="m")


@pytest.mark.parametrize(
    ("held", "row", "gen", "closing", "count", "expected"),
    [
        # Nothing held here: the stored row, closing and capacity decide.
        (None, None, 0, False, 0, A.ACCEPT),
        (None, stored(DONE, 2), 2, False, 0, A.IGNORE_FINISHED),
        (None, stored(DONE, 3), 2, False, 0, A.IGNORE_FINISHED),
        (None, stored(DONE, 1), 2, False, 0, A.ACCEPT),  # given out again after we finished
        (None, stored(QUEUED, 2), 2, False, 0, A.ACCEPT),  # a row not finished is no answer
        (None, stored(RUNNING, 5), 2, False, 0, A.ACCEPT),
        (None, None, 0, True, 0, A.REFUSE_CLOSING),
        (None, stored(DONE, 2), 2, True, 0, A.IGNORE_FINISHED),  # finished beats closing
        (None, None, 0, False, 2, A.REFUSE_BUSY),
        (None, None, 0, True, 2, A.REFUSE_CLOSING),  # closing is said before busy
        (None, None, 0, False, 1, A.ACCEPT),
        # A run held here and running.
        (HeldView(2, None), None, 2, False, 1, A.REACCEPT),
        (HeldView(2, None), None, 3, False, 1, A.ADOPT_GENERATION),
        (HeldView(2, None), None, 1, False, 1, A.IGNORE_STALE),
        (HeldView(2, None), None, 2, True, 9, A.REACCEPT),  # held runs ignore closing and capacity
        # A run being torn down.
        (HeldView(2, HUB_CANCEL), None, 2, False, 1, A.AFTER_TEARDOWN),
        (HeldView(2, REASSIGN), None, 1, False, 1, A.AFTER_TEARDOWN),
        (HeldView(2, SHUTDOWN), None, 3, False, 1, A.AFTER_TEARDOWN),
        # Past its time limit: only a newer generation starts afresh.
        (HeldView(2, TIMED_OUT), None, 3, False, 1, A.AFTER_TEARDOWN),
        (HeldView(2, TIMED_OUT), None, 2, False, 1, A.REACCEPT),
        (HeldView(2, TIMED_OUT), None, 1, False, 1, A.IGNORE_STALE),
    ],
)
def test_decide_assign(
    held: HeldView | None, row: StoredTask | None, gen: int, closing: bool, count: int, expected: AssignAction
) -> None:
    assert decide_assign(held, row, gen, closing=closing, held_count=count, limit=2) is expected


OK = DispatchResult(True, {"status": "success"}, None, None, 7, 1, "shell")
FAILED = DispatchResult(False, None, "boom", "exit_code", 0, 2, "shell")
OK_WITHOUT_RESULT = DispatchResult(True, None, None, None, 0, 1, "shell")


@pytest.mark.parametrize(
    ("result", "reason", "started", "frame_type", "outcome", "reason_field"),
    [
        (OK, None, True, "task_complete", "success", None),
        (FAILED, None, True, "task_failed", "failure", "exit_code"),
        (OK_WITHOUT_RESULT, None, True, "task_failed", "failure", None),
        # A result that came in although the scope was cancelled still counts...
        (OK, HUB_CANCEL, True, "task_complete", "success", None),
        (FAILED, SHUTDOWN, True, "task_failed", "failure", "exit_code"),
        # ...except when the task is no longer ours.
        (OK, REASSIGN, True, None, "success", None),
        (FAILED, REASSIGN, True, None, "failure", None),
        # No result: the cancel reason or the time limit.
        (None, HUB_CANCEL, True, None, HUB_CANCEL, None),
        (None, REASSIGN, False, None, REASSIGN, None),
        (None, SHUTDOWN, True, "task_failed", "shutdown", "sidecar_shutdown"),
        (None, SHUTDOWN, False, "task_failed", "shutdown", "sidecar_shutdown"),
        (None, None, True, "task_failed", "timeout", "timeout"),
        (None, None, False, "task_failed", "failure", "internal_error"),
    ],
)
def test_decide_end(
    result: DispatchResult | None,
    reason: str | None,
    started: bool,
    frame_type: str | None,
    outcome: str,
    reason_field: str | None,
) -> None:
    end = decide_end("t", 4, result, reason, started=started, timeout_s=1.5)
    assert end.outcome == outcome
    if frame_type is None:
        assert end.frame is None
        return
    assert end.frame is not None
    assert end.frame["type"] == frame_type and end.frame["task_id"] == "t" and end.frame["generation"] == 4
    assert end.frame.get("reason") == reason_field
    if end.outcome == "timeout":
        assert end.frame["error"] == "timed out after 1.5 s"
    if frame_type == "task_complete":
        assert end.frame["tokens_used"] == 7 and end.frame["result"] == {"status": "success"}


def test_a_run_that_raised_ends_as_an_internal_error_unless_it_was_cancelled() -> None:
    crashed = decide_end("t", 4, None, None, started=True, timeout_s=1.5, crash="ValueError: x")
    assert crashed.outcome == "failure" and crashed.frame is not None
    assert (crashed.frame["reason"], crashed.frame["error"]) == (
        "internal_error",
        "internal error: ValueError: x",
    )
    # A cancellation the hub asked for still says so: the error came from the cancelled run.
    cancelled = decide_end("t", 4, None, HUB_CANCEL, started=True, timeout_s=1.5, crash="ValueError: x")
    assert cancelled.outcome == HUB_CANCEL and cancelled.frame is None
