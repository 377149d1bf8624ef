"""The dev hub's HTTP API, restarts, and running it as a server."""

from __future__ import annotations

import subprocess

import httpx
import trio
from trio_websocket import ConnectionClosed

from sidecar.devhub import DevHub, open_dev_hub, serve_forever
from sidecar.devhub.testclient import open_agent

TOKENS = {"agent-1": "tok-1"}


async def test_submit_get_list_cancel_over_http() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        assert hub.api_url == f"http://127.0.0.1:{hub.port}"
        body = {"task_id": "t-1", "description": "say hi", "metadata": {"shell_command": "echo hi"}}
        response = await http.post("/api/tasks", json=body)
        assert response.status_code == 201
        answer = response.json()
        assert answer == {
            "task_id": "t-1",
            "generation": 0,
            "status": "queued",
            "priority": "normal",
            "created_at": answer["created_at"],
        }
        assert isinstance(answer["created_at"], int) and answer["created_at"] > 1_700_000_000_000
        assert (await http.post("/api/tasks", json=body)).status_code == 409

        generated = (await http.post("/api/tasks", json={"description": "x"})).json()["task_id"]
        assert generated.startswith("task-") and generated in hub.state.tasks

        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign", task_id="t-1", description="say hi")
            await agent.send({"type": "task_accepted", "task_id": "t-1"})
            await agent.expect("task_ack")
            event = {"event_type": "stdout", "text": "hi", "seq": 1}
            await agent.send({"type": "task_progress", "task_id": "t-1", "execution_event": event})
            await agent.send({"type": "ping"})
            await agent.expect("pong")

            task = (await http.get("/api/tasks/t-1")).json()
            assert task["status"] == "accepted" and task["generation"] == 1
            assert task["assigned_to"] == "agent-1"
            assert task["progress"] == [event]
            assert task["acks"] == [{"type": "task_ack", "task_id": "t-1", "status": "accepted"}]

            listed = (await http.get("/api/tasks")).json()["tasks"]
            assert [t["task_id"] for t in listed] == ["t-1", generated]

            response = await http.post("/api/tasks/t-1/cancel")
            assert response.json() == {"task_id": "t-1", "status": "cancelled"}
            await agent.expect("task_cancelled", task_id="t-1")
            assert (await http.post("/api/tasks/t-1/cancel")).status_code == 409

        assert (await http.get("/api/tasks/nope")).status_code == 404
        assert (await http.get("/nowhere")).status_code == 404


async def test_a_completed_tasks_verification_report_is_shown() -> None:
    """`GET /api/tasks/ID` shows the verification report and history the hub stored
    (found from outside: they were stored but not shown)."""
    async with open_dev_hub(tokens=TOKENS) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        body = {"task_id": "t-v", "description": "d", "metadata": {"shell_command": "true"}}
        assert (await http.post("/api/tasks", json=body)).status_code == 201
        before = (await http.get("/api/tasks/t-v")).json()
        assert before["verification_report"] is None and before["verification_history"] is None
        report = {"task_id": "t-v", "run_number": 1, "status": "pass", "checks": [], "summary": {"total": 0}}
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            assign = await agent.expect("task_assign", task_id="t-v")
            await agent.send({"type": "task_accepted", "task_id": "t-v"})
            await agent.expect("task_ack")
            complete = {
                "type": "task_complete",
                "task_id": "t-v",
                "generation": assign["generation"],
                "result": {"status": "success", "output": ""},
                "verification_report": report,
                "verification_history": [report],
            }
            await agent.send(complete)
            await agent.expect("task_ack", status="complete")
        task = (await http.get("/api/tasks/t-v")).json()
        assert task["verification_report"] == report
        assert task["verification_history"] == [report]


async def test_http_submit_is_validated() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        response = await http.post("/api/tasks", json={"description": 5, "metadata": []})
        assert response.status_code == 422
        assert [e["field"] for e in response.json()["errors"]] == ["description", "metadata"]
        response = await http.post("/api/tasks", json={"description": "x" * 10_001})
        assert response.json()["errors"][0]["error"] == "too_long"
        assert (await http.post("/api/tasks", content=b"[1]")).status_code == 400
        assert (await http.post("/api/tasks", content=b"{nope")).status_code == 400
        assert hub.tasks() == []


