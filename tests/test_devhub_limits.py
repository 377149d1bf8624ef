"""The dev hub's validation, crash-worthy frames, cooldowns and rate limits."""

from __future__ import annotations

import trio
import trio.testing

from sidecar.devhub import RateLimits, TierLimit, open_dev_hub, validate_ws_message
from sidecar.devhub.testclient import open_agent

TOKENS = {"agent-1": "tok-1"}


async def test_validation_failures_are_answered_in_the_hubs_format() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
        await agent.send({"type": "task_complete", "task_id": "t"})  # missing generation
        error = await agent.expect("error", error="validation_failed", message_type="task_complete")
        assert error["errors"] == [
            {"field": "generation", "error": "required", "detail": "field is required"}
        ]

        await agent.send({"type": "task_complete", "task_id": "t", "generation": 1.0})  # wrong type
        error = await agent.expect("error", error="validation_failed")
        assert error["errors"] == [
            {
                "field": "generation",
                "error": "wrong_type",
                "detail": "expected integer, got float",
                "value": 1.0,
            }
        ]

        await agent.send({"type": "task_failed", "task_id": "t", "generation": 1, "error": "x" * 2001})
        error = await agent.expect("error", error="validation_failed", message_type="task_failed")
        assert error["errors"][0]["error"] == "too_long"
        assert error["errors"][0]["detail"] == "exceeds maximum length of 2000 characters"

        for unknown in ("task_rejected", "wake_result", "agent_restarting", "state_report"):
            await agent.send({"type": unknown, "task_id": "t", "reason": "busy"})
            error = await agent.expect("error", error="validation_failed", message_type=unknown)
            assert error["errors"][0]["error"] == "unknown_message_type"
            assert "task_complete" in error["errors"][0]["known_types"]

        await agent.send({"no_type": True})
        error = await agent.expect("error", error="validation_failed", message_type="unknown")
        assert error["errors"][0] == {"field": "type", "error": "required", "detail": "field is required"}

        # Unknown fields pass; exactly 2000 characters pass.
        await agent.send({"type": "ping", "extra": {"a": 1}, "protocol_version": 1})
        await agent.expect("pong")
        kinds = [v.kind for v in hub.violations]
        assert kinds == ["validation_failed"] * 8


def test_validator_types_and_limits() -> None:
    assert validate_ws_message({"type": "resource_report", "cpu_percent": 1.5, "timestamp": 3}) == []
    assert validate_ws_message({"type": "resource_report", "cpu_percent": True})[0]["detail"] == (
        "expected number, got boolean"
    )
    assert validate_ws_message({"type": "identify", "agent_id": "a" * 128, "token": "t"}) == []
    assert (
        validate_ws_message({"type": "identify", "agent_id": "a" * 129, "token": "t"})[0]["field"]
        == "agent_id"
    )
    caps = validate_ws_message({"type": "identify", "agent_id": "a", "token": "t", "capabilities": ["x", 2]})
    assert caps == [
        {
            "field": "capabilities[1]",
            "error": "wrong_type",
            "detail": "expected string, got integer",
            "value": 2,
        }
    ]
    assert validate_ws_message({"type": "task_progress", "task_id": "t", "progress": None}) == []
    assert validate_ws_message({"type": "task_accepted", "task_id": None})[0]["error"] == "required"
    assert validate_ws_message({"type": 5})[0]["detail"] == "expected string, got integer"
    assert validate_ws_message({"type": "state_report", "task_id": "t"}, knows_state_report=True) == []


async def test_garbage_closes_the_socket_and_is_recorded() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        for garbage in ("{not json", "[1, 2]", '"text"', b'{"type":"ping"}', "NaN"):
            async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
                await agent.send_raw(garbage)
                reason, frames = await agent.closed()
                assert reason.code == 1011 and frames == []
        assert [v.kind for v in hub.violations] == [
            "invalid_json",
            "not_an_object",
            "not_an_object",
            "binary",
            "invalid_json",
        ]
        assert hub.internal_errors == []


async def test_invalid_json_error_option() -> None:
    async with open_dev_hub(tokens=TOKENS, invalid_json="error") as hub:
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.send_raw("{oops")
            assert await agent.recv() == {"type": "error", "error": "invalid_json"}
            await agent.send({"type": "ping"})
            await agent.expect("pong")
        assert [v.kind for v in hub.violations] == ["invalid_json"]


