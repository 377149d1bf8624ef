"""A hub whose answers a test writes: a real trio-websocket server speaking protocol.md.

The dev hub answers as the real hub does, which is what most tests want. The
exchanges where the real hub's answers depend on its load and timing (a frame
dropped with `rate_limited`, a duplicate refused, an answer that comes late or
never) need a hub that answers exactly as a test says. This one identifies,
pongs, acks accepts and results and answers `task_recovering` with
`task_continue` by default; `answer` replaces the default for the frames it
returns a list for (an empty list: no answer at all).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio_websocket

Frame = dict[str, Any]


def default_answer(frame: Frame) -> list[Frame]:
    kind, tid = frame.get("type"), frame.get("task_id")
    if kind == "identify":
        return [{"type": "identified", "agent_id": frame.get("agent_id")}]
    if kind == "ping":
        return [{"type": "pong"}]
    if kind == "task_accepted":
        return [{"type": "task_ack", "task_id": tid, "status": "accepted"}]
    if kind == "task_complete":
        return [{"type": "task_ack", "task_id": tid, "status": "complete"}]
    if kind == "task_failed":
        return [{"type": "task_ack", "task_id": tid, "status": "failed"}]
    if kind == "task_recovering":
        return [{"type": "task_continue", "task_id": tid, "generation": 1}]
    return []


@attrs.define(eq=False)
class ScriptedHub:
    port: int = 0
    received: list[Frame] = attrs.field(factory=list)
    # Returns the answers to a frame, or None for the default ones.
    answer: Callable[[Frame], list[Frame] | None] = lambda frame: None
    sessions: int = 0
    # How each session ended, as trio-websocket saw it (code 1006: no close frame came).
    closes: list[trio_websocket.CloseReason] = attrs.field(factory=list)
    _ws: trio_websocket.WebSocketConnection | None = None
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def of(self, kind: str, task_id: str | None = None) -> list[Frame]:
        """Frames of one type received (of one task, if given), in order."""
        return [f for f in self.received if f.get("type") == kind and task_id in (None, f.get("task_id"))]

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 600) -> None:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            while not predicate():
                self._changed = trio.Event()
                await self._changed.wait()

    async def send(self, frame: Frame) -> None:
        assert self._ws is not None, "no agent connected"
        await self._ws.send_message(json.dumps(frame))

    async def close_session(self, code: int = 1001, reason: str = "going away") -> None:
        if self._ws is not None:
            await self._ws.aclose(code, reason)

    async def _serve(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        self._ws = ws
        self.sessions += 1
        try:
            while True:
                frame = json.loads(await ws.get_message())
                self.received.append(frame)
                self._changed.set()
                replies = self.answer(frame)
                for reply in default_answer(frame) if replies is None else replies:
                    await ws.send_message(json.dumps(reply))
        except trio_websocket.ConnectionClosed as exc:
            if exc.reason is not None:
                self.closes.append(exc.reason)
        finally:
            if self._ws is ws:
                self._ws = None
            self._changed.set()


@asynccontextmanager
async def open_scripted_hub() -> AsyncIterator[ScriptedHub]:
    hub = ScriptedHub()
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(trio_websocket.serve_websocket, hub._serve, "127.0.0.1", 0, None)
        hub.port = listener.port
        yield hub
        nursery.cancel_scope.cancel()
