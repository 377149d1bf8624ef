"""WAL checkpoints off the store's write path.

SQLite checkpoints a WAL by itself, inside the commit that crosses 1,000
pages: that commit then copies the WAL into the database and, with
`synchronous=NORMAL`, fsyncs both, 5-9 ms measured here, every ~250 tasks.
The task whose write it was waited for it. While `Store.watch` runs, the
store's own connection checkpoints never (`wal_autocheckpoint=0`) and this
does, on a connection of its own in a worker thread: a PASSIVE checkpoint
copies what no reader still needs and never blocks the writer, so the store
thread goes on committing meanwhile.

It runs once `MIN_WRITES` commits have accumulated, at most every
`INTERVAL_S`: the WAL then reaches the disk about as often as SQLite's own
rhythm had it at full load (the power-cut window of docs/benchmarks.md,
"Durability", is unchanged), and an idle daemon does no checkpoint at all.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import trio

from .log import get_logger

log = get_logger("sidecar.store")

INTERVAL_S = 1.0
MIN_WRITES = 50


class Checkpointer:
    """Checkpoints the WAL of the database at `path` in the background (see the module doc)."""

    def __init__(self, path: Path, *, interval_s: float = INTERVAL_S, min_writes: int = MIN_WRITES) -> None:
        self.path = path
        self.interval_s = interval_s
        self.min_writes = min_writes
        self.checkpoints = 0
        self.checkpointed = trio.Event()  # set by each checkpoint, then renewed
        self._writes = 0
        self._due = trio.Event()
        self._db: sqlite3.Connection | None = None

    def wrote(self) -> None:
        """The store committed a transaction."""
        self._writes += 1
        if self._writes >= self.min_writes:
            self._due.set()

    async def run(self) -> None:
        """Checkpoint whenever enough was written, until cancelled."""
        try:
            while True:
                await self._due.wait()
                self._due = trio.Event()
                self._writes = 0
                await self.checkpoint()
                await trio.sleep(self.interval_s)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close)

    async def checkpoint(self) -> None:
        """One PASSIVE checkpoint; a failure (disk full, I/O error) is logged, the next one may work."""
        try:
            await trio.to_thread.run_sync(self._checkpoint)
        except sqlite3.Error as exc:
            log.warning("state_checkpoint_failed", path=str(self.path), error=str(exc))
            return
        self.checkpoints += 1
        self.checkpointed.set()
        self.checkpointed = trio.Event()

    def _checkpoint(self) -> None:
        if self._db is None:
            # Its own connection, used from whichever worker thread runs this.
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout=1000")
        self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()
