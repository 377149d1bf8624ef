"""The durable store: one SQLite file (WAL) in the state directory.

A task row is written before `task_accepted` is sent; a result is written to
the outbox (in the same transaction that marks the task finished) before it is
sent, and deleted only when the hub acknowledges it. On start-up the store
tells what was in flight when the process last died.

SQLite is blocking, so every call runs in `trio.to_thread.run_sync` on one
connection, serialised by a trio lock.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

T = TypeVar("T")

# Task states. `queued`: stored and accepted, waiting for a slot; `running`: its
# executor started; `done`: terminal result written to the outbox (or dropped).
QUEUED, RUNNING, DONE = "queued", "running", "done"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    task_id     TEXT PRIMARY KEY,
    generation  INTEGER NOT NULL,
    frame       TEXT NOT NULL,
    state       TEXT NOT NULL,
    marker      TEXT NOT NULL,
    received_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    frame       TEXT NOT NULL,
    created_at  REAL NOT NULL
);
"""

# Finished task rows are kept a while so a duplicate task_assign of a finished
# task is recognised instead of run twice.
_KEEP_DONE_S = 24 * 3600


@attrs.frozen
class StoredTask:
    task_id: str
    generation: int
    frame: dict[str, Any]
    state: str
    marker: str


@attrs.frozen
class OutboxItem:
    id: int
    task_id: str
    generation: int
    frame: dict[str, Any]


class Store:
    """Async facade over the SQLite file. Open with `await Store.open(path)`."""

    def __init__(self, db: sqlite3.Connection, path: Path) -> None:
        self._db = db
        self._lock = trio.Lock()
        self.path = path

    @classmethod
    async def open(cls, path: Path, *, durable: bool = True) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)

        def _open() -> sqlite3.Connection:
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss too, not only a kill -9.
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            db.executescript(_SCHEMA)
            return db

        db = await trio.to_thread.run_sync(_open)
        return cls(db, path)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            # Shielded: a cancelled caller must not leave a half-done transaction.
            with trio.CancelScope(shield=True):
                result = await trio.to_thread.run_sync(fn, self._db)
        return result

    async def close(self) -> None:
        await self._run(lambda db: db.close())

    # -- tasks -------------------------------------------------------------

    async def get_task(self, task_id: str) -> StoredTask | None:
        def _get(db: sqlite3.Connection) -> StoredTask | None:
            row = db.execute(
                "SELECT task_id, generation, frame, state, marker FROM tasks WHERE task_id=?", (task_id,)
            ).fetchone()
            return _task(row) if row else None

        return await self._run(_get)

    async def put_task(self, task_id: str, generation: int, frame: dict[str, Any], marker: str) -> int:
        """Store a newly accepted task (replacing a finished or older-generation row).

        Unsent results of older generations of it go in the same transaction
        (the hub would refuse them as stale); returns how many. One thread hop,
        so the caller has no checkpoint between storing and holding the task.
        """
        text = json.dumps(frame)

        def _put(db: sqlite3.Connection) -> int:
            db.execute(
                "INSERT OR REPLACE INTO tasks (task_id, generation, frame, state, marker, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (task_id, generation, text, QUEUED, marker, time.time()),
            )
            return _drop_older(db, task_id, generation)

        return await self._run(_transaction(_put))

    async def set_generation(self, task_id: str, generation: int) -> int:
        """The task now runs as `generation`; older unsent results go (see `put_task`)."""

        def _set(db: sqlite3.Connection) -> int:
            db.execute("UPDATE tasks SET generation=? WHERE task_id=?", (generation, task_id))
            return _drop_older(db, task_id, generation)

        return await self._run(_transaction(_set))

    async def mark_running(self, task_id: str) -> None:
        await self._run(lambda db: db.execute("UPDATE tasks SET state=? WHERE task_id=?", (RUNNING, task_id)))

    async def finish(self, task_id: str, frame: dict[str, Any] | None) -> None:
        """Mark a task done and, in the same transaction, queue its result frame."""

        def _finish(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE tasks SET state=?, finished_at=? WHERE task_id=?", (DONE, time.time(), task_id)
            )
            if frame is not None:
                db.execute(
                    "INSERT INTO outbox (task_id, generation, frame, created_at) VALUES (?, ?, ?, ?)",
                    (task_id, int(frame.get("generation", 0)), json.dumps(frame), time.time()),
                )

        await self._run(_transaction(_finish))

    async def in_flight(self) -> list[StoredTask]:
        """Tasks accepted but not finished: what a restart must recover."""

        def _list(db: sqlite3.Connection) -> list[StoredTask]:
            rows = db.execute(
                "SELECT task_id, generation, frame, state, marker FROM tasks WHERE state != ?"
                " ORDER BY received_at",
                (DONE,),
            ).fetchall()
            return [_task(r) for r in rows]

        return await self._run(_list)

    async def prune(self) -> int:
        """Forget finished tasks older than a day whose results are acknowledged."""

        def _prune(db: sqlite3.Connection) -> int:
            cur = db.execute(
                "DELETE FROM tasks WHERE state=? AND finished_at < ?"
                " AND task_id NOT IN (SELECT task_id FROM outbox)",
                (DONE, time.time() - _KEEP_DONE_S),
            )
            return cur.rowcount

        return await self._run(_prune)

    # -- outbox ------------------------------------------------------------

    async def outbox(self) -> list[OutboxItem]:
        def _list(db: sqlite3.Connection) -> list[OutboxItem]:
            rows = db.execute("SELECT id, task_id, generation, frame FROM outbox ORDER BY id").fetchall()
            return [OutboxItem(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

        return await self._run(_list)

    async def retire(self, item_id: int) -> None:
        await self._run(lambda db: db.execute("DELETE FROM outbox WHERE id=?", (item_id,)))

    async def drop_results(self, task_id: str) -> None:
        """Forget unsent results of a task the hub took away (reassigned)."""
        await self._run(lambda db: db.execute("DELETE FROM outbox WHERE task_id=?", (task_id,)))


def _transaction(fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """`fn` as one transaction: all its statements commit together, or none does.

    The connection is in autocommit mode (`isolation_level=None`), so without
    an explicit BEGIN each statement would commit on its own.
    """

    def run(db: sqlite3.Connection) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            result = fn(db)
            db.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (after SQLITE_FULL, for one).
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return result

    return run


def _drop_older(db: sqlite3.Connection, task_id: str, generation: int) -> int:
    """Unsent results of generations below `generation`: the hub, which has
    given the task out again, would refuse them as stale."""
    cur = db.execute("DELETE FROM outbox WHERE task_id=? AND generation<?", (task_id, generation))
    return cur.rowcount


def _task(row: tuple[Any, ...]) -> StoredTask:
    return StoredTask(row[0], row[1], json.loads(row[2]), row[3], row[4])
