"""The durable store: one SQLite file (WAL) in the state directory.

A task row is written before `task_accepted` is sent; a result is written to
the outbox (in the same transaction that marks the task finished) before it is
sent, and deleted only when the hub acknowledges it. On start-up the store
tells what was in flight when the process last died.

SQLite is blocking, so every call runs in the store's own thread
(`storethread.StoreThread`) on one connection, serialised by a trio lock. Every write is one transaction.
The outbox is mirrored in memory (`pending.PendingResults`), so reading it costs
no thread hop. The two writes on a task's path (`admit` of a task id not seen
before, `finish`) cost no hop either: each is a record appended to the intake
journal (`journal`) from the event loop, durable as a commit is, and applied
to SQLite `JOURNAL_APPLY_S` later (or in the next write, or before a read of
tasks), the record's sequence number committed with it; `open` replays what
a dead process left unapplied. While writes fail, or if the journal cannot be
written, they go to SQLite directly as before.

When the disk refuses a write (full, or an I/O error), the writes that must
happen (`put_task`, `finish`) raise `StoreWriteError` and nothing of them is
written: the caller refuses the task or sends the result from memory. The
bookkeeping writes (`set_generation`, `mark_running`, `mark_done`,
`drop_results`) are owed instead: kept in memory, applied first in the next
write that succeeds, and already reflected by `outbox()`. While writes fail,
`watch()` probes every `PROBE_INTERVAL_S`, so the store recovers by itself
once space returns. `write_error` says why writes fail (None while they work).

`retire` (a result the hub answered) is owed on purpose, not tried at once:
it rides in the next task's write, or `watch()` applies it `DEFER_S` later.
Lost to a kill -9 in between, it costs one resend after the restart, which
the hub answers as it answers any repeated result (an ack, or a stale refusal
that retires it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

from .journal import Journal, journal_path, read_records
from .log import get_logger
from .messages import LONE_SURROGATE, MAX_GENERATION, is_unicode
from .pending import OutboxItem, PendingResults
from .quicklock import QuickLock
from .storefaults import (
    CANNOT_WRITE,
    NOT_A_DB,
    StoreCorruptError,
    StoreError,
    StoreWriteError,
    WriteHealth,
    error_code,
    probe_write,
    transaction,
)
from .storethread import StoreThread
from .walcheckpoint import Checkpointer

log = get_logger("sidecar.store")

T = TypeVar("T")
Write = Callable[[sqlite3.Connection], Any]

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
-- Every admission deletes older generations' unsent results of its task, and a
-- reassign drops a task's results: by task_id. With a backlog of 5,000 results
-- that scan cost 4.2 ms a transaction; by the index, 10 us.
CREATE INDEX IF NOT EXISTS outbox_task ON outbox (task_id);
-- `journal_applied`: the last intake journal record this file has (see `journal`).
CREATE TABLE IF NOT EXISTS meta (
    key         TEXT PRIMARY KEY,
    value       INTEGER NOT NULL
);
"""

# Finished task rows are kept a while so a duplicate task_assign of a finished
# task is recognised instead of run twice.
_KEEP_DONE_S = 24 * 3600

# While writes fail, how often `watch()` tries one.
PROBE_INTERVAL_S = 1.0
# How long an owed-on-purpose write (`retire`) waits for another write to ride in.
DEFER_S = 0.25
# How soon a journaled write reaches SQLite (if no other write takes it first):
# a burst of tasks costs one transaction per this long, off their path.
JOURNAL_APPLY_S = 0.05
# Finished task rows older than _KEEP_DONE_S go: first a minute after start, then hourly.
PRUNE_FIRST_S = 60.0
PRUNE_INTERVAL_S = 3600.0
_PRUNE_BATCH = 1000

__all__ = ["DONE", "QUEUED", "RUNNING", "OutboxItem", "Store", "StoredTask"]


@attrs.frozen
class _Opened:
    """What `Store.open` read, besides the connection."""

    pending: list[tuple[int, str, int]]
    task_ids: set[str]
    next_outbox_id: int
    replayed: int
    torn_bytes: int
    skipped: list[tuple[str, Any]]  # (problem, task id) of each record the replay skipped
    # The journal, open for appending (made in the store's thread: a create can
    # wait on the disk), or why there is none in this run.
    journal: Journal | None
    journal_error: str | None


