"""End to end: a million-line task through the real `sidecar run`, hub rate limits ON.

The dev hub enforces the real hub's per-agent buckets (normal tier: 60 frames a
minute). A task printing a million lines must neither get a result frame
dropped for rate, nor leave holes in the progress sequence that are not
announced, nor grow the sidecar's memory with the output.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import psutil
import pytest
import trio

from sidecar.devhub import DevHub

from .harness import AGENT, SidecarProcess

LINES = 1_000_000
# `seq 1 1000000` prints this many bytes: 9 one-digit, 90 two-digit, ... numbers, each with "\n".
SEQ_BYTES = sum((min(LINES, 10**d - 1) - 10 ** (d - 1) + 1) * (d + 1) for d in range(1, 8))
RSS_BOUND = 150 * 1024 * 1024
OUTPUT_CAP = 1024 * 1024


class RssSampler:
    """Samples a process's RSS periodically (a measurement, not a timing assertion)."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.samples: list[int] = []

    async def run(self, period: float = 0.02) -> None:
        while True:
            try:
                self.samples.append(self.proc.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            await trio.sleep(period)


# "burst": `seq` prints everything in a fraction of a second.
# "paced": the same million lines in 100 bursts over about 8 s, so that many
# 100 ms windows have output: sent one frame per window, progress alone would
# exceed the hub's bucket of 60 within the run; the rate budget must hold.
PACED = (
    f"{shlex.quote(sys.executable)} -c 'import sys, time\n"
    "for b in range(100):\n"
    '    sys.stdout.write("".join(f"{i}\\n" for i in range(b * 10000 + 1, b * 10000 + 10001)))\n'
    "    sys.stdout.flush(); time.sleep(0.08)'"
)
COMMANDS = {"burst": f"seq 1 {LINES}", "paced": PACED}


@pytest.mark.parametrize("kind", ["burst", "paced"])
async def test_million_lines_with_rate_limits_on(tmp_path: Path, hub: DevHub, kind: str) -> None:
    sc = SidecarProcess(tmp_path / "sc", hub.ws_url, output_cap_bytes=OUTPUT_CAP)
    try:
        await sc.start()
        await hub.wait_until(lambda: hub.connected(AGENT), 30)
        sampler = RssSampler(sc.pid)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sampler.run)
            baseline = max(sampler.samples or [psutil.Process(sc.pid).memory_info().rss])
            tid = hub.submit(
                description="flood",
                metadata={"shell_command": COMMANDS[kind], "timeout_ms": 60_000},
                routing_decision={"target_type": "sidecar"},
                max_retries=0,
            )
            rec = await hub.wait_until(
                lambda: hub.task(tid) if hub.task(tid).status == "completed" else None, 50
            )
            if kind == "paced":
                # Drops are announced: wait for a frame that says what was lost.
                # (A burst may all fit: the executor clips each block it reads
                # itself, saying so in the text, and the bucket is still full.)
                await hub.wait_until(
                    lambda: any(e.get("dropped_bytes", 0) > 0 for e in hub.task(tid).progress_events), 30
                )
            nursery.cancel_scope.cancel()
        # A graceful stop flushes what progress is left (bounded): after it, every
        # frame the sidecar will ever send for this task is in the hub's records.
        assert await sc.stop() == 0

        # The result was acknowledged, capped (head and tail kept) and flagged.
        assert rec is not None
        result = rec.result
        assert result is not None
        assert result["status"] == "success" and result["exit_code"] == 0
        assert result["output_truncated"] is True
        output = result["output"]
        assert len(output.encode()) <= OUTPUT_CAP + 1024
        assert output.startswith("1\n2\n3\n")
        assert output.rstrip().endswith("999999\n1000000")
        assert rec.ack_statuses[-1] == "complete"
        # The full output is in the task's log file.
        logs = list((sc.state_dir / "logs").glob("*.log"))
        assert len(logs) == 1 and logs[0].stat().st_size >= SEQ_BYTES

        # No frame of ours was refused: no result, accept or progress frame rate-limited.
        assert [(v.kind, v.detail) for v in hub.violations] == []
        assert hub.internal_errors == []
        ours = hub.frames(AGENT)
        assert {f.verdict for f in ours} == {"ok"}, {(f.type, f.verdict) for f in ours}
        assert len(hub.frames(AGENT, type="task_complete")) == 1
        assert not hub.sent(AGENT, type="rate_limited")

        # Progress: seq rises by exactly one per frame, drops are counted in the frames.
        events = hub.task(tid).progress_events
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert all(e["event_type"] == "stdout" for e in events)
        dropped = sum(int(e.get("dropped_bytes", 0)) for e in events)
        assert dropped < SEQ_BYTES
        if kind == "paced":
            assert dropped > 0 and sum(int(e.get("dropped_events", 0)) for e in events) > 0
        # The budget held: progress took only what lay above the reserve (the
        # hub's 60, less 12 and one for the task held) plus the refill of one
        # a second over the run.
        times = [f.at for f in ours if f.type == "task_progress"]
        assert len(events) <= 60 - 12 - 1 + (times[-1] - times[0]) + 1

        # Memory stayed bounded while the output streamed through.
        assert sampler.samples, "no RSS sample taken"
        peak = max(sampler.samples)
        assert peak < RSS_BOUND, f"peak RSS {peak / 2**20:.1f} MiB (baseline {baseline / 2**20:.1f} MiB)"
        assert peak - baseline < 60 * 1024 * 1024, (peak - baseline) / 2**20
    finally:
        await sc.cleanup()
