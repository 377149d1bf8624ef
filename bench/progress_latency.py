"""Progress latency: a line printed by a task's child → its frame at the hub, rate limits ON.

    .venv/bin/python bench/progress_latency.py [--seconds 10] [--rate 2.5] [--flooders 3]

A dev hub runs in this process on 127.0.0.1 with the real hub's rate limits
(normal tier: 60, refilled at 1 a second) and a real `python -m sidecar run`
subprocess (capacity 4) connects to it. Two runs, each on a fresh hub and
sidecar:

- single: one task printing `--rate` lines a second for `--seconds`;
- flood: the same task while `--flooders` other tasks print as fast as a
  Python loop writing 4 KiB blocks can (about 2 MB/s each) for as long.

Each line carries the child's own wall-clock time (`time.time()`); its
arrival is the hub's record of the `task_progress` frame that carried it,
converted to wall clock in this process. Printed: p50, p99 and max of
arrival - print, lines never delivered, and lines delivered after their
task's `task_complete` reached the hub; frames the hub refused.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from latency import AGENT, TOKEN, Sidecar, pct

from sidecar.devhub import DevHub, open_dev_hub

PRINTER = """
import sys, time
n, period = int(sys.argv[1]), float(sys.argv[2])
start = time.time()
for i in range(1, n + 1):
    time.sleep(max(0.0, start + i * period - time.time()))
    print(f"L {i} {time.time() * 1000:.3f}", flush=True)
"""

FLOODER = """
import sys, time
end = time.time() + float(sys.argv[1])
block = ("flood " * 13 + "\\n") * 50
while time.time() < end:
    sys.stdout.write(block)
    sys.stdout.flush()
    time.sleep(0.002)
"""


def py(code: str, *args: object) -> str:
    return " ".join(shlex.quote(str(a)) for a in (sys.executable, "-c", code, *args))


async def one_run(seconds: float, rate: float, flooders: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_dev_hub(tokens={AGENT: TOKEN}, concurrency=1 + flooders) as hub:
            assert hub.config.limits is not None
            sc = Sidecar(Path(tmp) / "sc", hub.ws_url, capacity=1 + flooders)
            try:
                await sc.start()
                await hub.wait_until(lambda: hub.connected(AGENT), 30)
                # trio time -> wall clock, for the hub's frame records
                offset = time.time() - trio.current_time()
                flood_ids = [
                    hub.submit(
                        metadata={"shell_command": py(FLOODER, seconds), "timeout_ms": 120_000},
                        routing_decision={"target_type": "sidecar"},
                        max_retries=0,
                    )
                    for _ in range(flooders)
                ]
                lines = round(seconds * rate)
                tid = hub.submit(
                    metadata={"shell_command": py(PRINTER, lines, 1 / rate), "timeout_ms": 120_000},
                    routing_decision={"target_type": "sidecar"},
                    max_retries=0,
                )
                ids = [tid, *flood_ids]
                await hub.wait_until(
                    lambda: all(hub.task(t).status == "completed" for t in ids), seconds + 120
                )
                assert await sc.stop() == 0  # a graceful stop flushes what progress is left
            finally:
                await sc.cleanup()
            return measure(hub, tid, lines, offset)


def measure(hub: DevHub, tid: str, lines: int, offset: float) -> dict[str, Any]:
    complete_at = min(
        f.at for f in hub.frames(AGENT, type="task_complete") if f.frame and f.frame["task_id"] == tid
    )
    delays: dict[int, float] = {}
    after_result = 0
    for f in hub.frames(AGENT, type="task_progress"):
        if f.verdict != "ok" or f.frame is None or f.frame.get("task_id") != tid:
            continue
        arrived_ms = (f.at + offset) * 1000
        for line in str(f.frame["execution_event"].get("text", "")).splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "L":
                n = int(parts[1])
                if n not in delays:
                    delays[n] = arrived_ms - float(parts[2])
                    after_result += f.at > complete_at
    refused = [f for f in hub.frames(AGENT) if f.verdict != "ok"]
    return {
        "delays_ms": [delays[n] for n in sorted(delays)],
        "lost": lines - len(delays),
        "after_result": after_result,
        "refused": len(refused),
        "frames": len(
            [f for f in hub.frames(AGENT, type="task_progress") if f.frame and f.frame["task_id"] == tid]
        ),
        "all_progress_frames": len(hub.frames(AGENT, type="task_progress")),
    }


def report(name: str, r: dict[str, Any]) -> None:
    d = r["delays_ms"]
    print(
        f"{name:<7}: p50 {statistics.median(d):7.1f} ms  p99 {pct(d, 99):7.1f} ms  max {max(d):7.1f} ms"
        f"  lines {len(d)} (+{r['lost']} lost)  after result {r['after_result']}"
        f"  frames {r['frames']} of {r['all_progress_frames']}  refused {r['refused']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=2.5, help="lines a second of the measured task")
    ap.add_argument("--flooders", type=int, default=3)
    args = ap.parse_args()
    print(
        f"one task printing {args.rate} lines/s for {args.seconds} s; dev hub with the real rate limits;"
        " latency = hub receipt - the child's own timestamp"
    )
    report("single", trio.run(one_run, args.seconds, args.rate, 0))
    report("flood", trio.run(one_run, args.seconds, args.rate, args.flooders))


if __name__ == "__main__":
    main()