@attrs.frozen
class _Journaled:
    """An owed write that an intake journal record made durable: applied with its sequence number.

    A record SQLite cannot take (`_apply_journal_record`) is skipped, and why is
    kept in `skipped` for the loop to log: one bad record must not block every
    write after it.
    """

    seq: int
    record: dict[str, Any]
    skipped: list[str] = attrs.field(factory=list)

    def __call__(self, db: sqlite3.Connection) -> None:
        problem = _apply_journal_record(db, self.record)
        if problem is not None:
            self.skipped.append(problem)
        _set_journal_applied(db, self.seq)


@attrs.frozen
class StoredTask:
    task_id: str
    generation: int
    frame: dict[str, Any]
    state: str
    marker: str


class Store:
    """Async facade over the SQLite file. Open with `await Store.open(path)`."""

    def __init__(self, db: sqlite3.Connection, path: Path, opened: _Opened) -> None:
        self._db = db
        self._lock = QuickLock()  # a call reaches the store thread without a scheduler round first
        self._thread = StoreThread()
        self.path = path
        self.health = WriteHealth(path, PROBE_INTERVAL_S)
        # Bookkeeping writes the disk refused (or `retire` deferred), applied first
        # in the next write that succeeds.
        self._owed: list[Write] = []
        self._deferred = trio.Event()
        self._last_write_at = self._deferred_at = -math.inf
        self.pending = PendingResults()
        self.pending.load(opened.pending)
        self.checkpointer = Checkpointer(path)
        # Every task id with a row (or a journaled one): an id not in it is new, so
        # its admission needs no look at the file. Pruned ids leave it.
        self._task_ids = opened.task_ids
        # Outbox ids are given here (not by SQLite), so that a journaled result has its id at once.
        self._next_outbox_id = opened.next_outbox_id
        self.journal = opened.journal
        if opened.journal_error is not None:
            log.warning(
                "journal_unavailable",
                path=str(journal_path(path)),
                error=opened.journal_error,
                action="every write goes to the database directly (one thread hop each)",
            )
        self._journal_owed = trio.Event()

    @classmethod
    async def open(cls, path: Path, *, durable: bool = True) -> Store:
        """Open (or create) the database; `StoreCorruptError` if the file is not SQLite."""
        path.parent.mkdir(parents=True, exist_ok=True)

        def _open() -> tuple[sqlite3.Connection, _Opened]:
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # WAL with NORMAL: a commit is in the WAL file (the OS has it) when
                # it returns, so it survives the process's death (kill -9, OOM); it
                # reaches the platter at the next checkpoint, so a power cut may lose
                # the last commits (docs/benchmarks.md, "Durability"). OFF only for
                # tests and benches that ask for `durable=False`.
                db.execute(f"PRAGMA synchronous={'NORMAL' if durable else 'OFF'}")
                db.executescript(_SCHEMA)
                # Memory bound: a page cache of at most 2000 KiB, no file pages mapped
                # (SQLite's usual defaults, stated here: docs/benchmarks.md, "Memory").
                db.execute("PRAGMA cache_size=-2000")
                db.execute("PRAGMA mmap_size=0")
                replayed, torn, seq, emptied, skipped = _replay(db, journal_path(path))
                rows = db.execute("SELECT id, task_id, generation FROM outbox ORDER BY id").fetchall()
                task_ids = {r[0] for r in db.execute("SELECT task_id FROM tasks")}
                (top,) = db.execute(
                    "SELECT max(coalesce((SELECT max(id) FROM outbox), 0),"
                    " coalesce((SELECT seq FROM sqlite_sequence WHERE name='outbox'), 0))"
                ).fetchone()
            except BaseException:
                db.close()
                raise
            journal: Journal | None = None
            journal_error: str | None = None
            if torn and not emptied:
                # Records appended after that line would never be read back.
                journal_error = "it ends in a torn line that could not be removed"
            else:
                try:
                    journal = Journal(journal_path(path), seq)
                except OSError as exc:
                    journal_error = str(exc)
            return db, _Opened(rows, task_ids, top + 1, replayed, torn, skipped, journal, journal_error)

        try:
            db, opened = await trio.to_thread.run_sync(_open)
        except sqlite3.Error as exc:
            if error_code(exc) in NOT_A_DB:
                raise StoreCorruptError(path, str(exc)) from exc
            raise StoreError(
                f"cannot open the state database {path}: {exc}",
                transient=error_code(exc) in CANNOT_WRITE,
            ) from exc
        if opened.replayed or opened.torn_bytes:
            log.info(
                "journal_replayed",
                records=opened.replayed,
                torn_bytes=opened.torn_bytes,
                note="writes a process that died had made durable, now in the database",
            )
        _log_skipped(opened.skipped)
        return cls(db, path, opened)

    @classmethod
    async def open_when_possible(cls, path: Path, *, retry_s: float = PROBE_INTERVAL_S) -> Store:
        """`open`, tried again every `retry_s` while the disk refuses (full, I/O error).

        On a full disk even a sound database may not open (SQLite must create
        its -shm file); exiting would only have the service manager restart us
        into the same disk until it gives up. A corrupt file raises at once.
        """
        waiting_since: float | None = None
        while True:
            try:
                store = await cls.open(path)
            except StoreError as exc:
                if not exc.transient:
                    raise
                if waiting_since is None:
                    waiting_since = trio.current_time()
                    log.error(
                        "state_store_cannot_open",
                        path=str(path),
                        error=str(exc),
                        action=f"waiting for the disk, retrying every {retry_s:g} s",
                    )
                await trio.sleep(retry_s)
                continue
            if waiting_since is not None:
                log.warning(
                    "state_store_opened",
                    path=str(path),
                    after_s=round(trio.current_time() - waiting_since, 3),
                )
            return store

    async def run_blocking(self, fn: Callable[[], T], /) -> T:
        """Run a short blocking call that is not the store's (a task log's open) in the
        store's thread, in order with its SQLite calls (an `OffLoop`).

        That thread is awake and idle while a task's child runs, which is when a
        log is opened, and it spares the task path a trio worker thread's limiter
        and hand-off: side by side, 0.99x complete with the state dir on /dev/shm,
        0.95-0.99x over five runs on disk (docs/benchmarks.md). A slow create
        (0.3-0.9 ms on a cold inode table) delays a store call queued behind it
        by as much; nothing is lost or reordered within the store.
        """
        return await self._thread.run(fn)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            # Shielded: a cancelled caller must not leave a half-done transaction.
            with trio.CancelScope(shield=True):
                result = await self._thread.run(partial(fn, self._db))
        return result

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, owe: Write | None = None) -> T:
        """Run `fn` in one transaction, after what is owed; `StoreWriteError` if the disk refuses.

        With `owe`, a refused write is kept to be applied later (see the module doc).
        """
        async with self._lock:
            return await self._write_locked(fn, owe)

    async def _write_locked(self, fn: Callable[[sqlite3.Connection], T], owe: Write | None) -> T:
        owed = list(self._owed)

        def run(db: sqlite3.Connection) -> T:
            for write in owed:
                write(db)
            return fn(db)

        try:
            with trio.CancelScope(shield=True):
                result = await self._thread.run(partial(transaction(run), self._db))
            del self._owed[: len(owed)]  # what was deferred meanwhile stays owed
            _log_skipped(
                _skip_report(w.seq, w.record, problem)
                for w in owed
                if isinstance(w, _Journaled)
                for problem in w.skipped[:1]  # once, if a refused transaction ran it twice
            )
            if self.journal is not None:
                applied = [w.seq for w in owed if isinstance(w, _Journaled)]
                if applied:
                    self.journal.applied_up_to(applied[-1])
        except sqlite3.OperationalError as exc:
            if error_code(exc) not in CANNOT_WRITE:
                raise
            if owe is not None:
                self._owed.append(owe)
            error = StoreWriteError(self.path, exc)
            self.health.refused(error)
            raise error from exc
        self.health.took_write()
        self.checkpointer.wrote()
        self._last_write_at = trio.current_time()
        return result

    async def _settle(self, write: Write) -> bool:
        """A bookkeeping write: done now if the disk takes it (True), else owed (False)."""
        try:
            await self._write(write, owe=write)
        except StoreWriteError:
            return False
        return True

    async def probe(self) -> bool:
        """Try one write (applying what is owed): True if the disk took it."""
        try:
            await self._write(probe_write)
        except StoreWriteError:
            return False
        return True

    @property
    def write_error(self) -> str | None:
        """Why writes fail now (None while they succeed)."""
        return self.health.error

    async def wait_writable(self) -> None:
        """Until writes succeed again (at once if they do)."""
        await self.health.wait_writable()

    async def watch(self, interval_s: float = PROBE_INTERVAL_S) -> None:
        """While writes fail, `probe` every `interval_s`; apply deferred writes; checkpoint
        the WAL in the background (`walcheckpoint`); prune old finished tasks. Runs until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_deferred)
                nursery.start_soon(self._apply_journal_soon)
                nursery.start_soon(self.checkpointer.run)
                nursery.start_soon(self._prune_periodically)
                await self._run(lambda db: db.execute("PRAGMA wal_autocheckpoint=0"))
                await self._probe_while_failing(interval_s)
        finally:
            with trio.CancelScope(shield=True):
                # Without us, SQLite checkpoints by itself again.
                await self._run(lambda db: db.execute("PRAGMA wal_autocheckpoint=1000"))

    def _defer(self, write: Write) -> None:
        self._owed.append(write)
        self._deferred_at = trio.current_time()
        self._deferred.set()

    def _journaled(self, record: dict[str, Any]) -> bool:
        """Make `record` durable through the journal and owe it to SQLite; False if it cannot be.

        Only while writes succeed: a failing disk gets its refusals from SQLite, as
        before (a task refused, a result sent from memory).
        """
        journal = self.journal
        if journal is None or not journal.usable or self.health.error is not None:
            return False
        try:
            seq = journal.append(*_journal_line(record))
        except OSError as exc:
            log.info("journal_append_failed", error=str(exc), action="written to the database directly")
            return False
        self._owed.append(_Journaled(seq, record))
        self._journal_owed.set()
        return True

    async def _apply_journal_soon(self) -> None:
        """Apply journaled writes `JOURNAL_APPLY_S` after the first of a run of them."""
        while True:
            await self._journal_owed.wait()
            await trio.sleep(JOURNAL_APPLY_S)
            self._journal_owed = trio.Event()
            if self.health.error is None:
                await self.sync()  # unless another write took them meanwhile

    async def sync(self) -> None:
        """Apply every journaled write to the file now, so that a read of the file sees it.

        Best effort: on a refused write the file stays as it is, the journal still holds them.
        """
        if self.journal is not None and self.journal.unapplied:
            try:
                await self._apply_owed()
            except StoreWriteError:
                pass

    async def _flush_deferred(self) -> None:
        """Apply what is owed once no write came for `DEFER_S`: while tasks keep
        the store busy, it rides in their writes and costs no transaction of its own."""
        while True:
            await self._deferred.wait()
            await self._until_quiet()
            self._deferred = trio.Event()
            if self.health.error is None:
                try:
                    await self._apply_owed()
                except StoreWriteError:
                    pass  # now failing: the probe loop takes over

    async def _apply_owed(self) -> None:
        """A transaction of nothing but what is owed, unless a write took it meanwhile."""
        async with self._lock:
            if self._owed:
                await self._write_locked(_nothing, None)

    async def _until_quiet(self) -> None:
        """Until neither a write nor a deferral came for `DEFER_S` (each one moves the end)."""
        while True:
            quiet_at = max(self._last_write_at, self._deferred_at) + DEFER_S
            if quiet_at <= trio.current_time():
                return
            await trio.sleep_until(quiet_at)

    async def _probe_while_failing(self, interval_s: float) -> None:
        while True:
            await self.health.wait_failing()
            # Polling on purpose: nothing signals that the disk has room again.
            ok = await self.probe()
            while not ok:
                await trio.sleep(interval_s)
                ok = await self.probe()

    async def close(self) -> None:
        if self._owed:
            await self.probe()  # a last chance for what is owed (else a restart redoes it)
        if self.journal is not None:
            if not self.journal.unapplied:
                self.journal.empty()  # all of it is in the file
            self.journal.close()
        await self._run(lambda db: db.close())
        await self._thread.stop()

    # -- tasks -------------------------------------------------------------

    def _storable(self, task_id: str) -> None:
        """Raise `StoreWriteError` for a task id SQLite cannot hold (a lone surrogate).

        The frame parser refuses such ids; a task failed for it is answered from
        memory (`Outbox.put`). Checked here too, before the journal, because an
        owed write that SQLite then refused would stop the store.
        """
        if not is_unicode(task_id):
            cause = sqlite3.DataError(f"task id {task_id!r} {LONE_SURROGATE}")
            raise StoreWriteError(self.path, cause)

    async def get_task(self, task_id: str) -> StoredTask | None:
        if not is_unicode(task_id):
            return None  # never stored (`_storable`)
        if task_id not in self._task_ids:
            # Never stored here: no read, so no wait behind a stalled disk (a busy
            # refusal in the frame handler must not hold up pongs) and no thread hop.
            await trio.lowlevel.checkpoint()
            return None
        await self.sync()

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
        Raises `StoreWriteError` when the disk refuses it.
        """
        self._storable(task_id)
        text = json.dumps(frame)

        def _put(db: sqlite3.Connection) -> int:
            _insert_task(db, (task_id, generation, text, QUEUED, marker, time.time()))
            return _drop_older(db, task_id, generation)

        dropped = await self._write(_put)
        self._task_ids.add(task_id)
        self.pending.remove_task(task_id, below_generation=generation)
        return dropped

    async def admit(
        self, task_id: str, generation: int, frame: dict[str, Any], marker: str, *, running: bool = False
    ) -> int | None:
        """`put_task`, unless the task already finished here at this generation or a later one.

        None for such a duplicate (nothing written); else how many stale results
        went. One thread hop for the check and the write together: the accept
        path's only store call before `task_accepted`. `running`: it starts at
        once (a free slot), so no `mark_running` needs to follow.
        """
        self._storable(task_id)
        state = RUNNING if running else QUEUED
        text = json.dumps(frame)
        received_at = time.time()
        row = (task_id, generation, text, state, marker, received_at)
        if task_id not in self._task_ids:
            # A task id never seen here: no finished row to find, no older results to drop.
            if self._journaled({"op": "admit", "row": row}):
                self._task_ids.add(task_id)
                return 0

        def _admit(db: sqlite3.Connection) -> int | None:
            found = db.execute("SELECT generation, state FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            if found is not None and found[1] == DONE and found[0] >= generation:
                return None
            _insert_task(db, row)
            return _drop_older(db, task_id, generation)

        dropped = await self._write(_admit)
        self._task_ids.add(task_id)
        if dropped is not None:
            self.pending.remove_task(task_id, below_generation=generation)
        return dropped

    async def set_generation(self, task_id: str, generation: int) -> int:
        """The task now runs as `generation`; older unsent results go (see `put_task`).

        Returns how many were dropped (0 when the write is owed).
        """
        if not is_unicode(task_id):
            return 0  # never stored (`_storable`)
        dropped = 0

        def _set(db: sqlite3.Connection) -> None:
            nonlocal dropped
            db.execute("UPDATE tasks SET generation=? WHERE task_id=?", (generation, task_id))
            dropped = _drop_older(db, task_id, generation)

        await self._settle(_set)  # done or owed: either way those results are gone
        self.pending.remove_task(task_id, below_generation=generation)
        return dropped

    async def adopt_generation(self, task_id: str, generation: int) -> int:
        """A finished task is the hub's again as `generation` (a late `task_continue`).

        Its unanswered results now carry that generation, in memory and on disk
        (done or owed, after the writes before it); how many there were.
        """
        if not is_unicode(task_id):
            return 0  # never stored (`_storable`)
        count = self.pending.relabel(task_id, generation)

        def _adopt(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE tasks SET generation=? WHERE task_id=? AND generation<?",
                (generation, task_id, generation),
            )
            db.execute(
                "UPDATE outbox SET generation=?, frame=json_set(frame, '$.generation', ?)"
                " WHERE task_id=? AND generation<?",
                (generation, generation, task_id, generation),
            )

        await self._settle(_adopt)
        return count

    async def mark_running(self, task_id: str) -> None:
        """A queued task started (only `last_status` after a crash depends on it).

        Only a queued row changes, so this may run after the task's `finish`
        without undoing it: the supervisor does not wait for it.
        """
        if not is_unicode(task_id):
            return  # never stored (`_storable`)
        await self._settle(
            lambda db: db.execute(
                "UPDATE tasks SET state=? WHERE task_id=? AND state=?", (RUNNING, task_id, QUEUED)
            )
        )

    async def finish(self, task_id: str, frame: dict[str, Any] | None) -> OutboxItem | None:
        """Mark a task done and, in the same transaction, queue its result frame (the item returned).

        Raises `StoreWriteError` when the disk refuses it (nothing is written).
        """
        self._storable(task_id)
        generation = int(frame.get("generation", 0)) if frame is not None else 0
        text = json.dumps(frame) if frame is not None else ""
        now = time.time()
        item_id: int | None = None
        if frame is not None:
            item_id = self._next_outbox_id
            self._next_outbox_id += 1
        record = {"op": "finish", "task_id": task_id, "finished_at": now, "item": (item_id, generation, text)}
        if not self._journaled(record):
            await self._write(partial(_apply_record, record=record))
        if item_id is None or frame is None:
            return None
        item = OutboxItem(item_id, task_id, generation, frame)
        self.pending.add(item, len(text))
        return item

    async def mark_done(self, task_id: str, generation: int | None = None) -> None:
        """Mark a task done without a stored result (it went from memory); owed if refused.

        With `generation`, a newer run of the task (given out again meanwhile) is left alone.
        """
        if not is_unicode(task_id):
            return  # never stored (`_storable`)
        limit = MAX_GENERATION if generation is None else min(generation, MAX_GENERATION)
        await self._settle(
            lambda db: db.execute(
                "UPDATE tasks SET state=?, finished_at=? WHERE task_id=? AND generation<=?",
                (DONE, time.time(), task_id, limit),
            )
        )

    async def in_flight(self) -> list[StoredTask]:
        """Tasks accepted but not finished: what a restart must recover."""
        await self.sync()

        def _list(db: sqlite3.Connection) -> list[StoredTask]:
            rows = db.execute(
                "SELECT task_id, generation, frame, state, marker FROM tasks WHERE state != ?"
                " ORDER BY received_at",
                (DONE,),
            ).fetchall()
            return [_task(r) for r in rows]

        return await self._run(_list)

    async def prune(self, older_than_s: float = _KEEP_DONE_S) -> int:
        """Forget finished tasks older than `older_than_s` whose results are acknowledged.

        In batches of `_PRUNE_BATCH`, one transaction each, so that task writes
        go between them; returns how many rows went. Raises `StoreWriteError`
        when the disk refuses.
        """
        cutoff = time.time() - older_than_s

        def _batch(db: sqlite3.Connection) -> list[str]:
            cur = db.execute(
                "DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks WHERE state=? AND finished_at < ?"
                " AND task_id NOT IN (SELECT task_id FROM outbox) LIMIT ?) RETURNING task_id",
                (DONE, cutoff, _PRUNE_BATCH),
            )
            return [r[0] for r in cur]

        total = 0
        while gone := await self._write(_batch):
            self._task_ids.difference_update(gone)
            total += len(gone)
            if len(gone) < _PRUNE_BATCH:
                break
        return total

    async def _prune_periodically(self) -> None:
        """Without it the tasks table grows by a row a task, forever (disk, and the page cache)."""
        await trio.sleep(PRUNE_FIRST_S)
        while True:
            try:
                pruned = await self.prune()
            except StoreWriteError:
                pruned = 0  # the probe loop reports the disk; the next round tries again
            if pruned:
                log.info("state_pruned", tasks=pruned, older_than_s=_KEEP_DONE_S)
            await trio.sleep(PRUNE_INTERVAL_S)

    # -- outbox ------------------------------------------------------------

    @property
    def outbox_size(self) -> int:
        """How many stored results await the hub's answer."""
        return len(self.pending)

    async def outbox(self, limit: int | None = None) -> list[OutboxItem]:
        """Stored results not yet answered, oldest first (at most `limit`).

        From memory; only frames not kept there (see `pending`) are read, in one hop.
        """
        head = self.pending.head(limit)
        missing = [item_id for item_id, entry in head if entry.frame is None]
        frames: dict[int, dict[str, Any]] = {}
        if missing:
            await self.sync()  # a frame not kept in memory may still be in the journal only

            def _read(db: sqlite3.Connection) -> dict[int, dict[str, Any]]:
                marks = ",".join("?" * len(missing))
                rows = db.execute(f"SELECT id, frame FROM outbox WHERE id IN ({marks})", missing)
                return {r[0]: json.loads(r[1]) for r in rows}

            frames = await self._run(_read)
            for item_id in missing:
                if item_id not in frames and item_id in self.pending:
                    # Its row is gone (nothing of ours deletes one without forgetting
                    # it): forget it too, or the outbox would ask for it forever.
                    log.warning("outbox_row_missing", item_id=item_id, action="forgotten")
                    self.pending.remove(item_id)
        items = []
        for item_id, entry in head:
            frame = entry.frame if entry.frame is not None else frames.get(item_id)
            if frame is not None and item_id in self.pending:  # (not retired during the read)
                items.append(OutboxItem(item_id, entry.task_id, entry.generation, frame))
        return items

    def retire(self, item_id: int) -> None:
        """The hub answered this result: forget it now, delete its row soon (see the module doc)."""
        self.pending.remove(item_id)
        self._defer(lambda db: db.execute("DELETE FROM outbox WHERE id=?", (item_id,)))

    async def drop_results(self, task_id: str) -> None:
        """Forget unsent results of a task the hub took away (reassigned)."""
        self.pending.remove_task(task_id)  # first: the outbox must not pick one during the write
        if not is_unicode(task_id):
            return  # never stored (`_storable`)
        await self._settle(lambda db: db.execute("DELETE FROM outbox WHERE task_id=?", (task_id,)))


def _nothing(db: sqlite3.Connection) -> None:
    """A write of nothing: the transaction that applies what is owed."""


def _insert_task(db: sqlite3.Connection, row: Iterable[Any]) -> None:
    db.execute(
        "INSERT OR REPLACE INTO tasks (task_id, generation, frame, state, marker, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        tuple(row),
    )


# Where an admit's row and a finish's item hold their frame's text.
_TEXT_SLOT = {"admit": ("row", 2), "finish": ("item", 2)}


def _journal_line(record: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """`record` as it goes into the journal: its frame's text apart, to be written as it is."""
    field, index = _TEXT_SLOT[record["op"]]
    values = list(record[field])
    text = values[index]
    if not text:  # a finish with no frame
        return record, None
    values[index] = None
    return {**record, field: values}, text


def _from_journal(record: dict[str, Any]) -> dict[str, Any]:
    """A record as read back: its frame (an object in the line) put back as text, where it was.

    Records written before the frame went in as it is hold the text in place already.
    """
    if "frame" not in record or record.get("op") not in _TEXT_SLOT:
        return record
    field, index = _TEXT_SLOT[record["op"]]
    values = list(record[field])
    values[index] = json.dumps(record["frame"])
    out = {k: v for k, v in record.items() if k != "frame"}
    out[field] = values
    return out


def _apply_record(db: sqlite3.Connection, record: dict[str, Any]) -> None:
    """What an intake journal record says, written to the file (at once, owed, or replayed)."""
    if record.get("op") == "admit":
        _insert_task(db, record["row"])
    elif record.get("op") == "finish":
        _finish_task(db, record["task_id"], record["finished_at"], record["item"])


# What sqlite3 raises for values it cannot bind (an int over 64 bits, a lone
# surrogate, a wrong type), and a record missing a field: nothing a retry can mend.
_UNAPPLIABLE = (OverflowError, ValueError, TypeError, KeyError, sqlite3.InterfaceError, sqlite3.DataError)


def _apply_journal_record(db: sqlite3.Connection, record: dict[str, Any]) -> str | None:
    """`_apply_record` in a savepoint: None, or why SQLite could not take it (then nothing of it is kept).

    The intake path refuses such values before they are journaled (the frame
    parser, `Store._storable`); this is what keeps a record that still holds
    one from stopping the store, or every start after it in the replay.
    """
    db.execute("SAVEPOINT journal_record")
    try:
        _apply_record(db, record)
    except _UNAPPLIABLE as exc:
        db.execute("ROLLBACK TO journal_record")
        db.execute("RELEASE journal_record")
        return f"{type(exc).__name__}: {exc}"[:300]
    db.execute("RELEASE journal_record")
    return None


def _set_journal_applied(db: sqlite3.Connection, seq: int) -> None:
    db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('journal_applied', ?)", (seq,))


def _finish_task(db: sqlite3.Connection, task_id: str, finished_at: float, item: Iterable[Any]) -> None:
    """The task done and, with an id, its result queued (`item`: id, generation, frame text)."""
    item_id, generation, text = item
    db.execute("UPDATE tasks SET state=?, finished_at=? WHERE task_id=?", (DONE, finished_at, task_id))
    if item_id is not None:
        db.execute(
            "INSERT OR REPLACE INTO outbox (id, task_id, generation, frame, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (item_id, task_id, generation, text, finished_at),
        )


def _replay(db: sqlite3.Connection, path: Path) -> tuple[int, int, int, bool, list[tuple[str, Any]]]:
    """Apply the journal's records the file lacks, then empty it (in the store's open).

    Returns (records applied, bytes of a torn last line dropped, last sequence
    number, whether the journal is empty now, why each record SQLite could not
    take was skipped).
    """
    found = db.execute("SELECT value FROM meta WHERE key='journal_applied'").fetchone()
    applied = int(found[0]) if found else 0
    records, torn = read_records(path)
    todo = [r for r in records if r["seq"] > applied]
    skipped: list[tuple[str, Any]] = []
    if todo:

        def _apply(db: sqlite3.Connection) -> None:
            for record in todo:
                problem = _apply_journal_record(db, _from_journal(record))
                if problem is not None:
                    skipped.append(_skip_report(record["seq"], record, problem))
            _set_journal_applied(db, todo[-1]["seq"])

        transaction(_apply)(db)
    last = max([applied, *(r["seq"] for r in records)])
    emptied = not (records or torn)
    if not emptied:
        with contextlib.suppress(OSError):  # kept, its records are skipped by number next time
            os.truncate(path, 0)
            emptied = True
    return len(todo) - len(skipped), torn, last, emptied, skipped


_SKIPPED_NOTE = "SQLite cannot hold its values: that task's row or result is not in the database"


def _skip_report(seq: int, record: dict[str, Any], problem: str) -> tuple[str, Any]:
    """What the log says of a journal record SQLite could not take: the problem, and its task."""
    row = record.get("row")
    task_id = record.get("task_id") or (row[0] if row else None)
    return f"record {seq} ({record.get('op')}): {problem}", task_id


def _log_skipped(reports: Iterable[tuple[str, Any]]) -> None:
    for problem, task_id in reports:
        log.error("journal_record_skipped", problem=problem, task_id=task_id, note=_SKIPPED_NOTE)


def _drop_older(db: sqlite3.Connection, task_id: str, generation: int) -> int:
    """Unsent results of generations below `generation`: the hub, which has
    given the task out again, would refuse them as stale."""
    cur = db.execute("DELETE FROM outbox WHERE task_id=? AND generation<?", (task_id, generation))
    return cur.rowcount


def _task(row: tuple[Any, ...]) -> StoredTask:
    return StoredTask(row[0], row[1], json.loads(row[2]), row[3], row[4])
