"""How the state database fails: the errors the store raises, what they tell
an operator, and the record of whether its disk takes writes now.

Kept apart from `store` so that `sidecar check` can inspect a state database
read-only, with the same words `sidecar run` uses, without opening a store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import trio

from .log import get_logger

T = TypeVar("T")

log = get_logger("sidecar.store")

# Primary result codes (the low byte of `sqlite_errorcode`). READONLY: the file
# system was remounted read-only (ext4 does that after I/O errors).
CANNOT_WRITE = frozenset(
    {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY}
)
NOT_A_DB = frozenset({sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT})


class StoreError(Exception):
    """The state database cannot be opened; the message says what to do.

    `transient`: the disk refused (full, I/O error), so a later try may work.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class StoreCorruptError(StoreError):
    """The state database file is not (or no longer) SQLite: a restart cannot fix it."""

    def __init__(self, path: Path, detail: str) -> None:
        super().__init__(corrupt_message(path, detail))
        self.path = path


class StoreWriteError(Exception):
    """The disk refused a write (full, or an I/O error); nothing of that write is stored."""

    def __init__(self, path: Path, cause: sqlite3.Error) -> None:
        self.full = error_code(cause) == sqlite3.SQLITE_FULL
        self.problem = "state disk is full" if self.full else f"state store cannot write ({cause})"
        super().__init__(f"{self.problem}: {path}")


def corrupt_message(path: Path, detail: str) -> str:
    """What `sidecar run` and `sidecar check` say about an unusable state database."""
    return (
        f"state database {path} is not a usable SQLite database ({detail}). To start fresh, "
        f"move it aside (with its -wal, -shm and -intake files, if any): mv {path} {path}.broken; "
        "the tasks and unsent results it held are lost"
    )


def error_code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF


def inspect(path: Path) -> tuple[int, int]:
    """(tasks in flight, unsent results) of a state database, read-only (for `sidecar check`).

    Blocking. Raises `StoreCorruptError` when the file is not SQLite, `StoreError`
    when it cannot be read.
    """
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            held = results = 0
            if "tasks" in names:
                held = db.execute("SELECT count(*) FROM tasks WHERE state != 'done'").fetchone()[0]
            if "outbox" in names:
                results = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            return int(held), int(results)
        finally:
            db.close()
    except sqlite3.Error as exc:
        if error_code(exc) in NOT_A_DB:
            raise StoreCorruptError(path, str(exc)) from exc
        raise StoreError(
            f"cannot read the state database {path}: {exc}", transient=error_code(exc) in CANNOT_WRITE
        ) from exc


class WriteHealth:
    """Whether the store's disk takes writes, since when; logged once per change."""

    def __init__(self, path: Path, retry_s: float) -> None:
        self.path = path
        self.retry_s = retry_s
        # Why writes fail now (None while they succeed), and since when (trio time).
        self.error: str | None = None
        self.since: float | None = None
        self.writes_refused = 0
        self._failing = trio.Event()
        self._writable = trio.Event()

    def refused(self, exc: StoreWriteError) -> None:
        self.writes_refused += 1
        if self.error is not None:
            return
        self.error = exc.problem
        self.since = trio.current_time()
        self._failing.set()
        self._writable = trio.Event()
        log.error(
            "state_store_cannot_write",
            path=str(self.path),
            error=str(exc.__cause__ or exc),
            action=f"refusing new tasks; results go from memory; retrying every {self.retry_s:g} s",
        )

    def took_write(self) -> None:
        if self.error is None:
            return
        since = self.since
        self.error = self.since = None
        self._failing = trio.Event()
        self._writable.set()
        log.warning(
            "state_store_writable_again",
            path=str(self.path),
            after_s=None if since is None else round(trio.current_time() - since, 3),
        )

    async def wait_failing(self) -> None:
        await self._failing.wait()

    async def wait_writable(self) -> None:
        while self.error is not None:
            await self._writable.wait()


# The probe stores (and removes, in the same transaction) a row this large: room
# for a small result is what the outbox needs.
_PROBE_BYTES = 4096


def transaction(fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
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


def probe_write(db: sqlite3.Connection) -> None:
    """A write as large as a small result, undone in the same transaction."""
    cur = db.execute(
        "INSERT INTO outbox (task_id, generation, frame, created_at) VALUES ('', 0, ?, 0)",
        ("x" * _PROBE_BYTES,),
    )
    db.execute("DELETE FROM outbox WHERE id=?", (cur.lastrowid,))
