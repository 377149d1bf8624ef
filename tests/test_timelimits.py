"""Per-kind time limits: metadata.timeout_ms wins, else the kind's default, LLM and wake by tier."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.messages import parse_task
from sidecar.timelimits import task_tier, task_time_limit_ms, time_limit_ms

MIN = 60_000


def task(**fields: Any) -> Any:
    return parse_task({"type": "task_assign", "task_id": "t", **fields})


@pytest.mark.parametrize(
    ("fields", "limit"),
    [
        ({"routing_decision": {"target_type": "sidecar"}}, MIN),
        ({"routing_decision": {"target_type": "sidecar"}, "metadata": {"timeout_ms": 5000}}, 5000),
        ({"routing_decision": {"target_type": "claude", "effective_tier": "trivial"}}, 10 * MIN),
        ({"routing_decision": {"target_type": "claude", "effective_tier": "complex"}}, 30 * MIN),
        ({"routing_decision": {"target_type": "ollama", "effective_tier": "standard"}}, 30 * MIN),
        (
            {"routing_decision": {"target_type": "ollama"}, "complexity": {"effective_tier": "trivial"}},
            10 * MIN,
        ),
        ({"routing_decision": {"target_type": "ollama", "effective_tier": "weird"}}, 30 * MIN),
        ({}, 30 * MIN),  # wake, no tier
        ({"complexity": {"effective_tier": "trivial"}}, 10 * MIN),  # wake, trivial
        ({"metadata": {"timeout_ms": 1234}}, 1234),  # wake with its own limit
        ({"routing_decision": {"target_type": "martian"}}, MIN),  # unknown target: fails at once anyway
    ],
)
def test_default_limit_per_kind(make_config: Any, fields: dict[str, Any], limit: int) -> None:
    assert task_time_limit_ms(task(**fields), make_config()) == limit


def test_limits_are_configurable(make_config: Any) -> None:
    cfg = make_config(
        default_timeout_ms=90_000,
        time_limits={"claude_ms": 7 * MIN, "trivial_ms": 2 * MIN, "unknown_ms": 45 * MIN},
    )
    shell = task(routing_decision={"target_type": "sidecar"})
    claude = task(routing_decision={"target_type": "claude", "effective_tier": "trivial"})
    ollama = task(routing_decision={"target_type": "ollama", "effective_tier": "trivial"})
    assert time_limit_ms(shell, "shell", cfg) == 90_000
    assert time_limit_ms(claude, "claude", cfg) == 7 * MIN  # a fixed limit for the kind beats the tier
    assert time_limit_ms(ollama, "ollama", cfg) == 2 * MIN
    assert time_limit_ms(task(), "wake", cfg) == 45 * MIN


def test_tier_prefers_the_routing_decision() -> None:
    t = task(routing_decision={"effective_tier": "Complex"}, complexity={"effective_tier": "trivial"})
    assert task_tier(t) == "complex"
    assert task_tier(task()) == "unknown"
