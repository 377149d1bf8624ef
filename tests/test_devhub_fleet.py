"""The dev hub's real-hub HTTP routes, against the shapes of protocol.md ("The hub's HTTP API")."""

from __future__ import annotations

from typing import Any

import httpx

from sidecar.devhub import open_dev_hub
from sidecar.devhub.testclient import open_agent

TOKENS = {"agent-1": "tok-1"}
REPO = "https://git.example/fleet/repo.git"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_health_agents_and_default_repo() -> None:
    async with (
        open_dev_hub(tokens=TOKENS, default_repo=REPO) as hub,
        httpx.AsyncClient(base_url=hub.api_url) as http,
    ):
        assert (await http.get("/health")).json() == {
            "status": "ok",
            "service": "agent_com",
            "agents_connected": 0,
        }
        assert (await http.get("/api/agents")).json() == {"agents": []}
        async with open_agent(hub.ws_url, "agent-1", "tok-1", capabilities=["code"]):
            assert (await http.get("/health")).json()["agents_connected"] == 1
            agents = (await http.get("/api/agents")).json()["agents"]
            assert agents == [
                {"agent_id": "agent-1", "name": "agent-1", "status": "connected", "capabilities": ["code"]}
            ]
        repo = await http.get("/api/config/default-repo")
        assert repo.status_code == 200 and repo.json() == {"default_repo": REPO, "configured": True}
    async with open_dev_hub(tokens=TOKENS) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        assert (await http.get("/api/config/default-repo")).json() == {
            "default_repo": None,
            "configured": False,
        }


async def test_register_201_409_422_and_the_token_works() -> None:
    async with (
        open_dev_hub(tokens=TOKENS, default_repo=REPO, require_auth=True) as hub,
        httpx.AsyncClient(base_url=hub.api_url) as http,
    ):
        resp = await http.post("/api/onboard/register", json={"agent_id": "box-1"})
        assert resp.status_code == 201
        body = resp.json()
        assert set(body) == {"agent_id", "token", "hub_ws_url", "hub_api_url", "default_repo"}
        assert body["agent_id"] == "box-1" and body["default_repo"] == REPO
        assert body["hub_ws_url"] == hub.ws_url and body["hub_api_url"] == hub.api_url
        token = body["token"]
        assert isinstance(token, str) and len(token) >= 32 and token != "tok-1"

        for taken in ("box-1", "agent-1"):  # registered here, or configured
            resp = await http.post("/api/onboard/register", json={"agent_id": taken})
            assert resp.status_code == 409 and resp.json() == {"error": "agent_id already registered"}

        for bad, field_error in (
            ({}, "required"),
            ({"agent_id": 5}, "wrong_type"),
            ({"agent_id": "a/b"}, "invalid_format"),
            ({"agent_id": "x" * 129}, "too_long"),
        ):
            resp = await http.post("/api/onboard/register", json=bad)
            assert resp.status_code == 422, bad
            answer = resp.json()
            assert answer["error"] == "validation_failed"
            assert [(e["field"], e["error"]) for e in answer["errors"]] == [("agent_id", field_error)]
        # The same body shape as POST /api/tasks' validation errors.
        resp = await http.post("/api/tasks", json={"description": 5}, headers=bearer(token))
        assert resp.status_code == 422 and set(resp.json()) == {"error", "errors"}

        # The new token identifies its agent, and only it; it is a Bearer too.
        async with open_agent(hub.ws_url, "box-1", token):
            pass
        async with open_agent(hub.ws_url) as other:
            assert await other.identify("agent-1", token) == {
                "type": "error",
                "error": "token_agent_mismatch",
            }
        assert (await http.get("/api/tasks/nope", headers=bearer(token))).status_code == 404


