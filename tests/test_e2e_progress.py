"""End to end, hub rate limits ON: progress is live, and all of it precedes the result.

The real `sidecar run` process against the dev hub enforcing the real hub's
buckets (normal tier: 60, refilled at 1 a second). Each line the child prints
carries its own wall-clock time, so how late it reached the hub is measured,
not guessed.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from sidecar.devhub import DevHub

from .harness import AGENT, SidecarProcess

LINES = 12
# Each line: "line N <ms since the epoch>", one every 0.4 s.
PRINTER = f'for i in $(seq 1 {LINES}); do echo "line $i $(date +%s%3N)"; sleep 0.4; done'


async def test_every_line_reaches_the_hub_live_and_before_the_result(tmp_path: Path, hub: DevHub) -> None:
    sc = SidecarProcess(tmp_path / "sc", hub.ws_url)
    arrivals: dict[int, float] = {}  # line number -> wall-clock ms it reached the hub
    try:
        await sc.start()
        await hub.wait_until(lambda: hub.connected(AGENT), 30)
        tid = hub.submit(
            description="printer",
            metadata={"shell_command": PRINTER, "timeout_ms": 30_000},
            routing_decision={"target_type": "sidecar"},
            max_retries=0,
        )

        def note_arrivals() -> bool:
            now_ms = time.time() * 1000
            for e in hub.task(tid).progress_events:
                for line in str(e.get("text", "")).splitlines():
                    parts = line.split()
                    if len(parts) == 3 and parts[0] == "line":
                        arrivals.setdefault(int(parts[1]), now_ms)
            return hub.task(tid).status == "completed"

        with trio.fail_after(30):
            await hub.wait_until(note_arrivals, 30)
        assert await sc.stop() == 0
    finally:
        await sc.cleanup()

    frames = hub.frames(AGENT)
    assert {f.verdict for f in frames} == {"ok"}, {(f.type, f.verdict) for f in frames}
    assert [(v.kind, v.detail) for v in hub.violations] == []
    # Every line arrived in a progress frame received before the task_complete.
    order = [f.type for f in frames if f.frame is not None and f.frame.get("task_id") == tid]
    complete_at = order.index("task_complete")
    progress_before = [
        f.frame["execution_event"]
        for f in frames
        if f.type == "task_progress" and f.frame is not None and f.frame.get("task_id") == tid
    ][: order[:complete_at].count("task_progress")]
    lines = [
        line.split()
        for e in progress_before
        for line in str(e["text"]).splitlines()
        if line.startswith("line ")
    ]
    assert [int(p[1]) for p in lines] == list(range(1, LINES + 1))
    events = hub.task(tid).progress_events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    # Live: each line reached the hub soon after it was printed (generous for a
    # loaded CI machine; bench/progress_latency.py measures the real figures).
    printed = {int(p[1]): int(p[2]) for p in lines}
    late = {n: arrivals[n] - printed[n] for n in printed if arrivals[n] - printed[n] > 1000}
    assert not late, late