async def test_bearer_auth_when_configured() -> None:
    async with (
        open_dev_hub(tokens=TOKENS, api_token="s3cret") as hub,
        httpx.AsyncClient(base_url=hub.api_url) as http,
    ):
        assert (await http.get("/api/tasks")).status_code == 401
        assert (await http.post("/api/tasks", json={})).status_code == 401
        ok = await http.get("/api/tasks", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert (await http.get("/api/schemas")).status_code == 200  # never needs auth


async def test_schemas_endpoint() -> None:
    for knows in (False, True):
        async with open_dev_hub(tokens=TOKENS, knows_state_report=knows) as hub:
            async with httpx.AsyncClient(base_url=hub.api_url) as http:
                body = (await http.get("/api/schemas")).json()
        types = {s["type"]: s for s in body["websocket"]}
        assert ("state_report" in types) is knows
        for absent in ("task_rejected", "wake_result", "agent_restarting"):
            assert absent not in types
        complete = types["task_complete"]
        assert {f["name"]: f["type"] for f in complete["required_fields"]} == {
            "type": "string",
            "task_id": "string",
            "generation": "integer",
        }
        identify_optional = {f["name"]: f["type"] for f in types["identify"]["optional_fields"]}
        assert identify_optional["capabilities"] == "array<string>"
        assert body["version"] == "1.0"


async def test_restart_keeps_tasks_and_the_agent_continues() -> None:
    hub_scope = trio.CancelScope()

    async def first_hub(task_status: trio.TaskStatus[DevHub]) -> None:
        with hub_scope:
            await serve_forever("127.0.0.1", 0, TOKENS, task_status=task_status)

    async with trio.open_nursery() as nursery:
        hub = await nursery.start(first_hub)
        port = hub.port
        task_id = hub.submit({"description": ""})
        queued = hub.submit({"description": ""})
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            await agent.expect("task_assign", task_id=task_id, generation=1)
            await agent.send({"type": "task_accepted", "task_id": task_id})
            await agent.expect("task_ack")
            hub.state.cooldowns.record_disconnect("agent-1", hub.now())
            hub_scope.cancel()  # the hub process goes away under a connected agent
            with trio.fail_after(5):
                while True:
                    try:
                        await agent.ws.get_message()
                    except ConnectionClosed:
                        break
    # A hub that exits drops its sockets without reclaiming anything.
    assert hub.task(task_id).status == "accepted"
    old_state = hub.state

    async with open_dev_hub(port=port, tokens=TOKENS, state=old_state.restarted()) as hub:
        assert hub.port == port
        assert hub.state.cooldowns.count("agent-1") == 0  # cooldowns live in memory only
        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            # Still assigned to us: not re-sent; the acceptance clock restarts on identify.
            assert hub.task(task_id).status == "assigned"
            await agent.send({"type": "task_recovering", "task_id": task_id})
            assert await agent.recv() == {"type": "task_continue", "task_id": task_id, "generation": 1}
            await agent.send({"type": "task_accepted", "task_id": task_id})
            await agent.expect("task_ack")
            await agent.send({"type": "task_complete", "task_id": task_id, "generation": 1})
            await agent.expect("task_ack", status="complete")
            await agent.expect("task_assign", task_id=queued)


async def test_restart_without_state_forgets_tasks() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub:
        port = hub.port
        task_id = hub.submit({"description": ""})
    async with (
        open_dev_hub(port=port, tokens=TOKENS) as hub,
        open_agent(hub.ws_url, "agent-1", "tok-1") as agent,
    ):
        await agent.send({"type": "task_recovering", "task_id": task_id})
        assert await agent.recv() == {"type": "task_reassign", "task_id": task_id}


async def test_serve_forever_in_a_nursery() -> None:
    async with trio.open_nursery() as nursery:
        hub: DevHub = await nursery.start(serve_forever, "127.0.0.1", 0, "tok")
        async with open_agent(hub.ws_url, "any-agent", "tok") as agent:
            await agent.send({"type": "ping"})
            await agent.expect("pong")
        nursery.cancel_scope.cancel()


async def test_run_hub_cli_serves_until_interrupted() -> None:
    import json
    import signal
    import socket
    import sys

    with socket.socket() as probe:  # a free port for the child
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"from sidecar.devhub import run_hub_cli; run_hub_cli({port}, 'cli-token', 'cli-agent')"
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        buffer = b""
        with trio.fail_after(20):
            while b"devhub_ready" not in buffer:
                chunk = await proc.stderr.receive_some()
                assert chunk, buffer
                buffer += chunk
        ready = next(json.loads(line) for line in buffer.splitlines() if b"devhub_ready" in line)
        assert ready["ws_url"] == f"ws://127.0.0.1:{port}/ws"
        assert b"cli-token" not in buffer  # the token is never logged
        async with open_agent(ready["ws_url"], "cli-agent", "cli-token") as agent:
            await agent.send({"type": "ping"})
            await agent.expect("pong")
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
