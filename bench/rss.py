"""Memory of the real `sidecar run` process: idle, with 100 sleeping tasks,
and under sustained sequential work.

    .venv/bin/python bench/rss.py [--tasks 100] [--rounds 2]
    .venv/bin/python bench/rss.py --output-bytes 68000 --tasks 10000 --sample-every 1000

A dev hub runs in this process with rate limits OFF (100 `task_accepted` at
once would exceed the real hub's normal-tier bucket of 60; limits are not what
this measures) and `concurrency=N`; the sidecar runs with `capacity = N`.

Figures (the sidecar process alone, children not included):
- idle: RSS and USS after identify, once the first resource report is in;
- busy: with N `sleep 600` shell tasks running at once (all N children seen);
- after: once every task was cancelled by the hub and has finished.
`--rounds` repeats busy/after to show whether memory keeps growing.

Sustained mode (`--output-bytes N`): `--tasks` sequential shell tasks, each
printing N bytes of 72-byte lines to stdout (`yes … | head -c N`), the next one
submitted once the previous one's `task_complete` is in. The sidecar's RSS,
USS and anonymous RSS are printed before the first task and every
`--sample-every` tasks. The hub forgets its frame records and finished tasks
at every sample (`DevHub.trim_history`), so this process stays small too.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import psutil
import trio
from latency import AGENT, TOKEN, UNLIMITED, Sidecar, cpu_s

from sidecar.devhub import DevHub, open_dev_hub
from sidecar.devhub.state import FINISHED

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


LINE = "sidecar rss bench: 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRS"[:71]


def rss_anon(pid: int) -> float:
    """RssAnon (MiB): heap and anonymous mappings, without mapped files or shared memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def sample_line(label: str, pid: int, rate: float | None = None) -> str:
    rss, uss = mem(pid)
    line = f"{label:<14}: RSS {rss:6.1f} MiB  USS {uss:6.1f} MiB  anon {rss_anon(pid):6.1f} MiB"
    if rate is not None:
        line += f"  ({rate:.1f} tasks/s)"
    return line


async def sustained(args: argparse.Namespace) -> None:
    command = f"yes '{LINE}' | head -c {args.output_bytes}"
    with tempfile.TemporaryDirectory() as tmp:
        async with open_dev_hub(tokens={AGENT: TOKEN}, limits=None) as hub:
            # Limits OFF at the hub, so the sidecar's model of its bucket is unbounded too.
            sc = Sidecar(Path(tmp) / "sc", hub.ws_url, **UNLIMITED)
            try:
                await sc.start()
                await hub.wait_until(lambda: hub.connected(AGENT), 30)
                await hub.wait_until(lambda: hub.resource_reports, 60)
                print(
                    f"`sidecar run`, {args.tasks} sequential shell tasks printing {args.output_bytes} bytes"
                    f" each, dev hub rate limits OFF, capacity = 1"
                )
                print(sample_line("idle, 0 tasks", sc.pid), flush=True)
                t0, cpu0 = trio.current_time(), cpu_s(sc.pid)
                for i in range(1, args.tasks + 1):
                    tid = hub.submit(
                        metadata={"shell_command": command}, routing_decision={"target_type": "sidecar"}
                    )
                    await hub.wait_until(lambda tid=tid: hub.task(tid).status in FINISHED, 60)  # type: ignore[misc]
                    rec = hub.task(tid)
                    assert rec.status == "completed", (tid, rec.status, rec.last_error)
                    out = (rec.result or {}).get("output", "")
                    assert len(out) == args.output_bytes, (tid, len(out))
                    if i % args.sample_every == 0 or i == args.tasks:
                        hub.trim_history()
                        rate = i / (trio.current_time() - t0)
                        print(sample_line(f"{i:>6} tasks", sc.pid, rate), flush=True)
                print(f"sidecar CPU per task: {(cpu_s(sc.pid) - cpu0) * 1000 / args.tasks:.2f} ms")
                assert not hub.violations, hub.violations[:3]
                assert await sc.stop() == 0
            finally:
                await sc.cleanup()


async def bench(args: argparse.Namespace) -> None:
    if args.output_bytes is not None:
        await sustained(args)
        return
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
    ap.add_argument(
        "--output-bytes", type=int, default=None, help="sustained mode: sequential tasks printing this much"
    )
    ap.add_argument("--sample-every", type=int, default=1000, help="sustained mode: tasks between samples")
    trio.run(bench, ap.parse_args())


if __name__ == "__main__":
    main()
