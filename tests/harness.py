"""Drive the real `sidecar run` process against a dev hub, as a user would.

`SidecarProcess` writes a config file, starts `python -m sidecar run` with JSON
logs to a file, and offers what the end-to-end tests need: wait for a log
event, stop with a signal, kill -9, restart on the same state dir.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil
import trio

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.frames import InboundFrame, read_frame
from sidecar.link import HubLink
from sidecar.messages import FrameError
from sidecar.store import Store

TOKEN = "e2e-secret-token-42"
AGENT = "agent-1"


def alive(pid: int) -> bool:
    """True if `pid` is a live (non-zombie) process."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def read_pids(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(x) for x in path.read_text().split() if x.strip().isdigit()]


class SidecarProcess:
    def __init__(self, root: Path, hub_url: str, *, fmt: str = "toml", **overrides: Any) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_dir = root / "state"
        self.log_path = root / "sidecar.log"
        self.config: dict[str, Any] = {
            "agent_id": AGENT,
            "token": TOKEN,
            "hub_url": hub_url,
            "state_dir": str(self.state_dir),
            "kill_grace_s": 2.0,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
        }
        self.config.update(overrides)
        self.fmt = fmt
        self.proc: trio.Process | None = None
        self.starts = 0

    def write_config(self) -> Path:
        if self.fmt == "json":
            path = self.root / "config.json"
            path.write_text(json.dumps(self.config, indent=2))
        else:
            path = self.root / "sidecar.toml"
            lines = []
            for key, value in self.config.items():
                lines.append(f"{key} = {json.dumps(value)}")
            path.write_text("\n".join(lines) + "\n")
        return path

    def argv(self, config_path: Path) -> list[str]:
        """The command line of `sidecar run` on `config_path`."""
        argv = [sys.executable, "-m", "sidecar", "--log-format", "json", "--log-level", "debug"]
        return [*argv, "run", "--config", str(config_path)]

    def child_env(self) -> dict[str, str]:
        """The process's environment: ours, without SIDECAR_* variables."""
        return {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}

    async def start(self) -> None:
        path = self.write_config()
        self.starts += 1
        # Closed by `with` also when open_process raises: it is a checkpoint (its
        # worker-thread hand-off), and a start in a cancelled scope otherwise left
        # the file to the GC, whose ResourceWarning the suite turns into an error.
        with self.log_path.open("ab") as log:
            self.proc = await trio.lowlevel.open_process(
                self.argv(path),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.child_env(),
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:  # noqa: ASYNC109
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        with trio.fail_after(timeout):
            code = await self.proc.wait()
        return code

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and (name is None or obj.get("event") == name):
                out.append(obj)
        return out

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def cleanup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with trio.move_on_after(10):
                await self.proc.wait()


class LinkRecorder:
    """A LinkHandler that records what a HubLink hands it, for link-level tests."""

    def __init__(self) -> None:
        self.frames: list[InboundFrame] = []
        self.identified = 0
        self.disconnects = 0
        self._changed = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, predicate: Any) -> Any:
        """Until `predicate()` is truthy, re-checked whenever the link reports something."""
        while not (value := predicate()):
            await self._changed.wait()
        return value

    async def on_identified(self, link: HubLink) -> None:
        self.identified += 1
        self._wake()

    async def on_frame(self, frame: InboundFrame) -> None:
        self.frames.append(frame)
        self._wake()

    def busy(self) -> bool:
        return False

    def on_disconnected(self) -> None:
        self.disconnects += 1
        self._wake()

    def on_bad_frame(self, error: FrameError, raw: str | bytes) -> None:
        pass


@asynccontextmanager
async def running_link(config: Config) -> AsyncIterator[tuple[HubLink, LinkRecorder]]:
    """A real HubLink running against `config.hub_url`, closed on exit."""
    rec = LinkRecorder()
    link = HubLink(config, rec)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.run)
        yield link, rec
        link.close()
        nursery.cancel_scope.cancel()


class FrameHandler(Protocol):
    async def on_frame(self, frame: InboundFrame) -> None: ...
    def on_bad_frame(self, error: FrameError, raw: str | bytes) -> None: ...


async def feed(handler: FrameHandler, frame: dict[str, Any] | str) -> None:
    """Hand `frame` to a sidecar as the link does: typed, or to on_bad_frame if unusable."""
    raw = frame if isinstance(frame, str) else json.dumps(frame)
    try:
        typed = read_frame(raw)
    except FrameError as exc:
        handler.on_bad_frame(exc, raw)
        return
    await handler.on_frame(typed)


@asynccontextmanager
async def offline_sidecar(config: Config, db: str = "r.db") -> AsyncIterator[tuple[Sidecar, Store]]:
    """A real Sidecar (store, supervisor, executors) with no hub: nothing leaves its outbox."""
    store = await Store.open(Path(config.resolved_state_dir()) / db, durable=False)
    try:
        async with httpx.AsyncClient() as http:
            sc = Sidecar(config, store, http)
            async with trio.open_nursery() as nursery:
                await nursery.start(sc.run)
                yield sc, store
                sc.stopped.set()
    finally:
        await store.close()


def shell_assign(task_id: str, command: str, generation: int = 1) -> dict[str, Any]:
    return {
        "type": "task_assign",
        "task_id": task_id,
        "generation": generation,
        "metadata": {"shell_command": command},
        "routing_decision": {"target_type": "sidecar"},
    }
