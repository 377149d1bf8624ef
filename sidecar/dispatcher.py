"""Route a task to its executor, retry transient failures, and build the result.

Routing follows the hub's `routing_decision.target_type` (see `target_of`).
Retries follow each kind's policy (`executors.registry`) and happen only for failures the
executor marked `transient`; every retry and back-off is announced as a
`status` progress event. Cancellation is never retried: the supervisor's cancel
scope bounds all attempts together, and `trio.Cancelled` simply propagates.
After the last attempt the dispatcher times, prices and shapes the hub's
`result` object once (protocol.md, `task_complete`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from .cost import CostModel
from .executors import Executor
from .executors.registry import (
    DEFAULT_KIND,
    LEGACY_KIND,
    REGISTRY,
    TARGET_KINDS,
    TIER_KINDS,
    ExecutorSpec,
    RetryPolicy,
)
from .log import bind_context, get_logger
from .messages import LIMITS, Outcome, Task, truncate
from .taskrun import TaskRun

log = get_logger(__name__)

_KNOWN_TIERS = frozenset({"trivial", "standard", "complex"})

# Outcome reasons that are never retried, whatever `transient` says.
_NEVER_RETRY_REASONS = frozenset({"timeout", "cancelled"})
# Outcome reasons retried fewer times than their kind's policy allows. A Claude
# run that dies without its result line may have spent tokens nobody can count
# (the cost is only on that line): one more run, not three.
_RETRY_CAPS = {"claude_no_result": 1}


class UnknownTargetError(ValueError):
    """The routing decision names a target type we do not know."""

    def __init__(self, target_type: str) -> None:
        super().__init__(f"unknown routing target_type {target_type!r} (known: {', '.join(TARGET_KINDS)})")
        self.target_type = target_type


@attrs.frozen
class DispatchResult:
    """What the supervisor turns into `task_complete` (ok) or `task_failed`."""

    ok: bool
    result: dict[str, Any] | None
    error: str | None
    reason: str | None
    tokens_used: int
    attempts: int
    executor: str
    # Set by the pipeline after verification; sent top level in task_complete.
    verification_report: dict[str, Any] | None = None
    verification_history: list[dict[str, Any]] | None = None


def _tier(value: str | None) -> str | None:
    if value is None:
        return None
    tier = value.strip().lower()
    return tier if tier in _KNOWN_TIERS else None


def target_of(task: Task) -> str:
    """The executor kind for a task: "shell", "ollama", "claude" or "wake".

    No routing decision at all is the legacy path: wake. A decision without a
    target_type is routed by tier: the decision's own `effective_tier` first
    (it is the tier the hub's router acted on), else `complexity.effective_tier`;
    trivial -> shell, complex -> claude, standard / unknown / none -> ollama.
    Raises UnknownTargetError for a target_type we do not know.
    """
    decision = task.routing_decision
    if decision is None:
        return LEGACY_KIND
    if decision.target_type is not None and decision.target_type.strip():
        kind = TARGET_KINDS.get(decision.target_type.strip().lower())
        if kind is None:
            raise UnknownTargetError(decision.target_type)
        return kind
    tier = _tier(decision.effective_tier)
    if tier is None and task.complexity is not None:
        tier = _tier(task.complexity.effective_tier)
    return TIER_KINDS.get(tier or "", DEFAULT_KIND)


def _failure(
    error: str, reason: str | None, *, executor: str, attempts: int = 0, tokens_used: int = 0
) -> DispatchResult:
    return DispatchResult(
        ok=False,
        result=None,
        error=truncate(error, LIMITS["error"]),
        reason=truncate(reason, LIMITS["reason"]) if reason is not None else None,
        tokens_used=tokens_used,
        attempts=attempts,
        executor=executor,
    )


class Dispatcher:
    """Runs one task on its executor with the tier's retry policy.

    `executors` maps a kind ("shell", "ollama", "claude", "wake") to an
    executor; a kind with no executor fails its tasks with a clear error.
    """

    def __init__(
        self,
        executors: Mapping[str, Executor],
        cost: CostModel,
        *,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
        specs: Mapping[str, ExecutorSpec] = REGISTRY,
        policies: Mapping[str, RetryPolicy] | None = None,
    ) -> None:
        self._executors = dict(executors)
        self._cost = cost
        self._sleep = sleep
        self._specs = dict(specs)
        self._policies = {name: spec.retry for name, spec in self._specs.items()}
        self._policies.update(policies or {})

    async def run(self, run: TaskRun) -> DispatchResult:
        """Run the task to a result. trio.Cancelled propagates, never retried."""
        task, progress = run.task, run.progress
        try:
            kind = target_of(task)
        except UnknownTargetError as exc:
            log.warning("dispatch_unknown_target", task_id=task.task_id, target_type=exc.target_type)
            return _failure(str(exc), "unknown_target_type", executor="none")
        executor = self._executors.get(kind)
        if executor is None:
            log.warning("dispatch_no_executor", task_id=task.task_id, executor=kind)
            return _failure(
                f"no {kind} executor is configured on this sidecar", "executor_unavailable", executor=kind
            )

        policy = self._policies.get(kind, RetryPolicy())
        spec = self._specs.get(kind)
        label = spec.label if spec is not None else kind
        started = trio.current_time()
        outcomes: list[Outcome] = []
        while True:
            attempt = len(outcomes) + 1
            bind_context(attempt=attempt)
            outcome = await self._attempt(executor, run, kind)
            outcomes.append(outcome)
            limit = min(policy.max_retries, _RETRY_CAPS.get(outcome.reason or "", policy.max_retries))
            if outcome.ok or not self._retryable(outcome) or attempt > limit:
                break
            delay = policy.backoffs_s[attempt - 1]
            what = truncate(outcome.error or outcome.reason or "transient failure", 200)
            log.info(
                "dispatch_retry",
                task_id=task.task_id,
                executor=kind,
                attempt=attempt,
                delay_s=delay,
                error=what,
            )
            if delay > 0:
                await progress.emit(
                    "status", f"{label} attempt {attempt} failed: {what}; backing off {delay:g} s…"
                )
                await self._sleep(delay)
            else:
                await progress.emit("status", f"{label} attempt {attempt} failed: {what}")
            await progress.emit("status", f"{label} retry {attempt}/{limit}…")
        execution_ms = round((trio.current_time() - started) * 1000)
        return self._build(kind, outcomes, execution_ms)

    async def _attempt(self, executor: Executor, run: TaskRun, kind: str) -> Outcome:
        task = run.task
        try:
            return await executor(run)
        except Exception as exc:
            # A bug in an executor must fail its task, not the sidecar. Cancelled
            # (a BaseException, alone or in a group) is not caught here.
            log.error("executor_crashed", task_id=task.task_id, executor=kind, exc_info=True)
            return Outcome(
                ok=False,
                error=f"{kind} executor crashed: {type(exc).__name__}: {exc}",
                reason="executor_crashed",
            )

    @staticmethod
    def _retryable(outcome: Outcome) -> bool:
        return outcome.transient and (outcome.reason or "").lower() not in _NEVER_RETRY_REASONS

    def _attempt_cost(self, kind: str, outcome: Outcome) -> float:
        if outcome.cost_usd is not None:
            # The tool's own figure (the Claude CLI's total_cost_usd) is the truth.
            return outcome.cost_usd
        spec = self._specs.get(kind)
        provider = spec.price_provider if spec is not None else None
        if provider is None or outcome.model_used == "none":
            return 0.0
        cost = self._cost.cost_usd(
            outcome.model_used, outcome.tokens_in, outcome.tokens_out, provider=provider
        )
        return 0.0 if cost is None else cost

    def _priced(self, kind: str) -> bool:
        spec = self._specs.get(kind)
        return spec is not None and spec.price_provider is not None

    def _build(self, kind: str, outcomes: list[Outcome], execution_ms: int) -> DispatchResult:
        last = outcomes[-1]
        attempts = len(outcomes)
        # Failed attempts consumed tokens and money too: report what was spent.
        tokens_in = sum(max(0, o.tokens_in) for o in outcomes)
        tokens_out = sum(max(0, o.tokens_out) for o in outcomes)
        tokens_used = tokens_in + tokens_out
        if not last.ok:
            error = last.error or last.reason or f"{kind} task failed"
            if attempts > 1:
                error = f"{error} (after {attempts} attempts)"
            return _failure(error, last.reason, executor=kind, attempts=attempts, tokens_used=tokens_used)

        if last.result is not None:
            # The wake path: the woken agent's own result object goes through as is.
            result = dict(last.result)
            result.setdefault("execution_ms", execution_ms)
            result.setdefault("attempts", attempts)
            return DispatchResult(True, result, None, None, tokens_used, attempts, kind)

        cost = sum(self._attempt_cost(kind, o) for o in outcomes)
        equivalent: float | None = None
        spec = self._specs.get(kind)
        if spec is not None and spec.local_model:
            equivalent = self._cost.equivalent_claude_cost(tokens_in, tokens_out)
        result = {
            "status": "success",
            "output": last.output,
            "model_used": last.model_used if self._priced(kind) else "none",
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "estimated_cost_usd": float(cost),
            "equivalent_claude_cost_usd": equivalent,
            "execution_ms": execution_ms,
        }
        if last.exit_code is not None:
            result["exit_code"] = last.exit_code
        result["attempts"] = attempts
        result["output_truncated"] = last.output_truncated
        if last.fields:
            result.update({k: v for k, v in last.fields.items() if k not in result})
        return DispatchResult(True, result, None, None, tokens_used, attempts, kind)