async def test_post_task_real_shape_routing_and_404() -> None:
    async with (
        open_dev_hub(tokens=TOKENS, require_auth=True) as hub,
        httpx.AsyncClient(base_url=hub.api_url) as http,
    ):
        body: dict[str, Any] = {
            "description": "say hi",
            "priority": "urgent",
            "metadata": {"shell_command": "echo hi"},
            "max_retries": 2,
            "needed_capabilities": [],
            "repo": None,
            "branch": None,
            "file_hints": [],
            "success_criteria": ["prints hi"],
            "verification_steps": [{"type": "file_exists", "target": "x", "description": "x exists"}],
            "complexity_tier": "trivial",
        }
        assert (await http.post("/api/tasks", json=body)).status_code == 401  # no Bearer
        assert (await http.post("/api/tasks", json=body, headers=bearer("wrong"))).status_code == 401
        resp = await http.post("/api/tasks", json=body, headers=bearer("tok-1"))
        assert resp.status_code == 201
        answer = resp.json()
        assert {"status", "task_id", "priority", "created_at"} <= set(answer)
        assert answer["status"] == "queued" and answer["priority"] == "urgent"
        task_id = answer["task_id"]

        bad = await http.post("/api/tasks", json={**body, "priority": "asap"}, headers=bearer("tok-1"))
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "priority"

        async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
            assign = await agent.expect("task_assign", task_id=task_id)
            record = (await http.get(f"/api/tasks/{task_id}", headers=bearer("tok-1"))).json()
        # An explicit tier is routed as the real hub's router does: trivial → the sidecar's shell path.
        assert assign["routing_decision"]["target_type"] == "sidecar"
        assert assign["complexity"]["effective_tier"] == "trivial"
        assert assign["verification_steps"] == body["verification_steps"]
        assert "priority" not in assign and "complexity_tier" not in assign
        assert record["status"] == "assigned" and record["priority"] == "urgent"
        assert record["created_at"] == answer["created_at"]

        missing = await http.get("/api/tasks/nope", headers=bearer("tok-1"))
        assert missing.status_code == 404 and missing.json() == {"error": "task_not_found", "task_id": "nope"}
        assert (await http.get("/api/tasks/nope")).status_code == 401


async def test_revoke_token_needs_a_bearer_and_locks_the_agent_out() -> None:
    async with open_dev_hub(tokens=TOKENS) as hub, httpx.AsyncClient(base_url=hub.api_url) as http:
        token = (await http.post("/api/onboard/register", json={"agent_id": "box-2"})).json()["token"]
        assert (await http.delete("/admin/tokens/box-2")).status_code == 401  # even on an open hub
        assert (await http.delete("/admin/tokens/box-2", headers=bearer("nope"))).status_code == 401
        resp = await http.delete("/admin/tokens/box-2", headers=bearer(token))
        assert resp.status_code == 200 and resp.json() == {"status": "revoked", "agent_id": "box-2"}
        async with open_agent(hub.ws_url) as agent:
            assert await agent.identify("box-2", token) == {"type": "error", "error": "invalid_token"}
        again = await http.delete("/admin/tokens/box-2", headers=bearer("tok-1"))
        assert again.status_code == 404
        # Revoked, the name is free to register again.
        assert (await http.post("/api/onboard/register", json={"agent_id": "box-2"})).status_code == 201


async def test_schemas_per_hub_vintage() -> None:
    for newer in (False, True):
        async with (
            open_dev_hub(tokens=TOKENS, knows_wake_result=newer, knows_agent_restarting=newer) as hub,
            httpx.AsyncClient(base_url=hub.api_url) as http,
        ):
            types = {s["type"] for s in (await http.get("/api/schemas")).json()["websocket"]}
            assert ("wake_result" in types) is newer and ("agent_restarting" in types) is newer
            async with open_agent(hub.ws_url, "agent-1", "tok-1") as agent:
                await agent.send({"type": "wake_result", "task_id": "t", "status": "success", "attempt": 1})
                await agent.send(
                    {"type": "agent_restarting", "reason": "restart_sidecar", "running_tasks": 0}
                )
                await agent.send({"type": "ping"})
                replies = [await agent.recv() for _ in range(1 if newer else 3)]
            if newer:
                assert [r["type"] for r in replies] == ["pong"]
                assert (
                    hub.wake_results[0]["status"] == "success"
                    and hub.restart_notices[0]["running_tasks"] == 0
                )
            else:
                assert [(r["type"], r.get("message_type")) for r in replies] == [
                    ("error", "wake_result"),
                    ("error", "agent_restarting"),
                    ("pong", None),
                ]
                assert hub.wake_results == [] and hub.restart_notices == []
