"""The dev hub's WebSocket protocol and task lifecycle, driven by a real trio-websocket client."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sidecar.devhub import DevHub, HubConfig, open_dev_hub
from sidecar.devhub.session import _shutdown_tcp
from sidecar.devhub.testclient import AgentClient, open_agent

TOKENS = {"agent-1": "tok-1", "agent-2": "tok-2"}
SHELL = {"description": "", "metadata": {"shell_command": "echo hi"}}


async def test_identify_ok_and_ping_pong() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url) as agent:
        assert hub.port > 0 and hub.ws_url == f"ws://127.0.0.1:{hub.port}/ws"
        reply = await agent.identify(
            "agent-1", "tok-1", name="a1", capabilities=["code"], client_type="sidecar"
        )
        assert reply == {"type": "identified", "agent_id": "agent-1"}
        assert hub.connected("agent-1")
        await agent.send({"type": "ping", "protocol_version": 1})
        pong = await agent.expect("pong")
        assert isinstance(pong["timestamp"], int) and pong["timestamp"] > 1_600_000_000_000
        assert [f.type for f in hub.frames("agent-1")] == ["identify", "ping"]
        assert [f.type for f in hub.sent("agent-1")] == ["identified", "pong"]


async def test_bad_token_and_mismatch_are_refused_without_closing() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url) as agent:
        assert await agent.identify("agent-1", "nope") == {"type": "error", "error": "invalid_token"}
        assert await agent.identify("agent-1", "tok-2") == {"type": "error", "error": "token_agent_mismatch"}
        assert not hub.connected("agent-1")
        # The real hub only replies: the socket stays open and a good identify still works.
        assert await agent.identify("agent-1", "tok-1") == {"type": "identified", "agent_id": "agent-1"}
        assert [f.verdict for f in hub.frames("agent-1")] == ["auth_failed", "auth_failed", "ok"]


async def test_close_on_auth_error_option() -> None:
    async with open_dev_hub(tokens=TOKENS, close_on_auth_error=True) as hub, open_agent(hub.ws_url) as agent:
        await agent.send({"type": "identify", "agent_id": "agent-1", "token": "nope"})
        reason, frames = await agent.closed()
        assert frames == [{"type": "error", "error": "invalid_token"}]
        assert reason.code == 1008


async def test_shared_token_admits_any_agent() -> None:
    async with open_dev_hub(tokens="shared") as hub:
        async with open_agent(hub.ws_url, "whoever", "shared"):
            assert hub.connected("whoever")


async def test_frames_before_identify_get_not_identified() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url) as agent:
        await agent.send({"type": "ping"})
        assert await agent.recv() == {"type": "error", "error": "not_identified"}
        await agent.send({"type": "task_accepted", "task_id": "t"})
        assert await agent.recv() == {"type": "error", "error": "not_identified"}
        assert [f.verdict for f in hub.frames()] == ["not_identified", "not_identified"]


async def test_assign_accept_progress_complete() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        task_id = hub.submit(
            {**SHELL, "routing_decision": {"target_type": "sidecar"}, "skip_verification": True}
        )
        assert hub.task(task_id).status == "queued" and hub.task(task_id).generation == 0
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            assign = await agent.expect("task_assign", task_id=task_id)
            # As the real hub: every assignment bumps the generation.
            assert assign["generation"] == 1
            assert assign["metadata"] == {"shell_command": "echo hi"}
            assert assign["routing_decision"] == {"target_type": "sidecar"}
            assert assign["skip_verification"] is True
            for key in ("description", "assigned_at", "repo", "branch", "file_hints", "complexity"):
                assert key in assign
            assert hub.task(task_id).status == "assigned"
            await agent.send({"type": "task_accepted", "task_id": task_id})
            await agent.expect("task_ack", task_id=task_id, status="accepted")
            assert hub.task(task_id).status == "accepted"
            for seq in (1, 2):
                event = {"event_type": "stdout", "text": f"line {seq}", "seq": seq, "timestamp": 1}
                await agent.send({"type": "task_progress", "task_id": task_id, "execution_event": event})
            await agent.send(
                {"type": "task_complete", "task_id": task_id, "generation": 1, "result": {"output": "hi"}}
            )
            await agent.expect("task_ack", task_id=task_id, status="complete")
        rec = hub.task(task_id)
        assert rec.status == "completed" and rec.result == {"output": "hi"}
        assert [e["seq"] for e in rec.progress_events] == [1, 2]
        assert rec.ack_statuses == ["accepted", "complete"]


async def test_failed_is_retried_then_dead_lettered() -> None:
    async with open_dev_hub(tokens=TOKENS, max_retries=3) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            statuses = []
            for expected_generation in (1, 3, 5):  # assign +1, retry +1, assign +1, …
                assign = await agent.expect("task_assign", task_id=task_id)
                assert assign["generation"] == expected_generation
                await agent.send({"type": "task_accepted", "task_id": task_id})
                await agent.expect("task_ack", status="accepted")
                await agent.send(
                    {
                        "type": "task_failed",
                        "task_id": task_id,
                        "generation": expected_generation,
                        "error": "boom",
                    }
                )
                statuses.append((await agent.expect("task_ack", task_id=task_id))["status"])
        assert statuses == ["retried", "retried", "dead_letter"]
        rec = hub.task(task_id)
        assert rec.status == "dead_letter" and rec.last_error == "boom" and rec.retry_count == 3


async def test_stale_generation_and_invalid_state_errors() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign")
            await agent.send({"type": "task_complete", "task_id": task_id, "generation": 0})
            assert await agent.recv() == {"type": "error", "error": "task_complete_failed: stale_generation"}
            await agent.send({"type": "task_failed", "task_id": task_id, "generation": 7, "error": "x"})
            assert await agent.recv() == {"type": "error", "error": "task_fail_failed: stale_generation"}
            await agent.send({"type": "task_complete", "task_id": "nope", "generation": 1})
            assert await agent.recv() == {"type": "error", "error": "task_complete_failed: not_found"}
            await agent.send({"type": "task_complete", "task_id": task_id, "generation": 1})
            await agent.expect("task_ack", status="complete")
            await agent.send({"type": "task_complete", "task_id": task_id, "generation": 1})
            assert await agent.recv() == {"type": "error", "error": "task_complete_failed: invalid_state"}
        assert hub.task(task_id).status == "completed"


async def test_disconnect_reclaims_with_generation_bump_and_reassigns() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign", generation=1)
        await hub.wait_until(lambda: hub.task(task_id).status == "queued")
        assert hub.task(task_id).generation == 2
        async with open_agent(hub.ws_url, "agent-2", "tok-2") as other:
            await other.expect("task_assign", task_id=task_id, generation=3)
            # A late result from the first assignment is fenced off.
            await other.send({"type": "task_complete", "task_id": task_id, "generation": 1})
            assert await other.recv() == {"type": "error", "error": "task_complete_failed: stale_generation"}


async def test_no_reclaim_when_disabled() -> None:
    async with open_dev_hub(tokens=TOKENS, reclaim_on_disconnect=False) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign")
        await hub.wait_until(lambda: not hub.connected("agent-1"))
        assert hub.task(task_id).status == "assigned" and hub.task(task_id).generation == 1
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.send({"type": "task_complete", "task_id": task_id, "generation": 1})
            await agent.expect("task_ack", status="complete")


async def test_task_recovering_continue_and_reassign() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        mine = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as a1:
            await a1.expect("task_assign", task_id=mine)
            await a1.send({"type": "task_recovering", "task_id": mine})
            assert await a1.recv() == {"type": "task_continue", "task_id": mine, "generation": 1}
            await a1.send({"type": "task_recovering", "task_id": "unknown"})
            assert await a1.recv() == {"type": "task_reassign", "task_id": "unknown"}
            async with open_agent(hub.ws_url, "agent-2", "tok-2") as a2:
                # Assigned, but to someone else.
                await a2.send({"type": "task_recovering", "task_id": mine})
                assert await a2.recv() == {"type": "task_reassign", "task_id": mine}


@pytest.mark.parametrize("adopt", [True, False])
async def test_recovering_adopts_a_task_reclaimed_at_disconnect(adopt: bool) -> None:
    async with open_dev_hub(tokens=TOKENS, adopt_reclaimed=adopt) as hub:
        task_id = hub.submit({**SHELL, "needed_capabilities": ["gpu"]})
        async with open_agent(hub.ws_url, "agent-1", "tok-1", capabilities=["gpu"]) as agent:
            await agent.expect("task_assign", generation=1)
        await hub.wait_until(lambda: hub.task(task_id).status == "queued")
        assert hub.task(task_id).generation == 2
        # Reconnecting without the capability, the agent is not handed the task again ...
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.send({"type": "task_recovering", "task_id": task_id})
            reply = await agent.recv()
            if adopt:  # ... but may take it back as it stands, generation unchanged.
                assert reply == {"type": "task_continue", "task_id": task_id, "generation": 2}
                assert hub.task(task_id).status == "assigned"
                assert hub.task(task_id).assigned_to == "agent-1"
            else:  # a stock hub: the task is queued, so it is no longer ours
                assert reply == {"type": "task_reassign", "task_id": task_id}
                assert hub.task(task_id).status == "queued"
        async with open_agent(hub.ws_url, "agent-2", "tok-2") as other:
            # Another agent never adopts it.
            await other.send({"type": "task_recovering", "task_id": task_id})
            assert await other.recv() == {"type": "task_reassign", "task_id": task_id}


async def test_state_report_known_only_to_newer_hubs() -> None:
    async with open_dev_hub(tokens=TOKENS, knows_state_report=True) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign")
            await agent.send(
                {"type": "state_report", "task_id": task_id, "generation": 1, "status": "running"}
            )
            assert await agent.recv() == {
                "type": "state_report_ack",
                "task_id": task_id,
                "action": "continue",
            }
            await agent.send({"type": "state_report", "task_id": "gone"})
            assert await agent.recv() == {"type": "state_report_ack", "task_id": "gone", "action": "abort"}
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
        await agent.send({"type": "state_report", "task_id": "t"})
        error = await agent.expect("error", error="validation_failed", message_type="state_report")
        assert error["errors"][0]["error"] == "unknown_message_type"


async def test_cancel_sends_task_cancelled() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign")
            assert hub.cancel(task_id)
            cancelled = await agent.expect("task_cancelled", task_id=task_id)
            assert isinstance(cancelled["timestamp"], int)
            assert hub.task(task_id).status == "cancelled"
            assert not hub.cancel(task_id)


async def test_concurrency_limit_per_agent() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        first, second = hub.submit(SHELL), hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign", task_id=first)
            await agent.send({"type": "ping"})
            await agent.expect("pong")  # nothing else was pushed in between
            assert hub.task(second).status == "queued"
            await agent.send({"type": "task_complete", "task_id": first, "generation": 1})
            await agent.expect("task_ack", status="complete")
            await agent.expect("task_assign", task_id=second)
    async with open_dev_hub(tokens=TOKENS, concurrency=2) as hub:
        first, second = hub.submit(SHELL), hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign", task_id=first)
            await agent.expect("task_assign", task_id=second)


async def test_needed_capabilities_and_assign_to() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        gpu = hub.submit({**SHELL, "needed_capabilities": ["gpu"]})
        pinned = hub.submit({**SHELL, "assign_to": "agent-2"})
        async with open_agent(hub.ws_url, "agent-1", "tok-1", capabilities=["code"]) as a1:
            async with open_agent(hub.ws_url, "agent-2", "tok-2", capabilities=["gpu"]) as a2:
                await a2.expect("task_assign", task_id=gpu)
                await a1.send({"type": "ping"})
                await a1.expect("pong")
                assert hub.task(pinned).status == "queued"


async def test_acceptance_timeout_reclaims(autojump_clock: trio.testing.MockClock) -> None:
    # (A sidecar silent for 60 s would also be closed as idle: keep the socket open here.)
    async with open_dev_hub(tokens=TOKENS, limits=None, idle_timeout=3600) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign", generation=1)
            start = trio.current_time()
            # Not accepted: after 60 s the hub takes it back and (agent idle again) reassigns it.
            await agent.expect("task_assign", task_id=task_id, generation=3, timeout=59.0 + 5)
            assert 60.0 <= trio.current_time() - start < 61.0
            await agent.send({"type": "task_accepted", "task_id": task_id})
            await agent.expect("task_ack", status="accepted")
            history = [(event, info.get("reason")) for event, _, info in hub.task(task_id).history]
            assert ("reclaimed", "acceptance_timeout") in history
            assert hub.task(task_id).status == "accepted"


async def test_stuck_task_is_reclaimed_and_progress_keeps_it(autojump_clock: trio.testing.MockClock) -> None:
    async with open_dev_hub(tokens=TOKENS, limits=None, idle_timeout=10_000) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign")
            await agent.send({"type": "task_accepted", "task_id": task_id})
            await agent.expect("task_ack")
            for _ in range(3):  # a keep-alive every 5 minutes keeps the task
                await trio.sleep(300)
                await agent.send({"type": "task_progress", "task_id": task_id})
                await agent.send({"type": "ping"})
                await agent.expect("pong")
            assert hub.task(task_id).status == "accepted"
            await hub.wait_until(lambda: hub.task(task_id).status != "accepted", timeout=601)
            assert hub.task(task_id).history[-2][0] == "reclaimed"
            assert hub.task(task_id).history[-2][2]["reason"] == "stuck"


async def test_idle_socket_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
        start = trio.current_time()
        reason, _ = await agent.closed(timeout=120)
        assert reason.code == 1001
        assert 60.0 <= trio.current_time() - start < 61.0
        await hub.wait_until(lambda: not hub.connected("agent-1"))


async def test_new_identify_replaces_the_old_session_without_reclaim() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as old:
            await old.expect("task_assign", generation=1)
            async with open_agent(hub.ws_url, "agent-1", "tok-1") as new:
                reason, _ = await old.closed()
                assert reason.code == 1000
                # The task stayed assigned (same generation): the new session may finish it.
                assert hub.task(task_id).status == "assigned" and hub.task(task_id).generation == 1
                await new.send({"type": "task_recovering", "task_id": task_id})
                assert await new.recv() == {"type": "task_continue", "task_id": task_id, "generation": 1}


async def test_drop_is_abrupt_and_reclaims() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign")
            await hub.drop("agent-1")
            reason, _ = await agent.closed()
            assert reason.code == 1006  # no close frame
        assert hub.task(task_id).status == "queued" and hub.task(task_id).generation == 2


async def test_stall_stops_pongs_until_released() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
        hub.stall("agent-1")
        await agent.send({"type": "ping"})
        with trio.move_on_after(0.3) as waited:
            await agent.recv()
        assert waited.cancelled_caught
        assert hub.frames("agent-1", type="ping") == []
        hub.stall("agent-1", False)
        await agent.expect("pong")


async def test_send_raw_injects_frames() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        task_id = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            assign = await agent.expect("task_assign")
            await hub.send_frame("agent-1", {**assign, "generation": 0})
            await hub.send_raw("agent-1", "{garbage")
            assert (await agent.recv())["generation"] == 0
            assert await agent.ws.get_message() == "{garbage"
            assert hub.task(task_id).generation == 1


async def test_send_raw_returns_when_the_session_ends_before_writing() -> None:
    """Regression (found by the chaos soak): a frame queued to a stalled session
    that is then dropped was never written, and `send_raw` waited for ever, so
    the chaos driver's fault injector stopped for the rest of the episode."""
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url, "agent-1", "tok-1"):
        hub.stall("agent-1")
        async with trio.open_nursery() as nursery:
            sent = trio.Event()

            async def send() -> None:
                await hub.send_raw("agent-1", "{never-written")
                sent.set()

            nursery.start_soon(send)
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()  # stalled: not written yet
            await hub.drop("agent-1")
            with trio.fail_after(5):
                await sent.wait()
        # It was not written (the socket was gone), and the hub does not claim it was.
        assert all(f.text != "{never-written" for f in hub.sent("agent-1"))


