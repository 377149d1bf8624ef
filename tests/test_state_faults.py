"""Faults of the state directory, against the real `sidecar` process.

A state database that is not SQLite stops `sidecar run` with exit status 2 (the
systemd unit does not restart on 2) and one line saying what to do; `sidecar
check` reports the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from sidecar.devhub import DevHub, open_dev_hub

from .harness import AGENT, TOKEN


@pytest.fixture
async def hub() -> AsyncIterator[DevHub]:
    async with open_dev_hub(tokens={AGENT: TOKEN}) as h:
        yield h


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
