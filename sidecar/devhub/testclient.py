"""A scripted agent for tests: a bare trio-websocket client speaking raw frames.

async with open_agent(hub.ws_url, "agent-1", "tok") as agent:
    await agent.send({"type": "ping"})
    pong = await agent.expect("pong")
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, open_websocket_url


class AgentClient:
    """One WebSocket connection to a hub, with helpers to script the agent side."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send_message(data)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The next frame, decoded."""
        with trio.fail_after(timeout):
            message = await self.ws.get_message()
        frame = json.loads(message)
        assert isinstance(frame, dict), frame
        return frame

    async def expect(self, type: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:  # noqa: ASYNC109
        """The next frame, which must be of `type` and carry `fields`."""
        frame = await self.recv(timeout)
        if frame.get("type") != type or any(frame.get(k) != v for k, v in fields.items()):
            raise AssertionError(f"expected {type} {fields or ''}, got {frame}")
        return frame

    async def identify(self, agent_id: str, token: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "identify", "agent_id": agent_id, "token": token, **extra})
        return await self.recv()

    async def closed(self, timeout: float = 5.0) -> tuple[CloseReason, list[dict[str, Any]]]:  # noqa: ASYNC109
        """Read until the hub closes the socket: its close reason and the frames before it."""
        frames: list[dict[str, Any]] = []
        with trio.fail_after(timeout):
            while True:
                try:
                    message = await self.ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    return exc.reason, frames
                frames.append(json.loads(message))


@asynccontextmanager
async def open_agent(
    url: str, agent_id: str | None = None, token: str | None = None, **identify_extra: Any
) -> AsyncIterator[AgentClient]:
    """Connect; with `agent_id` and `token`, identify and require `identified`."""
    async with open_websocket_url(url, connect_timeout=5, disconnect_timeout=1) as ws:
        client = AgentClient(ws)
        if agent_id is not None and token is not None:
            reply = await client.identify(agent_id, token, **identify_extra)
            if reply != {"type": "identified", "agent_id": agent_id}:
                raise AssertionError(f"identify refused: {reply}")
        yield client
