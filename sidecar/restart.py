"""The hub's `restart_sidecar`: finish the running tasks (bounded), then restart.

On the request the sidecar tells the hub it is restarting (`agent_restarting`,
when the hub knows the type), stops taking work (an assignment is answered
`task_failed`, reason `sidecar_busy`, so the hub gives it to another agent),
waits up to `restart_drain_s` for the tasks it holds to end, and then stops
gracefully with exit status 75: the service manager starts it again. Tasks
still running at the bound are cancelled by the graceful stop and reported
`sidecar_shutdown`. A signal meanwhile stops it at once, as always.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .log import get_logger
from .messages import LIMITS, now_ms, truncate
from .supervisor import Supervisor

log = get_logger("sidecar.restart")


class Restarter:
    def __init__(
        self,
        supervisor: Supervisor,
        drain_s: float,
        send_optional: Callable[[dict[str, Any]], Awaitable[None]],
        stop: Callable[[], None],
    ) -> None:
        self.supervisor = supervisor
        self.drain_s = drain_s
        self.send_optional = send_optional
        self.stop = stop
        self.reason: str | None = None
        self._requested = trio.Event()

    def request(self, reason: str) -> None:
        if self._requested.is_set():
            log.info("restart_already_requested", reason=reason[:200])
            return
        self.reason = reason
        self._requested.set()

    async def run(self) -> None:
        """Wait for a request, then drain and stop (in the daemon's nursery)."""
        await self._requested.wait()
        sup = self.supervisor
        held = len(sup.held)
        log.warning(
            "restart_requested", reason=(self.reason or "")[:200], tasks_held=held, wait_s=self.drain_s
        )
        await self.send_optional(
            {
                "type": "agent_restarting",
                "reason": truncate(self.reason or "restart_sidecar", LIMITS["reason"]),
                "running_tasks": held,
                "wait_ms": int(self.drain_s * 1000),
                "timestamp": now_ms(),
            }
        )
        sup.stop_taking_work()
        with trio.move_on_after(self.drain_s) as scope:
            await sup.wait_idle()
        if scope.cancelled_caught:
            log.warning("restart_drain_timed_out", tasks_held=len(sup.held), wait_s=self.drain_s)
        else:
            log.info("restart_drained", tasks_finished=held)
        self.stop()
