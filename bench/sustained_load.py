"""Sustained load through a hub enforcing the real rate limits.

    .venv/bin/python bench/sustained_load.py [--tasks 200] [--capacity 4] [--command 'echo hi']

A dev hub runs in this process on 127.0.0.1 with the real hub's rate limits
(normal tier: 60, refilled at 1 a second) and concurrency `--capacity`; a real
`python -m sidecar run` subprocess with the same capacity connects to it. All
tasks are submitted at once; the hub assigns them as slots free up. Each task
costs the agent's normal bucket at least two frames (`task_accepted`,
`task_complete`) plus its progress, so the bucket, not the machine, sets the
pace: about 30 tasks a minute once the first 60 tokens are spent.

Printed: tasks per minute (whole run, and after the first minute), frames the
hub refused (must be 0), `rate_limit_warning`s it sent, and the result-ack
latency: from the sidecar's `task_finished` log line to the hub's `task_ack`
for that result (time the result waited for the budget included), plus
assign -> task_complete.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import trio
from latency import AGENT, TOKEN, Sidecar, pct

from sidecar.devhub import open_dev_hub


def _wall(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


async def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_dev_hub(tokens={AGENT: TOKEN}, concurrency=args.capacity) as hub:
            assert hub.config.limits is not None
            sc = Sidecar(Path(tmp) / "sc", hub.ws_url, capacity=args.capacity)
            try:
                await sc.start()
                await hub.wait_until(lambda: hub.connected(AGENT), 30)
                offset = time.time() - trio.current_time()
                t0 = trio.current_time()
                ids = [
                    hub.submit(
                        metadata={"shell_command": args.command}, routing_decision={"target_type": "sidecar"}
                    )
                    for _ in range(args.tasks)
                ]
                done_at: dict[str, float] = {}

                def progress() -> bool:
                    for t in ids:
                        if t not in done_at and hub.task(t).status in ("completed", "dead_letter"):
                            done_at[t] = trio.current_time()
                    return len(done_at) == len(ids)

                await hub.wait_until(progress, 60 * 60)
                wall = trio.current_time() - t0
                assert await sc.stop() == 0
            finally:
                await sc.cleanup()
            finished = {e["task_id"]: _wall(e["ts"]) for e in sc.events("task_finished")}
    acks: dict[str, float] = {}
    for f in hub.sent(AGENT, type="task_ack"):
        if f.frame is not None and f.frame.get("status") == "complete":
            acks.setdefault(f.frame["task_id"], f.at + offset)
    assigned: dict[str, float] = {}
    for f in hub.sent(AGENT, type="task_assign"):
        if f.frame is not None:
            assigned.setdefault(f.frame["task_id"], f.at)
    completed: dict[str, float] = {}
    for f in hub.frames(AGENT, type="task_complete"):
        if f.frame is not None and f.verdict == "ok":
            completed.setdefault(f.frame["task_id"], f.at)
    ack_ms = [(acks[t] - finished[t]) * 1000 for t in ids if t in acks and t in finished]
    comp_ms = [(completed[t] - assigned[t]) * 1000 for t in ids if t in completed and t in assigned]
    refused = [(f.type, f.verdict) for f in hub.frames(AGENT) if f.verdict != "ok"]
    late = [t for t in ids if done_at[t] - t0 > 60]
    late_rate = (
        (len(late) - 1) / (max(done_at[t] for t in late) - min(done_at[t] for t in late)) * 60
        if len(late) > 1
        else 0.0
    )
    ok = sum(1 for t in ids if hub.task(t).status == "completed")
    print(
        f"{args.tasks} `{args.command}` tasks at capacity {args.capacity}, dev hub with the real rate limits"
    )
    print(
        f"completed          : {ok}/{args.tasks} in {wall:.1f} s: {args.tasks / wall * 60:.1f} tasks/min"
        f" (after the first minute: {late_rate:.1f} tasks/min)"
    )
    print(f"frames refused     : {len(refused)} {sorted(set(refused))}")
    print(f"rate_limit_warning : {len(hub.sent(AGENT, type='rate_limit_warning'))} sent by the hub")
    print(
        f"result -> ack      : median {statistics.median(ack_ms):7.1f} ms  p99 {pct(ack_ms, 99):7.1f} ms"
        f"  max {max(ack_ms):7.1f} ms  (n={len(ack_ms)})"
    )
    print(
        f"assign -> complete : median {statistics.median(comp_ms):7.1f} ms  p99 {pct(comp_ms, 99):7.1f} ms"
        f"  max {max(comp_ms):7.1f} ms"
    )
    kinds: dict[str, int] = {}
    for f in hub.frames(AGENT):
        kinds[f.type or "?"] = kinds.get(f.type or "?", 0) + 1
    print(f"frames received    : {dict(sorted(kinds.items()))}")
    n_progress = len(hub.frames(AGENT, type="task_progress"))
    print(f"progress frames    : {n_progress} ({n_progress / args.tasks:.2f} a task)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--capacity", type=int, default=4)
    ap.add_argument("--command", default="echo hi")
    trio.run(bench, ap.parse_args())


if __name__ == "__main__":
    main()
