"""The time limit of a task: its own `metadata.timeout_ms`, else its kind's default.

Shell tasks keep the original's 60 s (`default_timeout_ms`). LLM work and woken
agents are bounded by the task's tier, as the newer original does: `trivial`
10 min, `standard` and `complex` 30 min, anything else 30 min, each
configurable (`[time_limits]`). The supervisor puts this limit on the task's
cancel scope, which then bounds the whole run: execution, verification,
corrective retries and delivery.
"""

from __future__ import annotations

from .config import Config
from .dispatcher import UnknownTargetError, target_of
from .messages import Task

_TIERS = ("trivial", "standard", "complex")


def task_tier(task: Task) -> str:
    """The tier the hub acted on: the routing decision's, else the complexity's, else "unknown"."""
    for value in (
        task.routing_decision.effective_tier if task.routing_decision is not None else None,
        task.complexity.effective_tier if task.complexity is not None else None,
    ):
        if isinstance(value, str) and value.strip().lower() in _TIERS:
            return value.strip().lower()
    return "unknown"


def time_limit_ms(task: Task, kind: str, config: Config) -> int:
    """Milliseconds this task may run, all of its work included.

    `kind` is the executor kind ("shell", "ollama", "claude", "wake"); any
    other kind (an unknown target, failed at once anyway) gets the shell's.
    """
    if task.timeout_ms is not None:
        return task.timeout_ms
    limits = config.time_limits
    per_kind = {"ollama": limits.ollama_ms, "claude": limits.claude_ms, "wake": limits.wake_ms}
    if kind not in per_kind:
        return config.default_timeout_ms
    fixed = per_kind[kind]
    if fixed is not None:
        return fixed
    tier = task_tier(task)
    return {
        "trivial": limits.trivial_ms,
        "standard": limits.standard_ms,
        "complex": limits.complex_ms,
    }.get(tier, limits.unknown_ms)


def task_time_limit_ms(task: Task, config: Config) -> int:
    """The task's limit for its kind of work (an unknown target fails at once anyway)."""
    try:
        kind = target_of(task)
    except UnknownTargetError:
        kind = "unknown"
    return time_limit_ms(task, kind, config)
