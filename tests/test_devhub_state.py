"""The dev hub's task state: its index of unfinished tasks answers as a scan of every task would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.devhub.state import ASSIGNED, FINISHED, HubState, TaskError, TaskRecord

AGENTS = ("agent-1", "agent-2")

_op = st.one_of(
    st.tuples(st.just("submit")),
    st.tuples(st.just("assign"), st.integers(0, 30), st.sampled_from(AGENTS)),
    st.tuples(st.just("accept"), st.integers(0, 30)),
    st.tuples(st.just("reclaim"), st.integers(0, 30)),
    st.tuples(st.just("complete"), st.integers(0, 30)),
    st.tuples(st.just("fail"), st.integers(0, 30)),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("restart")),
)


def _scan_queued(state: HubState) -> list[TaskRecord]:
    return sorted((t for t in state.tasks.values() if t.status == "queued"), key=lambda t: t.created_at)


def _scan_assigned(state: HubState, agent: str) -> list[TaskRecord]:
    return [t for t in state.tasks.values() if t.status in ASSIGNED and t.assigned_to == agent]


def _apply(state: HubState, op: tuple[object, ...], now: float) -> HubState:
    ids = list(state.tasks)
    rec = state.tasks[ids[int(op[1]) % len(ids)]] if len(op) > 1 and ids else None  # type: ignore[call-overload]
    frame = {} if rec is None else {"task_id": rec.task_id, "generation": rec.generation}
    match op[0]:
        case "submit":
            state.submit({"metadata": {"shell_command": "true"}}, now, 2)
        case "assign" if rec is not None and rec.status == "queued":
            state.assign(rec, str(op[2]), now, 0, 30.0)
        case "accept" if rec is not None and rec.status == "assigned":
            rec.status = "accepted"  # what the protocol handler does on task_accepted
        case "reclaim" if rec is not None:
            state.reclaim(rec, "agent_disconnect", now)
        case "complete" if rec is not None:
            try:
                state.complete(frame, now)
            except TaskError:
                pass
        case "fail" if rec is not None:
            try:
                state.fail({**frame, "error": "boom"}, now)
            except TaskError:
                pass
        case "cancel" if rec is not None and rec.status not in FINISHED:
            rec.status = "cancelled"  # what DevHub.cancel does
        case "restart":
            return state.restarted()
    return state


@settings(max_examples=200, deadline=None)
@given(st.lists(_op, max_size=60))
def test_queued_and_assigned_match_a_scan_of_every_task(ops: list[tuple[object, ...]]) -> None:
    state = HubState()
    for n, op in enumerate(ops):
        state = _apply(state, op, float(n))
        assert state.queued() == _scan_queued(state)
        for agent in AGENTS:
            assert state.assigned_to(agent) == _scan_assigned(state, agent)
        assert state.open_tasks() == [t for t in state.tasks.values() if t.status not in FINISHED]


def test_finished_tasks_leave_the_index() -> None:
    state = HubState()
    for n in range(500):
        rec = state.submit({"metadata": {"shell_command": "true"}}, float(n), 2)
        state.assign(rec, "agent-1", float(n), 0, 30.0)
        state.complete({"task_id": rec.task_id, "generation": rec.generation}, float(n))
    waiting = state.submit({"metadata": {"shell_command": "true"}}, 500.0, 2)
    assert len(state.tasks) == 501
    # Only the one unfinished task is looked at, however many finished before it.
    assert state.open_tasks() == [waiting]
    assert list(state._open) == [waiting.task_id]  # the finished ones were dropped from the index
    assert state.queued() == [waiting]
    assert state.assigned_to("agent-1") == []
