"""Faults of the state directory, against the real `sidecar` process.

A full state disk: the daemon survives, the task log is cut short and says so,
the task still gets its terminal frame, new tasks are refused with a reason
while the store cannot write, /healthz reports it, and all of it recovers by
itself once space returns. A state database that is not SQLite stops `sidecar
run` with exit status 2 (the systemd unit does not restart on 2) and one line
saying what to do; `sidecar check` reports the same.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sidecar.app import open_sidecar
from sidecar.devhub import DevHub
from sidecar.output import OutputCapture
from sidecar.store import Store

from .harness import AGENT, TOKEN, SidecarProcess

SHELL = {"target_type": "sidecar"}


def _write_config(root: Path, hub_url: str) -> Path:
    path = root / "sidecar.toml"
    path.write_text(
        f'agent_id = "{AGENT}"\ntoken = "{TOKEN}"\nhub_url = "{hub_url}"\nstate_dir = "{root / "state"}"\n'
    )
    return path


async def _sidecar(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "sidecar", *args],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )


def _corrupt_db(root: Path) -> Path:
    db = root / "state" / "sidecar.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not an SQLite file\n" * 200)
    return db


async def test_run_with_a_corrupt_state_db_exits_2_with_one_clear_line(tmp_path: Path) -> None:
    db = _corrupt_db(tmp_path)
    config = _write_config(tmp_path, "ws://127.0.0.1:1/ws")
    proc = await _sidecar("--log-format", "json", "run", "--config", str(config))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert str(db) in line and "not a usable SQLite database" in line
    assert "move it aside" in line and "lost" in line
    assert "Traceback" not in proc.stderr.decode() and proc.stdout == b""


async def test_check_reports_a_corrupt_state_db_and_passes_once_it_is_moved_aside(
    tmp_path: Path, hub: DevHub
) -> None:
    db = _corrupt_db(tmp_path)
    config = _write_config(tmp_path, hub.ws_url)
    proc = await _sidecar("check", "--config", str(config), "--no-identify")
    out = proc.stdout.decode()
    assert proc.returncode == 1, out
    row = next(line for line in out.splitlines() if line.startswith("state db"))
    assert "FAIL" in row and str(db) in row and "move it aside" in row and "lost" in row
    assert "not ready: state db" in out

    db.rename(db.with_name("sidecar.db.broken"))
    proc = await _sidecar("check", "--config", str(config), "--no-identify")
    out = proc.stdout.decode()
    assert proc.returncode == 0, out
    row = next(line for line in out.splitlines() if line.startswith("state db"))
    assert " ok " in row and "created on first run" in row


# -- a full state disk -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MB file system (tmpfs), unmounted afterwards. Needs root."""
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a 3 MB tmpfs (run the suite as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, check=False
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_task_log_is_cut_short_on_a_full_disk(small_disk: Path) -> None:
    path = small_disk / "logs" / "t.log"
    block = ("0123456789" * 10 + "\n").encode()
    with OutputCapture(4096, path) as out:
        for _ in range(40_000):  # 4 MB into 3 MB
            out.write(block.decode())
    assert out.log_error == "No space left on device"
    assert out.total_bytes == 40_000 * len(block)  # the capture itself went on
    assert out.text().endswith("0123456789\n")
    tail = path.read_bytes()[-300:].decode()
    assert "=== log cut short: No space left on device; the rest of the output is not logged" in tail


def test_task_log_on_a_device_that_refuses_every_write() -> None:
    with OutputCapture(64, Path("/dev/full")) as out:
        out.write("x" * 300_000)  # over the buffer: a write is attempted and refused
        out.write("after\n")
    assert out.log_error == "No space left on device" and out.text().endswith("after\n")


async def _wait_for(pred: Any, timeout: float = 60) -> Any:  # noqa: ASYNC109
    """Wait for a condition in the sidecar's log file (which offers no event to wait on).

    Re-checked on a short period: this only orders the test, it measures nothing.
    """
    with trio.fail_after(timeout):
        while not (value := pred()):  # noqa: ASYNC110
            await trio.sleep(0.05)
    return value


def _failed_reasons(hub: DevHub, tid: str) -> list[Any]:
    return [f.get("reason") for f in hub.task(tid).failures]


async def test_full_state_disk_the_daemon_survives_refuses_and_recovers(
    tmp_path: Path, hub: DevHub, small_disk: Path
) -> None:
    sc = SidecarProcess(tmp_path / "sc", hub.ws_url, state_dir=str(small_disk), metrics_listen="127.0.0.1:0")
    try:
        await sc.start()
        await hub.wait_until(lambda: hub.connected(AGENT), timeout=30)
        url = (await _wait_for(lambda: sc.events("metrics_listening")))[0]["url"]

        # 27 MB of output into a 3 MB state disk: the task log fills it.
        line = "0123456789" * 7
        big = hub.submit(
            metadata={"shell_command": f"yes {line} | head -c 27000000; echo END-OF-OUTPUT"},
            routing_decision=SHELL,
        )
        rec = await hub.wait_until(lambda: hub.task(big) if hub.task(big).status == "completed" else None, 60)
        assert rec.result is not None and rec.result["output"].endswith("END-OF-OUTPUT\n")
        assert rec.result["output_truncated"] is True
        log_file = small_disk / "logs" / f"{big}.log"
        assert "=== log cut short: No space left on device" in log_file.read_bytes()[-400:].decode()
        assert sc.events("task_log_cut_short")
        # The store could not write the result: it went from memory, and the log says so.
        (unstored,) = sc.events("result_not_stored")
        assert unstored["task_id"] == big and "state disk is full" in unstored["error"]
        assert sc.events("state_store_cannot_write")

        # While the store cannot write, a new task is refused at once, with the reason.
        refused = hub.submit(metadata={"shell_command": "echo hi"}, routing_decision=SHELL, max_retries=1)
        await hub.wait_until(lambda: hub.task(refused).status == "dead_letter", 30)
        (failure,) = hub.task(refused).failures
        assert failure["reason"] == "state_disk_full" and "state disk is full" in failure["error"]
        assert "task_accepted" not in [h[0] for h in hub.task(refused).history]

        async with httpx.AsyncClient(timeout=10) as http:
            resp = await http.get(f"{url}/healthz")
            doc = resp.json()
            assert resp.status_code == 503 and doc["status"] == "state_store_unwritable"
            assert doc["state_writable"] is False and doc["state_error"] == "state disk is full"
            metrics = (await http.get(f"{url}/metrics")).text
            assert "sidecar_state_writable 0.0" in metrics

            # Space returns (the operator removes the big log): the sidecar recovers by itself.
            log_file.unlink()
            await _wait_for(lambda: sc.events("state_store_writable_again"), 30)
            resp = await http.get(f"{url}/healthz")
            assert resp.status_code == 200 and resp.json()["state_writable"] is True

        after = hub.submit(metadata={"shell_command": "echo back"}, routing_decision=SHELL)
        rec = await hub.wait_until(
            lambda: hub.task(after) if hub.task(after).status == "completed" else None, 30
        )
        assert rec.result is not None and rec.result["output"] == "back\n"
        assert sc.proc is not None and sc.proc.returncode is None  # it never died
        assert await sc.stop(signal.SIGTERM) == 0
        assert "Traceback" not in sc.log_text()
        assert [(v.kind, v.detail) for v in hub.violations] == []
    finally:
        await sc.cleanup()


async def test_start_on_a_full_state_disk_waits_for_space_and_still_stops_on_sigterm(
    tmp_path: Path, hub: DevHub, small_disk: Path
) -> None:
    # A sound database, closed cleanly (so SQLite must create its -shm file to open
    # it), on a disk then filled to the last block.
    store = await Store.open(small_disk / "sidecar.db")
    await store.close()
    ballast = small_disk / "ballast"
    with ballast.open("wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:
            pass
    sc = SidecarProcess(tmp_path / "sc", hub.ws_url, state_dir=str(small_disk))
    try:
        await sc.start()
        await _wait_for(lambda: sc.events("state_store_cannot_open"))
        assert not hub.connected(AGENT)
        assert await sc.stop(signal.SIGTERM, timeout=10) == 0  # waiting does not deafen it

        await sc.start()  # as the service manager would
        await _wait_for(lambda: len(sc.events("state_store_cannot_open")) == 2)
        assert sc.proc is not None and sc.proc.returncode is None
        ballast.unlink()  # space returns
        await hub.wait_until(lambda: hub.connected(AGENT), timeout=30)
        assert sc.events("state_store_opened")
        tid = hub.submit(metadata={"shell_command": "echo ok"}, routing_decision=SHELL)
        await hub.wait_until(lambda: hub.task(tid).status == "completed", 30)
        assert await sc.stop(signal.SIGTERM) == 0
        assert "Traceback" not in sc.log_text()
    finally:
        await sc.cleanup()


async def test_in_process_a_store_that_refuses_writes_sends_results_from_memory(
    make_config: Any, tmp_path: Path, hub: DevHub
) -> None:
    """No root needed: SQLite's `query_only` refuses every write, as a read-only remount does."""
    started, go = tmp_path / "started", tmp_path / "go"
    cfg = make_config(hub_url=hub.ws_url, token=TOKEN)
    async with open_sidecar(cfg) as sc:
        await hub.wait_until(lambda: hub.connected(AGENT), timeout=30)
        waiting = hub.submit(
            metadata={
                "shell_command": f"touch {started}; while [ ! -e {go} ]; do sleep 0.02; done; echo finished"
            },
            routing_decision=SHELL,
        )
        await _wait_for(started.exists)
        await sc.store.sync()  # the task's row is in the file, not only in the intake journal
        sc.store._db.execute("PRAGMA query_only=1")  # the store's own connection

        go.touch()
        rec = await hub.wait_until(
            lambda: hub.task(waiting) if hub.task(waiting).status == "completed" else None, 30
        )
        assert rec.result is not None and rec.result["output"] == "finished\n"
        await hub.wait_until(lambda: not sc.outbox.unstored, 30)  # acked, so forgotten
        other = sqlite3.connect(sc.store.path)
        assert other.execute("SELECT state FROM tasks WHERE task_id=?", (waiting,)).fetchone() == ("running",)

        # The result may have gone through the intake journal (the file system took it);
        # the store hears SQLite refuse when it applies it, within JOURNAL_APPLY_S.
        with trio.fail_after(10):
            await sc.store.health.wait_failing()
        refused = hub.submit(metadata={"shell_command": "echo hi"}, routing_decision=SHELL, max_retries=1)
        await hub.wait_until(lambda: hub.task(refused).status == "dead_letter", 30)
        assert _failed_reasons(hub, refused) == ["state_store_error"]
        status, doc = sc.metrics.health()
        assert status == 503 and doc["status"] == "state_store_unwritable" and not doc["state_writable"]

        sc.store._db.execute("PRAGMA query_only=0")  # writes work again: watch() notices
        with trio.fail_after(10):
            await sc.store.wait_writable()
        assert sc.metrics.health()[0] == 200
        # What was owed while it could not write (the task's done-mark) is on disk now.
        assert other.execute("SELECT state FROM tasks WHERE task_id=?", (waiting,)).fetchone() == ("done",)
        other.close()
        again = hub.submit(metadata={"shell_command": "echo again"}, routing_decision=SHELL)
        await hub.wait_until(lambda: hub.task(again).status == "completed", 30)
    assert [(v.kind, v.detail) for v in hub.violations] == []
