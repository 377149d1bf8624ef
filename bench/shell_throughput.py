"""How fast the shell executor drains a child's stdout, against `cat > /dev/null`.

    .venv/bin/python bench/shell_throughput.py [--mib 1024] [--line 64]

The child prints MiB of lines (`yes <line> | head -c N`). Three figures:
- baseline: the same producer piped into `cat > /dev/null` (a C reader),
  and into `cat > file` in the log directory (what the disk allows);
- run_child: the process helper alone, callbacks that do nothing (batch mode);
- executor: the whole ShellExecutor (decode, log file, head/tail capture,
  progress events drained by a consumer task).
Each is wall-clock time over the whole run, child start to exit.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import trio

from sidecar.config import config_from_mapping
from sidecar.executors import ExecContext
from sidecar.executors.shell import ShellExecutor
from sidecar.messages import parse_task
from sidecar.procs import run_child
from sidecar.progress import ProgressSender, open_progress


def producer(total: int, line: int) -> str:
    text = "x" * (line - 1)
    return f"yes {text} | head -c {total}"


def bench_cat(total: int, line: int, target: str = "/dev/null") -> float:
    t0 = time.perf_counter()
    subprocess.run(["/bin/sh", "-c", f"{producer(total, line)} | cat > {target}"], check=True)
    return time.perf_counter() - t0


def bench_cat_file(total: int, line: int, where: str | None) -> float:
    with tempfile.TemporaryDirectory(dir=where) as tmp:
        return bench_cat(total, line, str(Path(tmp) / "out.log"))


async def bench_run_child(total: int, line: int) -> float:
    seen = 0

    async def sink(block: str) -> None:
        nonlocal seen
        seen += len(block)

    t0 = trio.current_time()
    res = await run_child(
        ["/bin/sh", "-c", producer(total, line)],
        cwd=Path("/"),
        env=dict(os.environ),
        marker="bench-run-child",
        on_stdout=sink,
        batch_lines=True,
    )
    elapsed = trio.current_time() - t0
    assert res.returncode == 0 and seen == total, (res, seen)
    return elapsed


async def bench_executor(total: int, line: int, state: Path) -> tuple[float, int]:
    cfg = config_from_mapping(
        {"agent_id": "bench", "token": "tok", "hub_url": "ws://127.0.0.1:1/ws", "state_dir": str(state)},
        base_dir=state,
    )
    await trio.Path(state).mkdir(parents=True, exist_ok=True)
    ctx = ExecContext(config=cfg, http=cast(Any, None), state_dir=state)
    metadata = {"shell_command": producer(total, line)}
    task = parse_task({"type": "task_assign", "task_id": "bench", "metadata": metadata})
    send, recv = open_progress()
    events = 0

    async def consume() -> None:
        nonlocal events
        async for _ in recv:
            events += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        t0 = trio.current_time()
        async with send:
            run = ctx.new_run(task, ProgressSender(send, "bench"), "bench-marker")
            outcome = await ShellExecutor(ctx)(run)
        elapsed = trio.current_time() - t0
    assert outcome.ok and outcome.output_truncated, outcome.error
    log_size = (await trio.Path(ctx.log_path("bench")).stat()).st_size
    assert log_size >= total, log_size
    return elapsed, events


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--line", type=int, default=64, help="bytes per line, newline included")
    ap.add_argument("--state-dir", default=None, help="where the task log goes (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure; the best is shown")
    args = ap.parse_args()
    total = args.mib * 1024 * 1024
    mib = args.mib

    cat_s = min(bench_cat(total, args.line) for _ in range(args.repeat))
    file_s = min(bench_cat_file(total, args.line, args.state_dir) for _ in range(args.repeat))
    rc_s = min(trio.run(bench_run_child, total, args.line) for _ in range(args.repeat))
    ex_runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=args.state_dir) as tmp:
            ex_runs.append(trio.run(bench_executor, total, args.line, Path(tmp) / "state"))
    ex_s, events = min(ex_runs)
    log_dir = args.state_dir or tempfile.gettempdir()

    print(f"{mib} MiB of {args.line}-byte lines")
    print(f"cat > /dev/null      : {cat_s:6.2f} s  {mib / cat_s:8.0f} MiB/s")
    print(f"cat > file (log dir) : {file_s:6.2f} s  {mib / file_s:8.0f} MiB/s  (the disk's own bound)")
    print(f"run_child (no-op cb) : {rc_s:6.2f} s  {mib / rc_s:8.0f} MiB/s  ratio {cat_s / rc_s:.2f}")
    print(
        f"ShellExecutor (full) : {ex_s:6.2f} s  {mib / ex_s:8.0f} MiB/s  ratio {cat_s / ex_s:.2f}"
        f"  ({events} progress events; full log written under {log_dir})"
    )


if __name__ == "__main__":
    main()