async def test_ten_failures_close_1008_then_cooldowns_escalate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        for offence, cooldown in enumerate((30, 60, 300), start=1):
            async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
                for _ in range(10):
                    await agent.send({"type": "task_rejected", "task_id": "t", "reason": "busy"})
                reason, frames = await agent.closed()
                assert reason.code == 1008 and reason.reason == "too many validation errors"
                assert len(frames) == 9  # the tenth failure is not answered
            assert hub.state.cooldowns.count("agent-1") == offence
            async with open_agent(hub.ws_url) as agent:
                await agent.send({"type": "identify", "agent_id": "agent-1", "token": "tok-1"})
                reason, frames = await agent.closed()
                assert frames == []
                # The hub's arithmetic: div(cooldown_ms - elapsed_ms, 1000) + 1.
                assert reason.code == 1008 and reason.reason == f"cooldown active: retry in {cooldown + 1}s"
            await trio.sleep(cooldown - 0.5)
            async with open_agent(hub.ws_url) as agent:
                await agent.send({"type": "identify", "agent_id": "agent-1", "token": "tok-1"})
                reason, _ = await agent.closed()
                assert reason.reason == "cooldown active: retry in 1s"
            await trio.sleep(0.5)
            async with open_agent(hub.ws_url, "agent-1", "tok-1"):
                pass  # cooldown over


async def test_violation_window_is_one_minute(autojump_clock: trio.testing.MockClock) -> None:
    async with open_dev_hub(tokens=TOKENS, idle_timeout=3600) as hub:
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            for _ in range(9):
                await agent.send({"type": "bogus"})
                await agent.expect("error")
            await trio.sleep(61)  # the window expires: counting restarts
            for _ in range(9):
                await agent.send({"type": "bogus"})
                await agent.expect("error")
            await agent.send({"type": "ping"})
            await agent.expect("pong")
        assert hub.state.cooldowns.count("agent-1") == 0


async def test_unidentified_validation_disconnect_sets_no_cooldown() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        async with open_agent(hub.ws_url) as agent:
            for _ in range(10):
                await agent.send({"type": "bogus"})
            reason, _ = await agent.closed()
            assert reason.code == 1008
        async with open_agent(hub.ws_url, "agent-1", "tok-1"):
            pass


async def test_rate_limit_burst_warns_then_drops(autojump_clock: trio.testing.MockClock) -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        task_id = hub.submit({"description": ""})
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign")
            for _ in range(61):  # the normal bucket holds 60
                await agent.send({"type": "task_progress", "task_id": task_id})
            warnings = [
                await agent.expect("rate_limit_warning", tier="normal", capacity=60) for _ in range(12)
            ]
            assert [w["remaining"] for w in warnings] == list(range(11, -1, -1))
            assert await agent.recv() == {"type": "rate_limited", "retry_after_ms": 1000, "tier": "normal"}
            # Dropped: the result frame is refused too while the bucket is empty.
            await agent.send({"type": "task_complete", "task_id": task_id, "generation": 1})
            assert await agent.recv() == {"type": "rate_limited", "retry_after_ms": 1000, "tier": "normal"}
            assert hub.task(task_id).status == "assigned"
            assert len(hub.task(task_id).progress) == 60
            # Light tier is separate.
            await agent.send({"type": "ping"})
            await agent.expect("pong")
            await trio.sleep(1.0)  # one token back
            await agent.send({"type": "task_complete", "task_id": task_id, "generation": 1})
            await agent.expect("rate_limit_warning", remaining=0)
            await agent.expect("task_ack", status="complete")
        assert [v.kind for v in hub.violations] == ["rate_limited", "rate_limited"]


async def test_rate_limited_agent_is_skipped_by_the_scheduler(autojump_clock: trio.testing.MockClock) -> None:
    limits = RateLimits(normal=TierLimit(1, 1))
    async with open_dev_hub(tokens=TOKENS, limits=limits, idle_timeout=3600) as hub:
        first = hub.submit({"description": ""})
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign")
            await agent.send({"type": "task_accepted", "task_id": first})
            await agent.expect("rate_limit_warning")
            await agent.expect("task_ack")
            await agent.send({"type": "task_progress", "task_id": first})
            denied = await agent.expect("rate_limited", tier="normal")
            denied_at = trio.current_time()
            assert denied["retry_after_ms"] == 60_000
            hub.cancel(first)
            await agent.expect("task_cancelled")
            second = hub.submit({"description": ""})
            await agent.expect("task_assign", task_id=second, timeout=120)
            assert trio.current_time() - denied_at >= 60.0


async def test_heavy_identify_and_limits_off() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
        # Identify again on the same socket: rate limited as "heavy" (10 a minute); the first
        # identify of a socket is not rate limited.
        replies = []
        for _ in range(11):
            await agent.send({"type": "identify", "agent_id": "agent-1", "token": "tok-1"})
            frame = await agent.recv()
            if frame["type"] == "rate_limit_warning":
                frame = await agent.recv()
            replies.append(frame["type"])
        assert replies == ["identified"] * 10 + ["rate_limited"]
    async with (
        open_dev_hub(tokens=TOKENS, limits=None) as hub,
        open_agent(hub.ws_url, "agent-1", "tok-1") as agent,
    ):
        for _ in range(200):
            await agent.send({"type": "ping"})
        for _ in range(200):
            await agent.expect("pong")
        assert hub.violations == []
