"""The dev hub: sessions, scheduling, hub clocks, and the API tests drive.

`DevHub` is also the raw ASGI app hypercorn serves (`/ws` and the HTTP API).
All its state changes happen synchronously inside one Trio thread; after each
one `wait_until` waiters are woken, so tests never poll.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import trio

from ..asgi import ASGIReceive, ASGISend, serve_lifespan
from ..log import get_logger
from ..messages import now_ms
from .api import handle_http
from .config import HubConfig
from .protocol import FrameHandler
from .session import Session
from .state import ASSIGNED, FINISHED, FrameRecord, HubState, TaskRecord, Violation
from .tokens import HubTokens

log = get_logger(__name__)

T = TypeVar("T")


class DevHub:
    """A small AgentCom hub for tests and demos. Create with `open_dev_hub`."""

    def __init__(self, config: HubConfig, state: HubState | None = None) -> None:
        self.config = config
        self.state = state if state is not None else HubState()
        if config.limits is not None:
            self.state.rates.limits = config.limits
        self.host = "127.0.0.1"
        self.port = 0
        self.violations: list[Violation] = []
        self.resource_reports: list[dict[str, Any]] = []
        self.ollama_reports: list[dict[str, Any]] = []
        self.wake_results: list[dict[str, Any]] = []
        self.restart_notices: list[dict[str, Any]] = []
        # The WebSocket schemas this hub accepts (its vintage).
        self.schemas = config.ws_schemas()
        self.tokens = HubTokens(config, self.state)
        # Exceptions in the hub's own code (hypercorn would only log them).
        self.internal_errors: list[BaseException] = []
        self.closing = False
        self._handler = FrameHandler(self)
        self._ids = itertools.count(1)
        self._sessions: set[Session] = set()
        self._fsm: dict[str, Session] = {}  # agent → its current (identified) session
        self._registered: dict[str, Session] = {}  # agent → session that receives pushes
        self._received: list[FrameRecord] = []
        self._sent: list[FrameRecord] = []
        self._changed = trio.Event()
        self._scheduling = False
        for rec in self.state.tasks.values():
            rec.accept_deadline = None  # no agent session yet: the acceptance clock waits for identify

    # -- addresses -------------------------------------------------------------

    @property
    def ws_url(self) -> str:
        return f"ws://{self._hostport}/ws"

    @property
    def api_url(self) -> str:
        return f"http://{self._hostport}"

    @property
    def _hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    # -- the test API ----------------------------------------------------------

    def now(self) -> float:
        return trio.current_time()

    def submit(self, task: Mapping[str, Any] | None = None, **fields: Any) -> str:
        """Queue a task (fields of `task_assign`); returns its task_id."""
        rec = self.state.submit({**(task or {}), **fields}, self.now(), self.config.max_retries)
        log.info("devhub_task_submitted", task_id=rec.task_id)
        self.schedule()
        self.notify()
        return rec.task_id

    def cancel(self, task_id: str) -> bool:
        """Cancel a task; the agent holding it gets `task_cancelled`. False if finished."""
        rec = self.state.tasks[task_id]
        if rec.status in FINISHED:
            return False
        if rec.status in ASSIGNED and rec.assigned_to is not None:
            self._push(rec.assigned_to, {"type": "task_cancelled", "task_id": task_id, "timestamp": now_ms()})
        rec.status = "cancelled"
        rec.accept_deadline = None
        rec.log("cancelled", self.now(), agent_id=rec.assigned_to)
        self.schedule()
        self.notify()
        return True

    def task(self, task_id: str) -> TaskRecord:
        return self.state.tasks[task_id]

    def tasks(self) -> list[TaskRecord]:
        return list(self.state.tasks.values())

    def frames(self, agent_id: str | None = None, type: str | None = None) -> list[FrameRecord]:
        """Frames received (all, or one agent's), rejected ones included."""
        return [
            f
            for f in self._received
            if (agent_id is None or f.agent_id == agent_id) and (type is None or f.type == type)
        ]

    def sent(self, agent_id: str | None = None, type: str | None = None) -> list[FrameRecord]:
        """Frames written to sockets (all, or one agent's)."""
        return [
            f
            for f in self._sent
            if (agent_id is None or f.agent_id == agent_id) and (type is None or f.type == type)
        ]

    def trim_history(self) -> int:
        """Forget frame records and finished tasks' records; returns the tasks dropped.

        For long benchmarks: the hub otherwise keeps every frame (text and
        parsed) and every result, so its own memory grows with the run.
        """
        self._received.clear()
        self._sent.clear()
        done = [tid for tid, rec in self.state.tasks.items() if rec.status in FINISHED]
        for tid in done:
            del self.state.tasks[tid]
        return len(done)

    def connected(self, agent_id: str) -> bool:
        """True while the agent has an identified session whose socket is open."""
        s = self._fsm.get(agent_id)
        return s is not None and not s.ended

    def agents(self) -> dict[str, Session]:
        return {a: s for a, s in self._fsm.items() if not s.ended}

    async def wait_until(self, predicate: Callable[[], T | None], timeout: float = 10.0) -> T:  # noqa: ASYNC109
        """Wait until `predicate()` is truthy, re-checked on every hub state change; that value.

        Typed so that a predicate giving "the record, or None while not yet" returns the record.
        """
        with trio.fail_after(timeout):
            while True:
                result = predicate()
                if result:
                    return result
                await self._changed.wait()

    async def send_raw(self, agent_id: str, data: str | bytes) -> None:
        """Write any text (or bytes) to the agent's socket; returns once written."""
        done = trio.Event()
        self._session_of(agent_id).push_raw(data, done)
        await done.wait()

    async def send_frame(self, agent_id: str, frame: dict[str, Any]) -> None:
        """Write one JSON frame to the agent's socket (e.g. a duplicate task_assign)."""
        await self.send_raw(agent_id, json.dumps(frame))

    async def drop(self, agent_id: str) -> None:
        """End the agent's connection abruptly (no close frame); waits until the hub has seen it."""
        s = self._session_of(agent_id)
        s.abort()
        await self.wait_until(lambda: s.ended)

    async def disconnect(self, agent_id: str, code: int = 1000, reason: str = "") -> None:
        """Close the agent's socket cleanly with `code`; waits until it is gone."""
        s = self._session_of(agent_id)
        s.close(code, reason)
        await self.wait_until(lambda: s.ended)

    def stall(self, agent_id: str, on: bool = True) -> None:
        """Stop (or resume) reading from and writing to the agent's open sessions.

        A stalled session answers nothing (no pong, no ack) and is not closed for
        idleness, like a hung hub. Sessions opened later are not stalled.
        """
        for s in self._sessions:
            if s.agent_id == agent_id:
                s.set_stalled(on)

    # -- hooks for the protocol and the API -------------------------------------

    def notify(self) -> None:
        """Wake everything waiting for a state change."""
        self._changed.set()
        self._changed = trio.Event()

    def add_violation(self, v: Violation) -> None:
        self.violations.append(v)

    def record_received(self, rec: FrameRecord) -> None:
        self._received.append(rec)

    def auth_error(self, agent_id: str, token: str) -> str | None:
        """None if `token` lets `agent_id` in, else the hub's error word."""
        return self.tokens.auth_error(agent_id, token)

    def identify(self, s: Session, agent_id: str) -> None:
        """Start the agent's new session; the previous one is discarded."""
        old = self._fsm.pop(agent_id, None)
        if s.agent_id is not None and s.agent_id != agent_id and self._fsm.get(s.agent_id) is s:
            del self._fsm[s.agent_id]
        s.agent_id, s.identified = agent_id, True
        self._fsm[agent_id] = s
        registered = self._registered.get(agent_id)
        if (
            self.config.registry_bug
            and registered is not None
            and registered is not s
            and not registered.ended
        ):
            log.warning("devhub_registry_bug", agent_id=agent_id, stale_session=registered.id, session=s.id)
        else:
            self._registered[agent_id] = s
        if old is not None and old is not s and not self.config.registry_bug:
            old.close(1000, "replaced by a new session")
        # A new agent FSM finds the agent's assigned tasks and restarts their acceptance clock.
        for rec in self.state.assigned_to(agent_id):
            rec.status = "assigned"
            rec.accept_deadline = self.now() + self.config.accept_timeout
        log.info("devhub_identified", agent_id=agent_id, session=s.id)

    def recover(self, s: Session, task_id: str) -> TaskRecord | None:
        """The task if it is (still, or again) this agent's, else None."""
        rec = self.state.tasks.get(task_id)
        if rec is None:
            return None
        if rec.status in ASSIGNED and rec.assigned_to == s.agent_id:
            return rec
        if (
            self.config.adopt_reclaimed
            and rec.status == "queued"
            and rec.reclaimed_from is not None
            and rec.reclaimed_from == s.agent_id
        ):
            rec.status = "assigned"
            rec.assigned_to = s.agent_id
            rec.assigned_at_ms = now_ms()
            rec.reclaimed_from = None
            rec.accept_deadline = self.now() + self.config.accept_timeout
            rec.last_progress_at = self.now()
            rec.log("adopted", self.now(), agent_id=s.agent_id, generation=rec.generation)
            return rec
        return None

    def ack(self, s: Session, task_id: str, status: str) -> None:
        frame = {"type": "task_ack", "task_id": task_id, "status": status}
        rec = self.state.tasks.get(task_id)
        if rec is not None:
            rec.acks.append(frame)
        s.push(frame)

    def schedule(self) -> None:
        """Give queued tasks to eligible agents (idle, capable, not rate-limited)."""
        if self._scheduling or self.closing:
            return
        self._scheduling = True
        assigned = False
        try:
            now = self.now()
            for rec in self.state.queued():
                for agent, s in list(self._fsm.items()):
                    if self._eligible(rec, agent, s, now):
                        self.state.assign(rec, agent, now, now_ms(), self.config.accept_timeout)
                        frame = rec.assign_frame(rec.assigned_at_ms or now_ms())
                        rec.assigns.append(frame)
                        self._push(agent, frame)
                        assigned = True
                        break
        finally:
            self._scheduling = False
        if assigned:
            self.notify()

    def _eligible(self, rec: TaskRecord, agent: str, s: Session, now: float) -> bool:
        if s.ended or (rec.assign_to is not None and rec.assign_to != agent):
            return False
        if not set(rec.needed_capabilities) <= set(s.capabilities):
            return False
        if len(self.state.assigned_to(agent)) >= self.config.concurrency:
            return False
        skip = self.state.rates.skip_until(agent) if self.config.limits is not None else None
        return skip is None or now >= skip

    def _push(self, agent_id: str, frame: dict[str, Any]) -> None:
        target = self._registered.get(agent_id)
        if target is None or target.ended:
            log.warning("devhub_push_undelivered", agent_id=agent_id, frame_type=frame.get("type"))
            rec = self.state.tasks.get(str(frame.get("task_id")))
            if rec is not None:
                rec.log("undelivered", self.now(), frame_type=frame.get("type"))
            return
        target.push(frame)

    def _session_of(self, agent_id: str) -> Session:
        s = self._fsm.get(agent_id) or self._registered.get(agent_id)
        if s is None or s.ended:
            raise KeyError(f"agent {agent_id!r} is not connected")
        return s

    # -- clocks ----------------------------------------------------------------

    async def run_clocks(self) -> None:
        """Reclaim tasks not accepted in time or stuck; retry scheduling after rate skips."""
        while True:
            now = self.now()
            next_at = math.inf
            fired = False
            for rec in self.state.open_tasks():
                if rec.status not in ASSIGNED:
                    continue
                if rec.status == "assigned" and rec.accept_deadline is not None:
                    if now >= rec.accept_deadline:
                        log.warning(
                            "devhub_acceptance_timeout", task_id=rec.task_id, agent_id=rec.assigned_to
                        )
                        self.state.reclaim(rec, "acceptance_timeout", now)
                        fired = True
                        continue
                    next_at = min(next_at, rec.accept_deadline)
                if rec.last_progress_at is not None:
                    stuck_at = rec.last_progress_at + self.config.stuck_timeout
                    if now >= stuck_at:
                        log.warning("devhub_stuck_reclaim", task_id=rec.task_id, agent_id=rec.assigned_to)
                        self.state.reclaim(rec, "stuck", now)
                        fired = True
                        continue
                    next_at = min(next_at, stuck_at)
            if self.config.limits is not None and self.state.queued():
                for agent in self._fsm:
                    skip = self.state.rates.skip_until(agent)
                    if skip is not None and skip > now:
                        next_at = min(next_at, skip)
            self.schedule()
            if fired:
                self.notify()
            with trio.move_on_at(next_at):
                await self._changed.wait()

    # -- ASGI ------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await serve_lifespan(receive, send)
            return
        elif kind == "http":
            await handle_http(self, scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    async def _websocket(self, scope: dict[str, Any], receive: ASGIReceive, send: ASGISend) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        if scope.get("path") != "/ws":
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        client, server = scope.get("client"), scope.get("server")
        s = Session(
            next(self._ids),
            tuple(client) if client else None,
            tuple(server) if server else None,
            self.now(),
        )
        self._sessions.add(s)
        self.notify()
        try:
            await s.run(receive, send, self._on_data, self._on_sent, self.config.idle_timeout)
        finally:
            self._session_ended(s)

    def _on_data(self, s: Session, data: str | bytes) -> None:
        try:
            self._handler.on_data(s, data)
        except Exception as exc:  # a bug in the hub itself: keep it for the tests to see
            log.error("devhub_internal_error", exc_info=True, session=s.id)
            self.internal_errors.append(exc)
            s.close(1011, "internal error")
        self.notify()

    def _on_sent(self, s: Session, data: str | bytes) -> None:
        try:
            frame = json.loads(data) if isinstance(data, str) else None
        except (ValueError, RecursionError):  # what tests inject need not decode
            frame = None
        self._sent.append(
            FrameRecord(
                s.agent_id, s.id, self.now(), data, frame if isinstance(frame, dict) else None, "sent"
            )
        )
        self.notify()

    def _session_ended(self, s: Session) -> None:
        s.ended = True
        self._sessions.discard(s)
        agent = s.agent_id
        if agent is not None:
            if self._registered.get(agent) is s:
                del self._registered[agent]
            if self._fsm.get(agent) is s:
                del self._fsm[agent]
                if not self.closing:
                    self._agent_gone(agent)
        log.info("devhub_session_ended", session=s.id, agent_id=agent, code=s.close_code)
        self.notify()

    def _agent_gone(self, agent: str) -> None:
        now = self.now()
        for rec in self.state.assigned_to(agent):
            if self.config.reclaim_on_disconnect:
                self.state.reclaim(rec, "agent_disconnect", now)
            else:
                rec.accept_deadline = None
        self.schedule()
