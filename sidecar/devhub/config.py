"""How a dev hub behaves: one frozen config, real-hub defaults."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from .ratelimit import RateLimits
from .schemas import ws_schemas


@attrs.frozen
class HubConfig:
    """How this hub behaves. Defaults are the real hub's unless noted.

    - `tokens`: agent_id → token, or one token any agent may use.
    - `limits`: rate limits, or None to switch them off.
    - `concurrency`: tasks at once per agent (the real hub: 1).
    - `idle_timeout`, `accept_timeout`, `stuck_timeout`: the hub's clocks (s).
    - `reclaim_on_disconnect`: take an agent's tasks back when its socket closes.
    - `knows_state_report`: a newer hub; False is an older one, for which
      `state_report` is an unknown type.
    - `adopt_reclaimed` [ours]: `task_recovering` / `state_report` for a task
      reclaimed at this agent's disconnect and still queued gives it back
      (`task_continue`, generation unchanged). A stock hub answers `task_reassign`.
    - `invalid_json`: "close" (the handler crashes: 1011) or "error" (reply
      `{"type":"error","error":"invalid_json"}`, as some hub versions do).
    - `close_on_auth_error` [ours]: close the socket after `invalid_token` /
      `token_agent_mismatch` (the real hub only replies).
    - `registry_bug`: emulate the hub bug where a reconnect while the old socket
      is still open is identified but never registered: pushes keep going to the
      old socket, and nowhere once it is gone. Off: a new identify closes the
      old socket.
    - `knows_wake_result`, `knows_agent_restarting`: a newer hub that accepts
      these frames; a stock hub (the default) answers them `validation_failed`.
    - `api_token`: require `Authorization: Bearer …` on `/api/tasks*`. Any
      agent's token (configured or registered) is a valid Bearer too, as on the
      real hub.
    - `require_auth`: require a Bearer on `/api/tasks*` even without
      `api_token` (the real hub's behaviour; off by default so tests can inject
      tasks with a bare POST). A Bearer that is sent is always checked.
    - `default_repo`: what `GET /api/config/default-repo` and the registration
      answer name (None: not configured).
    """

    tokens: Mapping[str, str] | str = attrs.field(factory=dict)
    limits: RateLimits | None = attrs.field(factory=RateLimits)
    max_retries: int = 3
    concurrency: int = 1
    idle_timeout: float = 60.0
    accept_timeout: float = 60.0
    stuck_timeout: float = 600.0
    reclaim_on_disconnect: bool = True
    knows_state_report: bool = False
    adopt_reclaimed: bool = True
    invalid_json: str = attrs.field(default="close", validator=attrs.validators.in_(("close", "error")))
    close_on_auth_error: bool = False
    registry_bug: bool = False
    violation_limit: int = 10
    violation_window: float = 60.0
    api_token: str | None = None
    knows_wake_result: bool = False
    knows_agent_restarting: bool = False
    require_auth: bool = False
    default_repo: str | None = None

    def ws_schemas(self) -> dict[str, dict[str, Any]]:
        """The WebSocket schemas this hub accepts."""
        return ws_schemas(
            self.knows_state_report,
            wake_result=self.knows_wake_result,
            agent_restarting=self.knows_agent_restarting,
        )
