"""What the dev hub does with each inbound frame, step by step as the real hub.

Order (`AgentCom.Socket.handle_in/2`): decode → validate against the schema of
its `type` (before identification too; failures count towards the 10-in-60-s
disconnect) → rate limit (only once identified) → handle. Before `identify`
every valid frame but `identify` is answered `not_identified`.

Frames the real hub's handler crashes on (binary frames, JSON that is not an
object, and per `invalid_json="close"` text that is not JSON) close the socket
with 1011, which the hub then treats as any disconnect.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..log import get_logger
from ..messages import now_ms
from .ratelimit import Deny, Warn, tier_of
from .schemas import validate_ws_message
from .session import Session
from .state import ASSIGNED, FrameRecord, TaskError, Violation

if TYPE_CHECKING:
    from .hub import DevHub

log = get_logger(__name__)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(text: str) -> Any:
    """Decode strictly (no NaN/Infinity), as Jason does."""
    return json.loads(text, parse_constant=_reject_constant)


class FrameHandler:
    """The hub's per-frame logic; mutates the hub's state synchronously."""

    def __init__(self, hub: DevHub) -> None:
        self.hub = hub

    # -- entry point -----------------------------------------------------------

    def on_data(self, s: Session, data: str | bytes) -> None:
        hub = self.hub
        if isinstance(data, bytes):
            self._crash(s, data, None, "binary", "binary frame")
            return
        try:
            msg = decode(data)
        except (ValueError, RecursionError):
            if hub.config.invalid_json == "error":
                self._record(s, data, None, "invalid_json")
                hub.add_violation(Violation("invalid_json", s.agent_id, s.id, hub.now(), data))
                s.push({"type": "error", "error": "invalid_json"})
            else:
                self._crash(s, data, None, "invalid_json", "text frame is not JSON")
            return
        if not isinstance(msg, dict):
            self._crash(s, data, None, "not_an_object", f"JSON {type(msg).__name__} is not an object")
            return
        errors = validate_ws_message(msg, schemas=hub.schemas)
        if errors:
            self._validation_failure(s, data, msg, errors)
            return
        if s.identified and hub.config.limits is not None:
            assert s.agent_id is not None
            tier = tier_of(msg["type"])
            verdict = hub.state.rates.check(s.agent_id, tier, hub.now())
            if isinstance(verdict, Deny):
                self._record(s, data, msg, "rate_limited")
                hub.add_violation(
                    Violation("rate_limited", s.agent_id, s.id, hub.now(), data, {"tier": tier})
                )
                s.push({"type": "rate_limited", "retry_after_ms": verdict.retry_after_ms, "tier": tier})
                return
            if isinstance(verdict, Warn):
                s.push(
                    {
                        "type": "rate_limit_warning",
                        "tier": tier,
                        "remaining": verdict.remaining,
                        "capacity": verdict.capacity,
                    }
                )
        self._handle(s, data, msg)

    # -- failures --------------------------------------------------------------

    def _record(self, s: Session, data: str | bytes, msg: dict[str, Any] | None, verdict: str) -> None:
        agent = s.agent_id
        if agent is None and msg is not None and msg.get("type") == "identify":
            claimed = msg.get("agent_id")
            agent = claimed if isinstance(claimed, str) else None
        self.hub.record_received(FrameRecord(agent, s.id, self.hub.now(), data, msg, verdict))

    def _crash(self, s: Session, data: str | bytes, msg: dict[str, Any] | None, kind: str, why: str) -> None:
        hub = self.hub
        log.warning("devhub_handler_crash", session=s.id, agent_id=s.agent_id, why=why)
        self._record(s, data, msg, kind)
        hub.add_violation(Violation(kind, s.agent_id, s.id, hub.now(), data, why))
        s.close(1011, "internal error")

    def _validation_failure(
        self, s: Session, data: str, msg: dict[str, Any], errors: list[dict[str, Any]]
    ) -> None:
        hub, now = self.hub, self.hub.now()
        if s.violation_window_start is None or now - s.violation_window_start > hub.config.violation_window:
            s.violation_count, s.violation_window_start = 1, now
        else:
            s.violation_count += 1
        hub.add_violation(Violation("validation_failed", s.agent_id, s.id, now, data, errors))
        if s.violation_count >= hub.config.violation_limit:
            self._record(s, data, msg, "too_many_violations")
            if s.identified and s.agent_id is not None:
                hub.state.cooldowns.record_disconnect(s.agent_id, now)
            log.warning("devhub_validation_disconnect", session=s.id, agent_id=s.agent_id)
            s.close(1008, "too many validation errors")
            return
        self._record(s, data, msg, "validation_failed")
        s.push(
            {
                "type": "error",
                "error": "validation_failed",
                "message_type": msg.get("type", "unknown"),
                "errors": errors,
            }
        )

    # -- handlers --------------------------------------------------------------

    def _handle(self, s: Session, data: str, msg: dict[str, Any]) -> None:
        mtype = msg["type"]
        if mtype == "identify":
            self._identify(s, data, msg)
            return
        if not s.identified:
            self._record(s, data, msg, "not_identified")
            s.push({"type": "error", "error": "not_identified"})
            return
        self._record(s, data, msg, "ok")
        handler = getattr(self, "_on_" + mtype, None)
        if handler is not None:
            handler(s, msg)
        else:
            self._chat(s, msg)

    def _identify(self, s: Session, data: str, msg: dict[str, Any]) -> None:
        hub = self.hub
        agent_id: str = msg["agent_id"]
        remaining = hub.state.cooldowns.remaining_s(agent_id, hub.now())
        if remaining is not None:
            self._record(s, data, msg, "cooldown")
            s.close(1008, f"cooldown active: retry in {remaining}s")
            return
        error = hub.auth_error(agent_id, msg["token"])
        if error is not None:
            self._record(s, data, msg, "auth_failed")
            s.push({"type": "error", "error": error})
            if hub.config.close_on_auth_error:
                s.close(1008, "authentication failed")
            return
        self._record(s, data, msg, "ok")
        caps = msg.get("capabilities") or []
        s.capabilities = [c for c in caps if isinstance(c, str)]
        hub.identify(s, agent_id)
        s.push({"type": "identified", "agent_id": agent_id})
        hub.schedule()

    def _on_ping(self, s: Session, msg: dict[str, Any]) -> None:
        s.push({"type": "pong", "timestamp": now_ms()})

    def _on_task_accepted(self, s: Session, msg: dict[str, Any]) -> None:
        hub = self.hub
        rec = hub.state.tasks.get(msg["task_id"])
        if rec is not None and rec.status in ASSIGNED:
            rec.last_progress_at = hub.now()
            if rec.assigned_to == s.agent_id and rec.status == "assigned":
                rec.status = "accepted"
                rec.accept_deadline = None
                rec.log("accepted", hub.now(), agent_id=s.agent_id, generation=rec.generation)
        hub.ack(s, msg["task_id"], "accepted")

    def _on_task_progress(self, s: Session, msg: dict[str, Any]) -> None:
        hub = self.hub
        rec = hub.state.tasks.get(msg["task_id"])
        if rec is not None:
            rec.progress.append(msg)
            if rec.status in ASSIGNED:
                rec.last_progress_at = hub.now()

    def _on_task_complete(self, s: Session, msg: dict[str, Any]) -> None:
        hub = self.hub
        try:
            hub.state.complete(msg, hub.now())
        except TaskError as exc:
            s.push({"type": "error", "error": f"task_complete_failed: {exc.reason}"})
            return
        hub.ack(s, msg["task_id"], "complete")
        hub.schedule()

    def _on_task_failed(self, s: Session, msg: dict[str, Any]) -> None:
        hub = self.hub
        try:
            outcome, _ = hub.state.fail(msg, hub.now())
        except TaskError as exc:
            s.push({"type": "error", "error": f"task_fail_failed: {exc.reason}"})
            return
        hub.ack(s, msg["task_id"], outcome)
        hub.schedule()

    def _on_task_recovering(self, s: Session, msg: dict[str, Any]) -> None:
        task_id = msg["task_id"]
        rec = self.hub.recover(s, task_id)
        if rec is None:
            s.push({"type": "task_reassign", "task_id": task_id})
        else:
            s.push({"type": "task_continue", "task_id": task_id, "generation": rec.generation})

    def _on_state_report(self, s: Session, msg: dict[str, Any]) -> None:
        task_id = msg["task_id"]
        rec = self.hub.recover(s, task_id)
        if rec is not None:
            rec.last_progress_at = self.hub.now()
        action = "abort" if rec is None else "continue"
        s.push({"type": "state_report_ack", "task_id": task_id, "action": action})

    def _on_resource_report(self, s: Session, msg: dict[str, Any]) -> None:
        self.hub.resource_reports.append(msg)

    def _on_wake_result(self, s: Session, msg: dict[str, Any]) -> None:
        self.hub.wake_results.append(msg)

    def _on_agent_restarting(self, s: Session, msg: dict[str, Any]) -> None:
        self.hub.restart_notices.append(msg)

    def _on_ollama_report(self, s: Session, msg: dict[str, Any]) -> None:
        self.hub.ollama_reports.append(msg)
        s.push({"type": "ollama_report_ack", "status": "registered"})

    def _on_status(self, s: Session, msg: dict[str, Any]) -> None:
        s.push({"type": "status_updated"})

    def _on_list_agents(self, s: Session, msg: dict[str, Any]) -> None:
        agents = [
            {"agent_id": a, "name": a, "status": "connected", "capabilities": sess.capabilities}
            for a, sess in self.hub.agents().items()
        ]
        s.push({"type": "agents", "agents": agents})

    def _on_list_channels(self, s: Session, msg: dict[str, Any]) -> None:
        s.push({"type": "channels", "channels": []})

    def _on_channel_history(self, s: Session, msg: dict[str, Any]) -> None:
        s.push({"type": "channel_history", "channel": msg["channel"], "messages": []})

    def _on_message(self, s: Session, msg: dict[str, Any]) -> None:
        s.push({"type": "message_sent", "id": "msg-" + str(len(self.hub.frames()))})

    def _chat(self, s: Session, msg: dict[str, Any]) -> None:
        # channel_subscribe / _unsubscribe / _publish: the dev hub has no channels.
        s.push({"type": "error", "error": "channel_not_found"})
