"""Progress stays live through the whole daemon: hub pauses, the budget, result order.

In-process `Sidecar` against the dev hub (real hub limits), under a virtual
clock. The task is a timer in-process (`Ticker`), not a child: a child's
`sleep` runs in real time while the mock clock jumps, so only an in-process
executor can print "every 0.5 s" in virtual time. Everything around it (the
supervisor, batcher, budget, outbox, link, WebSocket and hub) is the real one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.devhub import DevHub, open_dev_hub
from sidecar.executors import ExecContext, Executor
from sidecar.executors.registry import build_executors
from sidecar.messages import Outcome
from sidecar.store import Store
from sidecar.taskrun import TaskRun

AGENT, TOKEN = "agent-1", "live-test-token-9"


class Ticker:
    """A shell task stand-in on virtual time: prints `lines` lines, one every `period` s."""

    def __init__(self, lines: int, period: float) -> None:
        self.lines = lines
        self.period = period

    async def __call__(self, run: TaskRun) -> Outcome:
        for i in range(1, self.lines + 1):
            await trio.sleep(self.period)
            await run.progress.emit("stdout", f"line {i}\n")
        return Outcome(ok=True, output=f"{self.lines} lines", exit_code=0)


@asynccontextmanager
async def live_sidecar(config: Config, shell: Executor) -> AsyncIterator[Sidecar]:
    """The real daemon in-process, its shell executor replaced by `shell`."""

    def executors(ctx: ExecContext) -> dict[str, Executor]:
        return {**build_executors(ctx), "shell": shell}

    store = await Store.open(Path(config.resolved_state_dir()) / "sidecar.db", durable=False)
    try:
        async with httpx.AsyncClient() as http:
            sc = Sidecar(config, store, http, executors=executors)
            async with trio.open_nursery() as nursery:
                await nursery.start(sc.run)
                yield sc
                with trio.CancelScope(shield=True):
                    await sc.shutdown()
    finally:
        await store.close()


def progress_times(hub: DevHub, tid: str) -> list[float]:
    """Hub times at which `tid`'s task_progress frames arrived (accepted ones)."""
    return [
        f.at
        for f in hub.frames(AGENT, type="task_progress")
        if f.verdict == "ok" and f.frame is not None and f.frame.get("task_id") == tid
    ]


@pytest.mark.parametrize("retry_after_ms", ["1e400", "1e12"])
async def test_absurd_rate_limited_does_not_silence_progress(
    clock: trio.testing.MockClock, make_config: Any, retry_after_ms: str
) -> None:
    """A 45 s task printing every 0.5 s still streams progress in its last 10 s
    after a `rate_limited` asking for an absurd pause arrived 2 s in."""
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN)
        async with live_sidecar(cfg, Ticker(90, 0.5)):
            await hub.wait_until(lambda: hub.connected(AGENT), timeout=10)
            tid = hub.submit(metadata={"shell_command": "t"}, routing_decision={"target_type": "sidecar"})
            accepts = await hub.wait_until(lambda: hub.frames(AGENT, type="task_accepted"), timeout=10)
            accepted = accepts[0].at
            await trio.sleep_until(accepted + 2)
            # Raw text: `1e400` is valid JSON that Python reads as infinity.
            frame = f'{{"type":"rate_limited","retry_after_ms":{retry_after_ms},"tier":"normal"}}'
            await hub.send_raw(AGENT, frame)
            await hub.wait_until(lambda: hub.task(tid).status == "completed", timeout=120)
            done = hub.frames(AGENT, type="task_complete")[0].at
    late = [t for t in progress_times(hub, tid) if t >= done - 10]
    assert late, f"no progress in the last 10 s (progress at {progress_times(hub, tid)}, result at {done})"
    assert [v for v in hub.violations if v.kind != "rate_limited"] == []


async def test_a_burst_of_short_tasks_is_paced_not_refused(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    """30 short tasks at capacity 4: accepts and results take the whole bucket and
    wait for its refill; none is refused, and every accept precedes its result."""
    async with open_dev_hub(tokens={AGENT: TOKEN}, concurrency=4) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, capacity=4)
        async with live_sidecar(cfg, Ticker(1, 0.05)):
            await hub.wait_until(lambda: hub.connected(AGENT), timeout=10)
            ids = [
                hub.submit(metadata={"shell_command": "t"}, routing_decision={"target_type": "sidecar"})
                for _ in range(40)
            ]
            await hub.wait_until(lambda: all(hub.task(t).status == "completed" for t in ids), timeout=300)
    assert {(f.type, f.verdict) for f in hub.frames(AGENT) if f.verdict != "ok"} == set()
    assert not hub.sent(AGENT, type="rate_limited")
    for tid in ids:
        kinds = [f.type for f in hub.frames(AGENT) if f.frame is not None and f.frame.get("task_id") == tid]
        assert "task_accepted" in kinds and kinds.index("task_accepted") < kinds.index("task_complete"), kinds
    # 80 lifecycle frames and some progress through a bucket of 60 refilled at 1 a second.
    lifecycle = [f.at for f in hub.frames(AGENT) if f.type in ("task_accepted", "task_complete")]
    assert max(lifecycle) - min(lifecycle) >= 80 - 60 - 1
