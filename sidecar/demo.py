"""`sidecar demo`: the dev hub, a sidecar connected to it, and a few shell tasks, live.

Everything runs for real: the hub is the dev hub on 127.0.0.1 (with the real
hub's validation and rate limits), the sidecar is the same code `sidecar run`
uses, the tasks are real processes. What is printed is what the hub received.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import trio

from .app import open_sidecar
from .config import config_from_mapping
from .devhub import DevHub, open_dev_hub
from .view import LiveView

DEMO_TASKS: list[tuple[str, dict[str, Any]]] = [
    (
        "stream",
        {
            "description": "count to eight, slowly",
            "metadata": {
                "shell_command": 'for i in 1 2 3 4 5 6 7 8; do echo "line $i of 8"; sleep 0.4; done',
                "timeout_ms": 20_000,
            },
        },
    ),
    (
        "fail",
        {
            "description": "a command that fails (retried once, then reported)",
            "metadata": {"shell_command": "echo 'about to fail' >&2; exit 3", "timeout_ms": 20_000},
        },
    ),
    (
        "timeout",
        {
            "description": "ignores SIGTERM and outlives its 2 s limit: SIGKILL 5 s later",
            "metadata": {
                "shell_command": "trap '' TERM; echo 'ignoring SIGTERM, sleeping'; sleep 60 & wait; sleep 60",
                "timeout_ms": 2_000,
            },
        },
    ),
]


class _View:
    """Shows progress as the hub receives it, and a result line per task (`view.LiveView`)."""

    def __init__(self, hub: DevHub, names: dict[str, str], out: TextIO, tty: bool | None = None) -> None:
        self.hub = hub
        self.names = names
        self.live = LiveView(out, tty=tty, labels=True)
        for tid, name in names.items():
            self.live.add(tid, name)
        self.seen: dict[str, int] = dict.fromkeys(names, 0)
        self.reported: set[str] = set()

    def has_news(self) -> bool:
        for tid in self.names:
            rec = self.hub.task(tid)
            if len(rec.progress) != self.seen[tid] or (tid not in self.reported and rec.failures):
                return True
            if tid not in self.reported and rec.status in ("completed", "dead_letter", "cancelled"):
                return True
        return False

    def update(self) -> bool:
        """Show what is new; True when every task has a final result."""
        for tid, name in self.names.items():
            rec = self.hub.task(tid)
            for p in rec.progress[self.seen[tid] :]:
                ev = p.get("execution_event") or {}
                tokens = ev.get("tokens_so_far")
                self.live.event(
                    tid,
                    str(ev.get("event_type")),
                    str(ev.get("text", "")),
                    tokens_so_far=tokens if isinstance(tokens, int) else None,
                    model=ev.get("model") if isinstance(ev.get("model"), str) else None,
                )
            self.seen[tid] = len(rec.progress)
            if tid not in self.reported and rec.status in ("completed", "dead_letter", "cancelled"):
                self.reported.add(tid)
                self._result(tid, name, rec)
            elif tid not in self.reported and rec.failures and rec.status == "queued":
                # The dev hub retries failed tasks; the demo shows the first failure only.
                self.reported.add(tid)
                self._result(tid, name, rec)
        return self.reported == set(self.names)

    def _result(self, tid: str, name: str, rec: Any) -> None:
        if rec.result is not None:
            r = rec.result
            line = (
                f"{name}: success, exit {r.get('exit_code')}, {r.get('attempts')} attempt(s), "
                f"{r.get('execution_ms')} ms, output {len(str(r.get('output', '')))} chars"
            )
            self.live.finish(tid, True, line)
        else:
            fail = rec.failures[-1] if rec.failures else {}
            error = str(fail.get("error"))[:200]
            self.live.finish(tid, False, f"{name}: failed ({fail.get('reason')}): {error}")

    async def animate(self) -> None:
        """Spin the status area while tasks run (terminal only)."""
        while self.live.tty:
            await trio.sleep(0.1)
            self.live.tick()


async def run_demo(state_dir: str | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    token = "demo-token-" + str(int(time.time()))
    with tempfile.TemporaryDirectory(prefix="sidecar-demo-") as tmp:
        root = Path(state_dir) if state_dir else Path(tmp)
        # max_retries=0: the hub reports a failure instead of re-queueing it, so the
        # demo ends; the sidecar still retries the failing command once itself.
        async with open_dev_hub(tokens={"demo-agent": token}, concurrency=3, max_retries=0) as hub:
            out.write(f"dev hub listening on {hub.ws_url} (HTTP API {hub.api_url}/api/tasks)\n")
            config = config_from_mapping(
                {
                    "agent_id": "demo-agent",
                    "token": token,
                    "hub_url": hub.ws_url,
                    "state_dir": str(root / "state"),
                    "capacity": 3,
                },
                base_dir=root,
            )
            async with open_sidecar(config):
                await hub.wait_until(lambda: hub.connected("demo-agent"), timeout=15)
                out.write(f"sidecar connected as demo-agent; state in {config.state_dir}\n\n")
                names = {
                    hub.submit(spec, routing_decision={"target_type": "sidecar"}): n for n, spec in DEMO_TASKS
                }
                view = _View(hub, names, out)
                with trio.move_on_after(60) as scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(view.animate)
                        while not view.update():
                            await hub.wait_until(view.has_news, timeout=60)
                        nursery.cancel_scope.cancel()
                view.live.close()
                if scope.cancelled_caught:
                    out.write("demo timed out waiting for results\n")
                    return 1
            out.write("\nsidecar stopped; nothing left running. Task logs were in the state dir.\n")
    return 0