async def _unread_frames(hub: DevHub, agent: AgentClient, n: int) -> None:
    """`n` frames the hub has not read: hypercorn's own reader holds the 11th, waiting
    on the app's full queue (`max_app_queue_size`, 10)."""
    hub.stall("agent-1")
    for _ in range(n):
        await agent.send({"type": "ping"})
    await trio.testing.wait_all_tasks_blocked(cushion=0.05)
    assert hub.frames("agent-1", type="ping") == []


async def test_drop_ends_a_session_that_left_frames_unread() -> None:
    """Regression (chaos CI, `hub.drop` timed out): the session's last `websocket.close`
    hit the shut-down socket, and hypercorn's handler then queued `websocket.disconnect`
    to the app's full queue from the app's own task, which waited for ever."""
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
        await _unread_frames(hub, agent, 11)
        with trio.fail_after(5):
            await hub.drop("agent-1")
        assert not hub.connected("agent-1")


async def test_close_ends_a_session_whose_peer_is_gone_with_frames_unread() -> None:
    """The writer's close frame on a connection already gone, frames unread: the same wait."""
    async with open_dev_hub(tokens=TOKENS) as hub, open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
        await _unread_frames(hub, agent, 12)
        s = hub.agents()["agent-1"]
        _shutdown_tcp(s.server, s.client)  # as a reset would
        hub.stall("agent-1", False)
        with trio.fail_after(5):
            await hub.disconnect("agent-1", 1001, "going away")


