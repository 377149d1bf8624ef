"""The least worker that does a task's durable steps: a floor for `latency.py`, not a sidecar.

    .venv/bin/python bench/skeleton.py --config sidecar.toml     # launched by latency.py --skeleton

Same stack as the sidecar (trio, trio-websocket, SQLite in WAL mode with
synchronous=NORMAL in a worker thread, `Popen` with `start_new_session`,
a log file per task created in a worker thread while the child runs) and the
same frames on the wire, in the same order: identify; per task the task row
committed, `task_accepted`, the child run with both pipes drained and its exit
seen through a pidfd, the result committed, `task_complete`. Everything else
the sidecar does is left out on purpose: no rate budget, batcher, progress,
cancellation, time limits, group kill or marker sweep, no recovery, no log
lines, no validation of what the hub sends, no reconnect. Run against the dev
hub in the same run as the sidecar, it says what this stack costs on this
machine, so that the sidecar's figures can be read as a ratio to it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import trio
import trio_websocket


def _db(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("CREATE TABLE IF NOT EXISTS tasks (task_id TEXT PRIMARY KEY, frame TEXT, state TEXT)")
    db.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, task_id TEXT, frame TEXT)")
    return db


def _admit(db: sqlite3.Connection, task_id: str, text: str) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT OR REPLACE INTO tasks VALUES (?, ?, 'running')", (task_id, text))
    db.execute("COMMIT")


def _finish(db: sqlite3.Connection, task_id: str, text: str) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE tasks SET state='done' WHERE task_id=?", (task_id,))
    db.execute("INSERT INTO outbox (task_id, frame) VALUES (?, ?)", (task_id, text))
    db.execute("COMMIT")


def _spawn(command: str, cwd: Path, out_w: int, err_w: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["/bin/sh", "-c", command],
        stdin=subprocess.DEVNULL,
        stdout=out_w,
        stderr=err_w,
        cwd=cwd,
        start_new_session=True,
    )


async def _drain(fd: int, into: bytearray) -> None:
    async with trio.lowlevel.FdStream(fd) as stream:
        while chunk := await stream.receive_some(65536):
            into += chunk


async def _run(command: str, cwd: Path, log_path: Path) -> tuple[int, str]:
    out = bytearray()
    err = bytearray()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    opened: list[int] = []

    async def open_log() -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        opened.append(await trio.to_thread.run_sync(os.open, log_path, flags))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_log)  # created while the child runs, as the sidecar does
        proc = _spawn(command, cwd, out_w, err_w)  # on the loop: vfork, as the sidecar does
        os.close(out_w)
        os.close(err_w)
        nursery.start_soon(_drain, out_r, out)
        nursery.start_soon(_drain, err_r, err)
        pidfd = os.pidfd_open(proc.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
        code = proc.wait()
    fd = opened[0]
    os.write(fd, bytes(out) + bytes(err))
    os.close(fd)
    return code, out.decode(errors="replace")


async def serve(config: dict[str, Any]) -> None:
    state = Path(config["state_dir"])
    (state / "logs").mkdir(parents=True, exist_ok=True)
    db = _db(state / "skeleton.db")
    url = config["hub_url"]
    async with trio_websocket.open_websocket_url(url) as ws:

        async def send(frame: dict[str, Any]) -> None:
            await ws.send_message(json.dumps({**frame, "protocol_version": 1}, separators=(",", ":")))

        await send(
            {
                "type": "identify",
                "agent_id": config["agent_id"],
                "token": config["token"],
                "name": config["agent_id"],
                "status": "idle",
                "capabilities": [],
                "client_type": "sidecar",
            }
        )
        while True:
            frame = json.loads(await ws.get_message())
            if frame.get("type") != "task_assign":
                continue
            task_id, t0 = frame["task_id"], time.monotonic()
            await trio.to_thread.run_sync(_admit, db, task_id, json.dumps(frame))
            await send({"type": "task_accepted", "task_id": task_id})
            code, output = await _run(
                frame["metadata"]["shell_command"], state, state / "logs" / f"{task_id}.log"
            )
            result = {
                "status": "success" if code == 0 else "failed",
                "output": output,
                "model_used": "none",
                "tokens_in": 0,
                "tokens_out": 0,
                "estimated_cost_usd": 0.0,
                "equivalent_claude_cost_usd": None,
                "execution_ms": round((time.monotonic() - t0) * 1000),
                "exit_code": code,
            }
            done = {
                "type": "task_complete",
                "task_id": task_id,
                "generation": frame.get("generation", 0),
                "result": result,
                "tokens_used": 0,
            }
            await trio.to_thread.run_sync(_finish, db, task_id, json.dumps(done))
            await send(done)


async def run(config: dict[str, Any]) -> None:
    """`serve` until SIGTERM (exit status 0, as `sidecar run`)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, config)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, type=Path)
    args = ap.parse_args()
    trio.run(run, tomllib.loads(args.config.read_text()))


if __name__ == "__main__":
    main()
