"""`sidecar leave`: take an agent out of the fleet.

    1. service    stop and disable sidecar-NAME.service, remove its unit file
    2. token      revoke it on the hub (DELETE /admin/tokens/NAME)
    3. directory  remove the agent's directory, only if it holds join's marker for NAME

Each step reports ok or FAILED and the others still run. NAME is checked
first (`[A-Za-z0-9._-]+`, not `.` or `..`): it names a directory and a unit.
The hub and token default to those join wrote (DIR/sidecar.toml, sidecar.env).
Exit status: 0 every step ok, 1 one failed, 2 bad usage.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TextIO

import attrs
import httpx
import trio

from . import agentdir, repo, service
from .agentdir import AgentDir
from .hubapi import HubAPI, HubError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


@attrs.frozen
class LeaveRequest:
    name: str
    hub: str | None = None
    token: str | None = None
    dir: str | None = None
    unit_dir: str | None = None


class Leave:
    def __init__(self, req: LeaveRequest, out: TextIO, http: httpx.AsyncClient) -> None:
        self.req = req
        self.out = out
        self.http = http
        path = Path(req.dir).expanduser().absolute() if req.dir else agentdir.default_base() / req.name
        self.dir = AgentDir(path)
        self.failed = 0

    def report(self, step: int, what: str, ok: bool, text: str) -> None:
        if not ok:
            self.failed += 1
        print(f"[{step}/3] {what}: {'ok' if ok else 'FAILED'}: {text}", file=self.out, flush=True)

    async def run(self) -> int:
        # Read what join wrote before anything is removed.
        settings = self.dir.config_settings() if self.dir.marker_agent() == self.req.name else {}
        token = self.req.token or (self.dir.read_token() if settings else None)
        hub = self.req.hub or settings.get("hub_api_url")
        hub_url = hub if isinstance(hub, str) else None
        steps: list[tuple[str, Callable[[], Awaitable[tuple[bool, str]]]]] = [
            ("service", partial(self.stop_service, token)),
            ("token", partial(self.revoke, hub_url, token)),
            ("directory", self.remove_dir),
        ]
        for step, (what, action) in enumerate(steps, start=1):
            try:
                ok, text = await action()
            except Exception as exc:  # one step's surprise must not stop the others
                ok, text = False, f"{type(exc).__name__}: {exc}"
            self.report(step, what, ok, text)
        return EXIT_FAILED if self.failed else EXIT_OK

    async def stop_service(self, token: str | None) -> tuple[bool, str]:
        unit = service.unit_for(self.req.name, Path(self.req.unit_dir) if self.req.unit_dir else None)
        if not unit.path.exists():
            return True, f"no {unit.name} installed"
        if not service.systemd_present():
            return False, f"{unit.path} exists but systemctl is not on PATH"
        ok, said = await service.run_systemctl(unit.systemctl("disable", "--now", unit.name), secret=token)
        if not ok:
            return False, f"systemctl disable --now {unit.name}: {said}"
        await trio.Path(unit.path).unlink(missing_ok=True)
        ok, said = await service.run_systemctl(unit.systemctl("daemon-reload"), secret=token)
        if not ok:
            return False, f"stopped and disabled, but systemctl daemon-reload: {said}"
        return True, f"stopped and disabled {unit.name}, removed {unit.path}"

    async def revoke(self, hub: str | None, token: str | None) -> tuple[bool, str]:
        if not hub:
            return False, "no --hub given and no config from sidecar join to take it from"
        if not token:
            return False, "no --token given and no token file from sidecar join to take it from"
        try:
            revoked = await HubAPI(self.http, hub, token).revoke(self.req.name)
        except (HubError, ValueError) as exc:
            return False, str(exc)
        return True, "token revoked" if revoked else "the hub holds no token for this agent"

    async def remove_dir(self) -> tuple[bool, str]:
        path = self.dir.path
        if not path.exists() and not path.is_symlink():
            return True, f"{path} does not exist"
        owner = self.dir.marker_agent()
        if owner is None:
            return False, f"{path} holds no marker of sidecar join: left alone"
        if owner != self.req.name:
            return (
                False,
                f"{path} was made by sidecar join for agent {owner!r}, not {self.req.name!r}: left alone",
            )
        await trio.to_thread.run_sync(repo.remove_tree, path)
        return True, f"removed {path}"


async def run_leave(req: LeaveRequest, out: TextIO) -> int:
    why = agentdir.check_name(req.name)
    if why is not None:
        print(f"sidecar leave: --name: {why}; nothing done", file=out)
        return EXIT_USAGE
    async with httpx.AsyncClient() as http:
        return await Leave(req, out, http).run()