async def test_registry_bug_sends_pushes_to_the_stale_socket() -> None:
    config = HubConfig(tokens=TOKENS, registry_bug=True)
    async with open_dev_hub(config=config) as hub:
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as old:
            hub.stall("agent-1")  # the old socket is half-open from the hub's side
            async with open_agent(hub.ws_url, "agent-1", "tok-1") as new:
                task_id = hub.submit(SHELL)
                assert hub.task(task_id).status == "assigned"
                await new.send({"type": "ping"})
                await new.expect("pong")  # identified and served, but the assignment went elsewhere
                assert [f.session for f in hub.sent("agent-1", type="task_assign")] == []
                hub.stall("agent-1", False)
                assign = await old.expect("task_assign", task_id=task_id)
                assert assign["generation"] == 1


async def test_hub_records_an_injected_undecodable_deep_frame() -> None:
    """Regression (chaos seed 103): the hub's own record of a deeply nested frame it
    injected raised RecursionError in its writer and crashed the agent's session."""
    from sidecar.devhub import open_dev_hub
    from sidecar.devhub.testclient import open_agent

    async with (
        open_dev_hub(tokens={"agent-1": "tok"}) as hub,
        open_agent(hub.ws_url, "agent-1", "tok") as agent,
    ):
        deep = "[" * 100_000 + "]" * 100_000
        with trio.fail_after(10):
            await hub.send_raw("agent-1", deep)
            assert await agent.ws.get_message() == deep
            await agent.send({"type": "ping"})
            await agent.expect("pong")
        assert hub.internal_errors == []
        assert hub.sent("agent-1")[-2].frame is None


