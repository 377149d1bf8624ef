"""Dispatcher: routing table, per-tier retries on a mock clock, and the result object.

The executors here are scripted fakes: the dispatcher's contract is with the
Executor signature and `Outcome`, not with any real executor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from sidecar.cost import CostModel
from sidecar.dispatcher import (
    Dispatcher,
    DispatchResult,
    UnknownTargetError,
    target_of,
)
from sidecar.executors.registry import REGISTRY
from sidecar.messages import Outcome, ProgressEvent, Task, parse_task
from sidecar.progress import ProgressSender, open_progress
from sidecar.taskrun import TaskRun
from tests.conftest import Logs

# ---------------------------------------------------------------- helpers


def make_task(
    routing: dict[str, Any] | None = None,
    complexity: dict[str, Any] | None = None,
    **metadata: Any,
) -> Task:
    frame: dict[str, Any] = {
        "type": "task_assign",
        "task_id": "t-1",
        "description": "do it",
        "metadata": metadata,
    }
    if routing is not None:
        frame["routing_decision"] = routing
    if complexity is not None:
        frame["complexity"] = complexity
    return parse_task(frame)


def as_run(task: Task, progress: ProgressSender) -> TaskRun:
    return TaskRun(task=task, progress=progress, marker="m", log_path=Path("/nonexistent"), workdir=Path("/"))


def routed(target: str) -> Task:
    return make_task({"target_type": target})


class Scripted:
    """A fake executor returning scripted outcomes; records the trio time of each call."""

    def __init__(self, outcomes: Sequence[Outcome | BaseException], *, hang: bool = False) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[float] = []
        self.hang = hang

    async def __call__(self, run: TaskRun) -> Outcome:
        self.calls.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        item = self.outcomes[min(len(self.calls), len(self.outcomes)) - 1]
        if isinstance(item, BaseException):
            raise item
        return item


TRANSIENT = Outcome(ok=False, error="connection refused", reason="unavailable", transient=True)


class Progress:
    def __init__(self) -> None:
        self.send, self.recv = open_progress(1000)
        self.sender = ProgressSender(self.send, "t-1")

    def texts(self) -> list[str]:
        out: list[str] = []
        while True:
            try:
                event: ProgressEvent = self.recv.receive_nowait()
            except trio.WouldBlock:
                return out
            assert event.event_type == "status"
            assert event.task_id == "t-1"
            out.append(event.text)


@pytest.fixture
def cost(make_config: Any) -> CostModel:
    return CostModel(make_config())


async def dispatch(
    cost: CostModel, kind: str, fake: Scripted, task: Task | None = None
) -> tuple[DispatchResult, list[str]]:
    progress = Progress()
    dispatcher = Dispatcher({kind: fake}, cost)
    task = task or routed({"shell": "sidecar"}.get(kind, kind))
    result = await dispatcher.run(as_run(task, progress.sender))
    return result, progress.texts()


# ---------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("routing", "complexity", "kind"),
    [
        (None, None, "wake"),
        (None, {"effective_tier": "trivial"}, "wake"),  # no decision at all: legacy wake
        ({"target_type": "ollama"}, None, "ollama"),
        ({"target_type": "claude", "selected_model": "claude"}, None, "claude"),
        ({"target_type": "sidecar"}, None, "shell"),
        ({"target_type": "wake"}, None, "wake"),
        ({"target_type": "Claude"}, None, "claude"),
        ({"target_type": "sidecar", "effective_tier": "complex"}, None, "shell"),  # target wins over tier
        # No target_type: tier decides, routing_decision's own tier first.
        ({"effective_tier": "trivial"}, None, "shell"),
        ({"effective_tier": "complex"}, None, "claude"),
        ({"effective_tier": "standard"}, None, "ollama"),
        ({"effective_tier": "unknown"}, None, "ollama"),
        ({}, None, "ollama"),
        ({"target_type": None, "effective_tier": None}, {"effective_tier": "trivial"}, "shell"),
        ({}, {"effective_tier": "complex"}, "claude"),
        ({"effective_tier": "unknown"}, {"effective_tier": "complex"}, "claude"),
        ({"effective_tier": "trivial"}, {"effective_tier": "complex"}, "shell"),
        ({}, {"effective_tier": "standard"}, "ollama"),
    ],
)
def test_target_of(routing: dict[str, Any] | None, complexity: dict[str, Any] | None, kind: str) -> None:
    assert target_of(make_task(routing, complexity)) == kind


def test_target_of_unknown_type_raises() -> None:
    with pytest.raises(UnknownTargetError, match="gpu_cluster"):
        target_of(routed("gpu_cluster"))


async def test_unknown_target_fails_naming_it(cost: CostModel) -> None:
    fakes = {k: Scripted([Outcome(ok=True)]) for k in ("shell", "ollama", "claude", "wake")}
    progress = Progress()
    result = await Dispatcher(fakes, cost).run(as_run(routed("gpu_cluster"), progress.sender))
    assert not result.ok
    assert result.error is not None and "gpu_cluster" in result.error
    assert result.reason == "unknown_target_type"
    assert result.attempts == 0
    assert all(f.calls == [] for f in fakes.values())


async def test_missing_executor_fails_clearly(cost: CostModel) -> None:
    progress = Progress()
    result = await Dispatcher({"shell": Scripted([Outcome(ok=True)])}, cost).run(
        as_run(routed("ollama"), progress.sender)
    )
    assert not result.ok and result.executor == "ollama"
    assert result.error is not None and "ollama" in result.error
    assert result.reason == "executor_unavailable"


@pytest.mark.parametrize("kind", ["shell", "ollama", "claude", "wake"])
async def test_routes_to_executor_by_kind(cost: CostModel, kind: str) -> None:
    fakes = {k: Scripted([Outcome(ok=True)]) for k in ("shell", "ollama", "claude", "wake")}
    task = routed({"shell": "sidecar"}.get(kind, kind))
    result = await Dispatcher(fakes, cost).run(as_run(task, Progress().sender))
    assert result.ok and result.executor == kind
    assert {k: len(f.calls) for k, f in fakes.items()} == {k: int(k == kind) for k in fakes}


# ---------------------------------------------------------------- retries


@pytest.mark.parametrize(
    ("kind", "attempts", "gaps"),
    [
        ("ollama", 3, [1.0, 1.0]),
        ("claude", 4, [2.0, 4.0, 8.0]),
        ("shell", 2, [1.0]),
        ("wake", 1, []),
    ],
)
async def test_retry_counts_and_backoffs(
    autojump_clock: trio.testing.MockClock, cost: CostModel, kind: str, attempts: int, gaps: list[float]
) -> None:
    fake = Scripted([TRANSIENT])
    start = trio.current_time()
    result, _ = await dispatch(cost, kind, fake)
    assert not result.ok
    assert result.attempts == attempts == len(fake.calls)
    assert [b - a for a, b in zip(fake.calls, fake.calls[1:], strict=False)] == gaps
    assert fake.calls[0] == start
    assert result.error is not None and "connection refused" in result.error
    if attempts > 1:
        assert f"after {attempts} attempts" in result.error
    assert result.reason == "unavailable"


async def test_claude_backoffs_exact(autojump_clock: trio.testing.MockClock, cost: CostModel) -> None:
    fake = Scripted([TRANSIENT])
    t0 = trio.current_time()
    result, texts = await dispatch(cost, "claude", fake)
    assert [t - t0 for t in fake.calls] == [0.0, 2.0, 6.0, 14.0]
    assert result.attempts == 4
    assert texts == [
        "Claude attempt 1 failed: connection refused; backing off 2 s…",
        "Claude retry 1/3…",
        "Claude attempt 2 failed: connection refused; backing off 4 s…",
        "Claude retry 2/3…",
        "Claude attempt 3 failed: connection refused; backing off 8 s…",
        "Claude retry 3/3…",
    ]


async def test_a_claude_run_without_its_result_line_is_retried_once(
    autojump_clock: trio.testing.MockClock, cost: CostModel
) -> None:
    cut = Outcome(ok=False, error="CLI ended (SIGKILL) without a result line", reason="claude_no_result")
    fake = Scripted([attrs.evolve(cut, transient=True)])
    result, texts = await dispatch(cost, "claude", fake)
    assert len(fake.calls) == 2 and result.attempts == 2 and not result.ok
    assert result.reason == "claude_no_result"
    assert [t for t in texts if "retry" in t] == ["Claude retry 1/1…"]


async def test_ollama_status_events(autojump_clock: trio.testing.MockClock, cost: CostModel) -> None:
    _, texts = await dispatch(cost, "ollama", Scripted([TRANSIENT]))
    assert [t for t in texts if "retry" in t] == ["Ollama retry 1/2…", "Ollama retry 2/2…"]
    assert sum("backing off 1 s" in t for t in texts) == 2


async def test_success_after_retries(autojump_clock: trio.testing.MockClock, cost: CostModel) -> None:
    ok = Outcome(ok=True, output="done", model_used="claude-haiku-4-5-20251001", tokens_in=10, tokens_out=5)
    fake = Scripted([TRANSIENT, TRANSIENT, ok])
    result, _ = await dispatch(cost, "claude", fake)
    assert result.ok and result.attempts == 3 and len(fake.calls) == 3
    assert result.result is not None
    assert result.result["attempts"] == 3
    assert result.result["output"] == "done"
    assert result.result["execution_ms"] == 6000  # 2 s + 4 s of back-off, executors take no time


async def test_non_transient_not_retried(autojump_clock: trio.testing.MockClock, cost: CostModel) -> None:
    fake = Scripted([Outcome(ok=False, error="bad prompt", reason="invalid", transient=False)])
    result, texts = await dispatch(cost, "claude", fake)
    assert len(fake.calls) == 1 and result.attempts == 1
    assert result.error == "bad prompt" and result.reason == "invalid"
    assert texts == []


async def test_timeout_never_retried(autojump_clock: trio.testing.MockClock, cost: CostModel) -> None:
    fake = Scripted([Outcome(ok=False, error="idle for 60 s", reason="timeout", transient=True)])
    result, _ = await dispatch(cost, "ollama", fake)
    assert len(fake.calls) == 1 and result.attempts == 1 and not result.ok


async def test_executor_crash_is_a_failure_not_retried(
    autojump_clock: trio.testing.MockClock, cost: CostModel, logs: Logs
) -> None:
    fake = Scripted([RuntimeError("boom")])
    result, _ = await dispatch(cost, "claude", fake)
    assert not result.ok and len(fake.calls) == 1
    assert result.error is not None and "RuntimeError: boom" in result.error
    assert result.reason == "executor_crashed"
    assert logs.named("executor_crashed")


async def test_cancel_during_backoff_propagates_and_stops(
    autojump_clock: trio.testing.MockClock, cost: CostModel
) -> None:
    fake = Scripted([TRANSIENT])
    progress = Progress()
    dispatcher = Dispatcher({"claude": fake}, cost)
    finished: list[DispatchResult] = []

    async def runner() -> None:
        finished.append(await dispatcher.run(as_run(routed("claude"), progress.sender)))

    t0 = trio.current_time()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            # The first back-off is announced before the sleep starts.
            event = await progress.recv.receive()
            assert "backing off 2 s" in event.text
            await trio.sleep(1.0)  # well inside the 2 s back-off
            scope.cancel()
    assert scope.cancelled_caught
    assert finished == []
    assert fake.calls == [t0]
    await trio.sleep(60)  # nothing is left running to retry later
    assert fake.calls == [t0]


async def test_cancel_during_attempt_not_retried(
    autojump_clock: trio.testing.MockClock, cost: CostModel
) -> None:
    fake = Scripted([TRANSIENT], hang=True)
    progress = Progress()
    dispatcher = Dispatcher({"claude": fake}, cost)
    with trio.move_on_after(5) as scope:
        await dispatcher.run(as_run(routed("claude"), progress.sender))
    assert scope.cancelled_caught
    assert len(fake.calls) == 1
    assert progress.texts() == []


async def test_injected_sleep_is_used(cost: CostModel) -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    fake = Scripted([TRANSIENT])
    dispatcher = Dispatcher({"claude": fake}, cost, sleep=fake_sleep)
    result = await dispatcher.run(as_run(routed("claude"), Progress().sender))
    assert slept == [2.0, 4.0, 8.0] and result.attempts == 4


def test_policy_table() -> None:
    assert {k: spec.retry.max_retries for k, spec in REGISTRY.items()} == {
        "ollama": 2,
        "claude": 3,
        "shell": 1,
        "wake": 0,
    }


# ---------------------------------------------------------------- result object

BASE_KEYS = {
    "status",
    "output",
    "model_used",
    "tokens_in",
    "tokens_out",
    "estimated_cost_usd",
    "equivalent_claude_cost_usd",
    "execution_ms",
    "attempts",
    "output_truncated",
}


def assert_result_types(result: dict[str, Any]) -> None:
    assert result["status"] == "success"
    assert type(result["output"]) is str
    assert type(result["model_used"]) is str
    assert type(result["tokens_in"]) is int and type(result["tokens_out"]) is int
    assert type(result["estimated_cost_usd"]) is float
    assert result["equivalent_claude_cost_usd"] is None or type(result["equivalent_claude_cost_usd"]) is float
    assert type(result["execution_ms"]) is int
    assert type(result["attempts"]) is int
    assert type(result["output_truncated"]) is bool
    if "exit_code" in result:
        assert type(result["exit_code"]) is int
    assert json.loads(json.dumps(result)) == result


async def test_shell_result(autojump_clock: trio.testing.MockClock, cost: CostModel) -> None:
    async def shell(run: TaskRun) -> Outcome:
        await trio.sleep(1.5)
        return Outcome(ok=True, output="hi\n", exit_code=0, output_truncated=True)

    result = await Dispatcher({"shell": shell}, cost).run(as_run(routed("sidecar"), Progress().sender))
    assert result.ok and result.result is not None and result.executor == "shell"
    assert set(result.result) == BASE_KEYS | {"exit_code"}
    assert_result_types(result.result)
    assert result.result == {
        "status": "success",
        "output": "hi\n",
        "model_used": "none",
        "tokens_in": 0,
        "tokens_out": 0,
        "estimated_cost_usd": 0.0,
        "equivalent_claude_cost_usd": None,
        "execution_ms": 1500,
        "exit_code": 0,
        "attempts": 1,
        "output_truncated": True,
    }
    assert result.tokens_used == 0 and result.error is None and result.reason is None


async def test_ollama_result_free_with_equivalent(cost: CostModel) -> None:
    ok = Outcome(ok=True, output="answer", model_used="qwen3:8b", tokens_in=100_000, tokens_out=10_000)
    result, _ = await dispatch(cost, "ollama", Scripted([ok]))
    assert result.result is not None
    assert set(result.result) == BASE_KEYS
    assert_result_types(result.result)
    assert result.result["model_used"] == "qwen3:8b"
    assert result.result["estimated_cost_usd"] == 0.0
    # Default baseline claude-sonnet-4-5: $3 in / $15 out per MTok.
    assert result.result["equivalent_claude_cost_usd"] == pytest.approx((100_000 * 3 + 10_000 * 15) / 1e6)
    assert result.tokens_used == 110_000


async def test_claude_priced_from_catalogue_when_cli_gives_no_cost(cost: CostModel) -> None:
    ok = Outcome(
        ok=True, output="x", model_used="claude-opus-4-1-20250805", tokens_in=20_000, tokens_out=1_000
    )
    result, _ = await dispatch(cost, "claude", Scripted([ok]))
    assert result.result is not None
    assert_result_types(result.result)
    assert result.result["estimated_cost_usd"] == pytest.approx((20_000 * 15 + 1_000 * 75) / 1e6)
    assert result.result["equivalent_claude_cost_usd"] is None


async def test_claude_reported_cost_wins(cost: CostModel) -> None:
    ok = Outcome(
        ok=True,
        output="x",
        model_used="claude-sonnet-4-5-20250929",
        tokens_in=20_000,
        tokens_out=1_000,
        cost_usd=0.4321,
    )
    result, _ = await dispatch(cost, "claude", Scripted([ok]))
    assert result.result is not None
    assert result.result["estimated_cost_usd"] == 0.4321
    assert result.result["equivalent_claude_cost_usd"] is None


async def test_cost_and_tokens_summed_over_attempts(
    autojump_clock: trio.testing.MockClock, cost: CostModel
) -> None:
    failed = Outcome(
        ok=False,
        error="overloaded",
        transient=True,
        model_used="claude-sonnet-4-5",
        tokens_in=100,
        tokens_out=10,
        cost_usd=0.01,
    )
    ok = Outcome(
        ok=True, output="x", model_used="claude-sonnet-4-5", tokens_in=200, tokens_out=20, cost_usd=0.02
    )
    result, _ = await dispatch(cost, "claude", Scripted([failed, ok]))
    assert result.result is not None
    assert result.result["estimated_cost_usd"] == pytest.approx(0.03)
    assert (result.result["tokens_in"], result.result["tokens_out"]) == (300, 30)
    assert result.tokens_used == 330


async def test_unknown_model_costs_zero_and_logs(cost: CostModel, logs: Logs) -> None:
    ok = Outcome(ok=True, output="x", model_used="claude", tokens_in=10, tokens_out=10)
    result, _ = await dispatch(cost, "claude", Scripted([ok]))
    assert result.result is not None and result.result["estimated_cost_usd"] == 0.0
    assert [e["event"] for e in logs.entries if e["logger"] == "sidecar.cost"] == ["price_unknown"]


async def test_price_override_used_in_result(make_config: Any) -> None:
    cost = CostModel(make_config(prices={"llama3:70b": {"input_per_mtok": 1, "output_per_mtok": 2}}))
    ok = Outcome(ok=True, output="x", model_used="llama3:70b", tokens_in=1_000_000, tokens_out=1_000_000)
    result, _ = await dispatch(cost, "ollama", Scripted([ok]))
    assert result.result is not None and result.result["estimated_cost_usd"] == pytest.approx(3.0)


async def test_wake_result_passed_through(autojump_clock: trio.testing.MockClock, cost: CostModel) -> None:
    own = {"status": "success", "output": "agent did it", "custom": [1, 2]}

    async def wake(run: TaskRun) -> Outcome:
        await trio.sleep(3)
        return Outcome(ok=True, output="ignored", result=own)

    result = await Dispatcher({"wake": wake}, cost).run(as_run(make_task(), Progress().sender))
    assert result.ok and result.executor == "wake"
    assert result.result == {**own, "execution_ms": 3000, "attempts": 1}
    assert "execution_ms" not in own  # the executor's object is not mutated


async def test_wake_result_keeps_its_own_fields(cost: CostModel) -> None:
    own = {"status": "success", "output": "o", "execution_ms": 42, "attempts": 7}
    result, _ = await dispatch(cost, "wake", Scripted([Outcome(ok=True, result=own)]), task=make_task())
    assert result.result == own


async def test_failure_error_truncated(cost: CostModel) -> None:
    fake = Scripted([Outcome(ok=False, error="e" * 5000, reason="r" * 5000)])
    result, _ = await dispatch(cost, "shell", fake)
    assert not result.ok and result.result is None
    assert result.error is not None and len(result.error) <= 2000 and result.error.startswith("eee")
    assert result.reason is not None and len(result.reason) <= 2000


async def test_failure_without_error_text(cost: CostModel) -> None:
    result, _ = await dispatch(cost, "shell", Scripted([Outcome(ok=False, exit_code=2)]))
    assert not result.ok and result.error == "shell task failed" and result.reason is None
