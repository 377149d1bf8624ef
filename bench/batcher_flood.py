"""Flood the progress batcher with events and measure throughput and memory.

    .venv/bin/python bench/batcher_flood.py [--events 1000000] [--tasks 4] [--capacity 60] [--budget N]

Producers emit through `ProgressSender.emit` (one `await` per event, as the
executors do) into the default bounded channel; a fast in-memory sink takes the
frames within the rate budget (the hub's bucket of `--capacity`, refilled at
1 a second, above the reserve; `--budget` adds the optional per-minute cap).
Each configuration runs twice: once for speed, once under tracemalloc
for the peak of Python allocations (tracemalloc slows the run down).
"""

from __future__ import annotations

import argparse
import logging
import resource
import time
import tracemalloc
from typing import Any

import trio
import trio.testing

from sidecar.batcher import Batcher
from sidecar.budget import RateBudget
from sidecar.messages import ProgressEvent
from sidecar.progress import ProgressSender, open_progress

# "tokens": one long run per task (an LLM stream); "mixed": the type changes
# every 8 events (a build interleaving stdout and stderr).
_PATTERNS = {
    "tokens": ("token",),
    "mixed": ("token", "token", "token", "token", "stdout", "stderr"),
}


class FastSink:
    def __init__(self) -> None:
        self.frames = 0
        self.bytes = 0

    def can_send(self) -> bool:
        return True

    async def send_progress(self, frame: dict[str, Any]) -> bool:
        await trio.lowlevel.checkpoint()
        self.frames += 1
        self.bytes += len(frame["execution_event"]["text"])
        return True


async def _flood(
    events: int, tasks: int, budget: tuple[int, int | None], batched: bool, pattern: str
) -> tuple[float, Batcher, FastSink]:
    types = _PATTERNS[pattern]
    capacity, per_min = budget
    batcher = Batcher(RateBudget(capacity=capacity, progress_per_min=per_min))
    sink = FastSink()
    send, receive = open_progress()
    per_task = events // tasks

    async def produce(i: int) -> None:
        task_id = f"task-{i}"
        if batched:  # fill the channel without a scheduling round per event
            for n in range(per_task):
                ev = ProgressEvent(task_id, types[(n // 8) % len(types)], f"tok{n} ", timestamp=0)
                try:
                    send.send_nowait(ev)
                except trio.WouldBlock:
                    await send.send(ev)
        else:
            sender = ProgressSender(send, task_id)
            for n in range(per_task):
                await sender.emit(types[(n // 8) % len(types)], f"tok{n} ", tokens_so_far=n)

    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run, receive, sink)
        for i in range(tasks):
            batcher.task_started(f"task-{i}")
        start = time.perf_counter()
        async with trio.open_nursery() as producers:
            for i in range(tasks):
                producers.start_soon(produce, i)
        await trio.testing.wait_all_tasks_blocked()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    assert batcher.stats.events_in == per_task * tasks
    return elapsed, batcher, sink


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=60, help="the hub's normal bucket (60: the real hub)")
    parser.add_argument("--budget", type=int, default=None, help="optional cap, progress frames per minute")

    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the memory runs")
    args = parser.parse_args()

    logging.basicConfig(level=logging.ERROR)  # per-task `progress_dropped` warnings are expected here
    cap = f", progress cap {args.budget}/min" if args.budget else ""
    print(f"{args.events:,} events, {args.tasks} tasks, bucket {args.capacity} (reserve 12){cap}, fast sink")
    budget = (args.capacity, args.budget)
    for pattern in _PATTERNS:
        for batched in (False, True):
            mode = f"{pattern}/{'send_nowait' if batched else 'emit'}"
            elapsed, b, sink = trio.run(_flood, args.events, args.tasks, budget, batched, pattern)
            s = b.stats
            print(
                f"{mode:18} {elapsed:5.2f} s  {args.events / elapsed:9,.0f} events/s  "
                f"frames {s.frames_sent}, coalesced {s.events_coalesced:,}, dropped "
                f"{s.events_dropped:,} events / {s.bytes_dropped:,} bytes, peak pending text "
                f"{s.peak_pending_bytes:,} bytes, sink got {sink.bytes:,} bytes"
            )
        if args.no_tracemalloc:
            continue
        # Memory of the batcher itself: the same flood under tracemalloc (slower).
        tracemalloc.start()
        _, b, _ = trio.run(_flood, args.events, args.tasks, budget, True, pattern)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"{pattern + '/memory':18} peak traced Python memory {peak / 2**20:.2f} MiB "
            f"(peak pending text {b.stats.peak_pending_bytes / 2**20:.2f} MiB)"
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"process max RSS {rss / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
