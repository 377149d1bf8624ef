"""Memory of the real `sidecar run` process: idle, and with 100 sleeping tasks.

    .venv/bin/python bench/rss.py [--tasks 100] [--rounds 2]

A dev hub runs in this process with rate limits OFF (100 `task_accepted` at
once would exceed the real hub's normal-tier bucket of 60; limits are not what
this measures) and `concurrency=N`; the sidecar runs with `capacity = N`.

Figures (the sidecar process alone, children not included):
- idle: RSS and USS after identify, once the first resource report is in;
- busy: with N `sleep 600` shell tasks running at once (all N children seen);
- after: once every task was cancelled by the hub and has finished.
`--rounds` repeats busy/after to show whether memory keeps growing.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import psutil
import trio
from latency import AGENT, TOKEN, UNLIMITED, Sidecar

from sidecar.devhub import DevHub, open_dev_hub

MIB = 1024 * 1024


def mem(pid: int) -> tuple[float, float]:
    """(RSS, USS) in MiB."""
    info = psutil.Process(pid).memory_full_info()
    return info.rss / MIB, info.uss / MIB


def sleeping_children(pid: int) -> int:
    """Task processes (sh or sleep) below the sidecar."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    n = 0
    for k in kids:
        try:
            if k.name() == "sleep":
                n += 1
        except psutil.NoSuchProcess:
            pass
    return n


async def poll(pred: object, timeout: float) -> None:  # noqa: ASYNC109
    """Wait for a process-table condition (no event to wait on); orders only, measures nothing."""
    assert callable(pred)
    with trio.fail_after(timeout):
        while not pred():  # noqa: ASYNC110
            await trio.sleep(0.1)


async def one_round(hub: DevHub, sc: Sidecar, n: int) -> tuple[float, float, float, float]:
    ids = [
        hub.submit(metadata={"shell_command": "sleep 600"}, routing_decision={"target_type": "sidecar"})
        for _ in range(n)
    ]
    await hub.wait_until(lambda: all(hub.task(t).status == "accepted" for t in ids), 60)
    await poll(lambda: sleeping_children(sc.pid) >= n, 60)
    busy = mem(sc.pid)
    for t in ids:
        hub.cancel(t)
    await poll(lambda: sleeping_children(sc.pid) == 0, 60)
    n_done = len(ids)

    def finished() -> bool:
        events = [e for e in sc.events("task_finished") if e.get("task_id") in set(ids)]
        return len(events) >= n_done

    await poll(finished, 60)
    await trio.sleep(1)  # let the hub's acks and the batcher settle before sampling
    after = mem(sc.pid)
    return busy + after


async def bench(args: argparse.Namespace) -> None:
    n = args.tasks
    with tempfile.TemporaryDirectory() as tmp:
        async with open_dev_hub(tokens={AGENT: TOKEN}, limits=None, concurrency=n) as hub:
            sc = Sidecar(Path(tmp) / "sc", hub.ws_url, capacity=n, **UNLIMITED)
            try:
                await sc.start()
                await hub.wait_until(lambda: hub.connected(AGENT), 30)
                await hub.wait_until(lambda: hub.resource_reports, 60)
                idle_rss, idle_uss = mem(sc.pid)
                print(f"`sidecar run`, {n} tasks per round, dev hub rate limits OFF, capacity = {n}")
                print(f"idle after identify        : RSS {idle_rss:6.1f} MiB  USS {idle_uss:6.1f} MiB")
                for r in range(1, args.rounds + 1):
                    b_rss, b_uss, a_rss, a_uss = await one_round(hub, sc, n)
                    print(
                        f"round {r}: {n} sleeping tasks : RSS {b_rss:6.1f} MiB  USS {b_uss:6.1f} MiB"
                        f"  (growth {b_rss - idle_rss:+.1f} MiB RSS,"
                        f" {(b_rss - idle_rss) * 1024 / n:.0f} KiB per task)"
                    )
                    print(f"round {r}: all finished       : RSS {a_rss:6.1f} MiB  USS {a_uss:6.1f} MiB")
                assert not hub.violations, hub.violations[:3]
                assert await sc.stop() == 0
            finally:
                await sc.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2)
    trio.run(bench, ap.parse_args())


if __name__ == "__main__":
    main()