class _ScriptedServer:
    """The server side of one ASGI websocket: records what the app sends, can refuse a write."""

    def __init__(self, refuse: str | None = None) -> None:
        self.sent: list[dict[str, object]] = []
        self.refuse = refuse  # a message type whose write collides with the server's own

    async def receive(self) -> dict[str, object]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, object]) -> None:
        self.sent.append(message)
        await trio.lowlevel.checkpoint()
        if message["type"] == self.refuse:
            raise trio.BusyResourceError("another task is currently sending data on this SocketStream")


async def _run_and_drop(server: _ScriptedServer, *frames: str) -> None:
    from sidecar.devhub.session import Session

    s = Session(1, None, None, 0.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(s.run, server.receive, server.send, lambda *_: None, lambda *_: None, 60.0)
        for frame in frames:
            s.push_raw(frame)
        await trio.testing.wait_all_tasks_blocked()
        s.abort()


@pytest.mark.parametrize("refuse", [None, "websocket.close", "websocket.send"])
async def test_a_dropped_session_closes_its_socket_itself_before_the_app_returns(refuse: str | None) -> None:
    """An app that returns with its websocket open leaves hypercorn to send a close frame
    of its own from the app's task; when that write meets hypercorn's own `send_eof`
    (its reader closing the connection), BusyResourceError escapes and ends the whole dev
    hub (chaos, under load). The session sends `websocket.close` itself before returning,
    and a write that collides ends the session quietly."""
    server = _ScriptedServer(refuse)
    with trio.fail_after(5):
        await _run_and_drop(server, *(["queued frame"] if refuse == "websocket.send" else []))
    assert server.sent[-1]["type"] == "websocket.close"


async def test_trim_history_forgets_records_and_finished_tasks_only() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        done = hub.submit(SHELL)
        waiting = hub.submit(SHELL)
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign", task_id=done)
            assert hub.frames() and hub.sent()
            assert hub.cancel(done)
            assert hub.trim_history() == 1
            assert hub.frames() == [] and hub.sent() == []
            assert [r.task_id for r in hub.tasks()] == [waiting]  # not finished: kept
