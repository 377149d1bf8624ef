"""System calls per task of the real `sidecar run` process: a work figure that host noise leaves alone.

    .venv/bin/python bench/syscalls.py [--tasks 3000] [--window 5] [--command true]

On a shared VM the same code's latency moves by 30-60 % from one minute to
the next, so a change of a few percent cannot be seen in milliseconds. What a
task costs in system calls, thread hand-offs (futex) and loop wake-ups
(epoll_wait) is nearly the same from run to run: this prints it.

Runs the same set-up as `latency.py` (dev hub in this process, limits off,
sequential tasks), attaches `strace -c` to every thread of the sidecar (not
to its children) for `--window` seconds while tasks run, and divides each
count by the number of `vfork` calls seen, one per task (`/bin/sh -c true`
runs `true` as a builtin). strace slows the process down; counts of things
that depend on timing (futex above all) are therefore indicative, the others
exact. Needs `strace` and permission to ptrace the sidecar (root, or
`kernel.yama.ptrace_scope=0`).
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import AGENT, TOKEN, UNLIMITED, Sidecar, default_state_parent, run_tasks

from sidecar.devhub import open_dev_hub

_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_strace_summary(text: str) -> dict[str, int]:
    """`strace -c` table → calls per system call name."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        m = _ROW.match(line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = int(m.group(1))
    return counts


async def measure(args: argparse.Namespace) -> dict[str, int]:
    strace = shutil.which("strace")
    if strace is None:
        raise SystemExit("bench/syscalls.py needs strace (apt-get install strace)")
    with tempfile.TemporaryDirectory(dir=args.state_dir) as tmp:
        out_path = Path(tmp) / "strace.txt"
        async with open_dev_hub(tokens={AGENT: TOKEN}, limits=None) as hub:
            sc = Sidecar(Path(tmp) / "sc", hub.ws_url, **UNLIMITED)
            try:
                await sc.start()
                await hub.wait_until(lambda: hub.connected(AGENT), 30)
                await run_tasks(hub, args.warmup, args.command)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_tasks, hub, args.tasks, args.command)
                    threads = [str(t.id) for t in psutil.Process(sc.pid).threads()]
                    argv = [strace, "-c", "-o", str(out_path)]
                    for tid in threads:
                        argv += ["-p", tid]
                    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL)
                    await trio.sleep(args.window)
                    proc.send_signal(signal.SIGINT)  # strace detaches and writes its summary
                    with trio.fail_after(30):
                        await proc.wait()
                    nursery.cancel_scope.cancel()
                assert await sc.stop() == 0
            finally:
                await sc.cleanup()
        return parse_strace_summary(out_path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=3000, help="tasks submitted (more than the window needs)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--window", type=float, default=5.0, help="seconds strace is attached")
    ap.add_argument("--command", default="true")
    ap.add_argument("--state-dir", default=None, help="parent of the state dir (default as latency.py)")
    args = ap.parse_args()
    if args.state_dir is None:
        args.state_dir = str(default_state_parent())
    counts = trio.run(measure, args)
    tasks = counts.get("vfork", 0)
    if not tasks:
        raise SystemExit(f"no vfork seen in {args.window} s: was strace attached? {counts}")
    total = sum(counts.values())
    print(f"sidecar process (all threads, not its children), {tasks} tasks of `{args.command}` under strace")
    print(f"{'all system calls':<18} {total / tasks:7.1f} per task")
    for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        if n / tasks >= 0.5:
            print(f"{name:<18} {n / tasks:7.1f}")


if __name__ == "__main__":
    main()
