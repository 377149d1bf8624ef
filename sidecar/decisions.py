"""The supervisor's decisions, as pure functions of what it knows.

`decide_assign` takes what is known when a `task_assign` arrives (the run of
that task held here, if any; its stored row; the frame's generation; whether
we are closing; how full we are) and names one `AssignAction`. `decide_end`
takes how a run ended and names the terminal frame (or none) and the outcome.
The supervisor then only performs the I/O each value asks for, in one
direction; the tables in tests/test_decisions.py are their specification.
"""

from __future__ import annotations

import enum
from typing import Any

import attrs

from .dispatcher import DispatchResult
from .messages import complete_frame, failed_frame
from .store import DONE, StoredTask

# Why a task's scope was cancelled (None while running normally).
HUB_CANCEL, REASSIGN, SHUTDOWN = "hub_cancel", "reassign", "shutdown"
# `Held.ending()` of a run past its time limit (no cancel reason of its own).
TIMED_OUT = "timeout"


class AssignAction(enum.Enum):
    ACCEPT = "accept"  # store, hold, run, task_accepted
    AFTER_TEARDOWN = "after_teardown"  # wait for the dying run's end, then decide again
    REACCEPT = "reaccept"  # the same generation again: task_accepted again
    ADOPT_GENERATION = "adopt_generation"  # a newer generation of the run held: adopt it
    IGNORE_STALE = "ignore_stale"  # an older generation than the run held
    IGNORE_FINISHED = "ignore_finished"  # finished here already, for this generation or later
    REFUSE_CLOSING = "refuse_closing"  # shutting down: task_failed
    REFUSE_BUSY = "refuse_busy"  # over capacity + queue: task_failed


@attrs.frozen
class HeldView:
    """What `decide_assign` needs of a held run."""

    generation: int
    ending: str | None  # why it is being torn down, or None while it runs


def decide_assign(
    held: HeldView | None,
    stored: StoredTask | None,
    generation: int,
    *,
    closing: bool,
    held_count: int,
    limit: int,
) -> AssignAction:
    if held is not None:
        if held.ending is not None and (held.ending != TIMED_OUT or generation > held.generation):
            # A run being torn down (reassigned, cancelled; or past its time limit
            # and given out again): the new assignment starts afresh once that
            # run's end is written, and does not inherit the old run's fate.
            return AssignAction.AFTER_TEARDOWN
        if generation == held.generation:
            return AssignAction.REACCEPT
        if generation > held.generation:
            return AssignAction.ADOPT_GENERATION
        return AssignAction.IGNORE_STALE
    if stored is not None and stored.state == DONE and stored.generation >= generation:
        return AssignAction.IGNORE_FINISHED
    if closing:
        return AssignAction.REFUSE_CLOSING
    if held_count >= limit:
        return AssignAction.REFUSE_BUSY
    return AssignAction.ACCEPT


@attrs.frozen
class RunEnd:
    """The terminal frame to store (None: no frame is owed) and the outcome's name."""

    frame: dict[str, Any] | None
    outcome: str


def decide_end(
    task_id: str,
    generation: int,
    result: DispatchResult | None,
    cancel_reason: str | None,
    *,
    started: bool,
    timeout_s: float,
    crash: str | None = None,
) -> RunEnd:
    """How a run ended: its frame and outcome. `crash`: what an exception that
    escaped the run said (a bug, or input nothing foresaw), if one did."""
    if result is not None:
        if cancel_reason == REASSIGN:
            # The task is no longer ours: two agents must never report one task.
            return RunEnd(None, "success" if result.ok else "failure")
        if result.ok and result.result is not None:
            frame = complete_frame(
                task_id,
                generation,
                result.result,
                result.tokens_used,
                result.verification_report,
                result.verification_history,
            )
            return RunEnd(frame, "success")
        error = result.error or "failed"
        return RunEnd(failed_frame(task_id, generation, error, result.reason), "failure")
    if cancel_reason in (HUB_CANCEL, REASSIGN):
        return RunEnd(None, cancel_reason)
    if cancel_reason == SHUTDOWN:
        frame = failed_frame(task_id, generation, "sidecar shut down while the task ran", "sidecar_shutdown")
        return RunEnd(frame, "shutdown")
    if crash is not None:
        frame = failed_frame(task_id, generation, f"internal error: {crash}", "internal_error")
        return RunEnd(frame, "failure")
    if started:
        return RunEnd(
            failed_frame(task_id, generation, f"timed out after {timeout_s:g} s", "timeout"), "timeout"
        )
    return RunEnd(
        failed_frame(task_id, generation, "task ended before it started", "internal_error"), "failure"
    )
