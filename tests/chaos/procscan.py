"""The process table and the state directory, as the chaos checks read them."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from sidecar import store as store_module
from sidecar.journal import journal_path
from sidecar.procs import MARKER_VAR


def marked_processes(prefix: str) -> dict[int, str]:
    """Live (non-zombie) processes whose task marker starts with `prefix`: pid → marker."""
    found: dict[int, str] = {}
    needle = (MARKER_VAR + "=").encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # State is the field after the parenthesised command name.
        if stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X"):
            continue
        for item in env.split(b"\0"):
            if item.startswith(needle):
                marker = item[len(needle) :].decode(errors="replace")
                if marker.startswith(prefix):
                    found[int(entry.name)] = marker
    return found


def describe(pid: int) -> dict[str, object]:
    """What the check knows of one live process, for a violation report."""
    info: dict[str, object] = {"pid": pid}
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        rest = stat[stat.rfind(b")") + 2 :].split()
        info.update(state=rest[0].decode(), ppid=int(rest[1]), pgid=int(rest[2]), sid=int(rest[3]))
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        info["age_s"] = round(uptime - int(rest[19]) / ticks, 2)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            info["cmd"] = f.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    except (OSError, IndexError, ValueError):
        info["gone"] = True
    return info


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def read_state(state_dir: Path) -> tuple[list[tuple[str, int, str]], list[tuple[str, int, str]]]:
    """(tasks not done: (task_id, generation, state), outbox: (task_id, generation, frame type)).

    What the next start will see: the database with the intake journal's
    unapplied records applied, by the store's own replay, on a copy (the
    sidecar's files are left as they are).
    """
    db_path = state_dir / "sidecar.db"
    if not db_path.exists():
        return [], []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / db_path.name
        for path in (db_path, db_path.with_name(db_path.name + "-wal"), journal_path(db_path)):
            if path.exists():
                shutil.copyfile(path, Path(tmp) / path.name)
        db = sqlite3.connect(str(copy), isolation_level=None)
        try:
            db.executescript(store_module._SCHEMA)
            store_module._replay(db, journal_path(copy))
            tasks = [
                (str(r[0]), int(r[1]), str(r[2]))
                for r in db.execute("SELECT task_id, generation, state FROM tasks WHERE state != 'done'")
            ]
            outbox = [
                (str(r[0]), int(r[1]), str(json.loads(r[2]).get("type")))
                for r in db.execute("SELECT task_id, generation, frame FROM outbox ORDER BY id")
            ]
        finally:
            db.close()
    return tasks, outbox
