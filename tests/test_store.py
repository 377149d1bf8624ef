"""The SQLite store: tasks before accept, results until acked, recovery after a crash."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from sidecar import store as store_module
from sidecar.messages import failed_frame
from sidecar.store import DEFER_S, DONE, PRUNE_FIRST_S, QUEUED, RUNNING, OutboxItem, Store
from sidecar.storefaults import StoreCorruptError, StoreWriteError
from sidecar.walcheckpoint import MIN_WRITES
from tests.conftest import Logs


async def test_task_and_outbox_roundtrip(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = await Store.open(db)
    await store.put_task("t1", 0, {"type": "task_assign", "task_id": "t1"}, "m1")
    assert (await store.get_task("t1")).state == QUEUED  # type: ignore[union-attr]
    await store.mark_running("t1")
    assert [t.task_id for t in await store.in_flight()] == ["t1"]
    await store.finish("t1", failed_frame("t1", 0, "boom", "exit_code"))
    assert await store.in_flight() == []
    items = await store.outbox()
    assert len(items) == 1 and items[0].frame["error"] == "boom"
    store.retire(items[0].id)
    assert await store.outbox() == []
    await store.close()


async def test_results_are_found_by_task_through_an_index_even_in_an_older_file(tmp_path: Path) -> None:
    """A file made before the index existed gets it at open; the admission's delete of older
    generations' results (and a reassign's drop) then looks them up by task, not by a scan
    of the whole outbox (4.2 ms a transaction with 5,000 results waiting, 10 us by the index)."""
    path = tmp_path / "s.db"
    old = sqlite3.connect(path)
    old.executescript(store_module._SCHEMA.split("-- Every admission")[0])  # the schema before it
    old.close()
    store = await Store.open(path)
    await store.close()
    db = sqlite3.connect(path)
    try:
        plan = db.execute(
            "EXPLAIN QUERY PLAN DELETE FROM outbox WHERE task_id=? AND generation<?", ("t", 1)
        ).fetchall()
    finally:
        db.close()
    assert any("USING INDEX outbox_task" in row[-1] for row in plan), plan


async def test_state_survives_reopen_like_a_crash(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = await Store.open(db)
    await store.put_task("a", 2, {"task_id": "a", "generation": 2}, "ma")
    await store.mark_running("a")
    await store.put_task("b", 0, {"task_id": "b"}, "mb")
    await store.finish("b", failed_frame("b", 0, "x"))
    # No close(): a kill -9 never closes. A second connection sees committed state.
    again = await Store.open(db)
    flight = await again.in_flight()
    assert [(t.task_id, t.generation, t.state, t.marker) for t in flight] == [("a", 2, RUNNING, "ma")]
    assert [i.task_id for i in await again.outbox()] == ["b"]
    assert (await again.get_task("b")).state == DONE  # type: ignore[union-attr]
    mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    await again.close()
    await store.close()


async def test_admit_stores_a_new_task_and_ignores_a_finished_duplicate(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        assert await store.admit("t", 2, {"task_id": "t", "generation": 2}, "m") == 0
        await store.finish("t", failed_frame("t", 2, "x"))
        # The same generation again, or an older one: finished here, nothing written.
        assert await store.admit("t", 2, {"task_id": "t", "generation": 2}, "m") is None
        assert await store.admit("t", 1, {"task_id": "t", "generation": 1}, "m") is None
        assert (await store.get_task("t")).state == DONE  # type: ignore[union-attr]
        # Given out again as a newer generation: stored afresh, the stale result dropped.
        assert await store.admit("t", 3, {"task_id": "t", "generation": 3}, "m") == 1
        row = await store.get_task("t")
        assert row is not None and (row.state, row.generation) == (QUEUED, 3)
        assert await store.outbox() == []
    finally:
        await store.close()


async def test_mark_running_after_finish_leaves_the_task_done(tmp_path: Path) -> None:
    """The supervisor does not wait for mark_running: arriving late, it must not undo the end."""
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.admit("t", 0, {"task_id": "t"}, "m")
        await store.finish("t", None)
        await store.mark_running("t")
        assert (await store.get_task("t")).state == DONE  # type: ignore[union-attr]
        assert await store.in_flight() == []
    finally:
        await store.close()


async def test_drop_results_and_generation(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    await store.put_task("t", 0, {"task_id": "t"}, "m")
    await store.set_generation("t", 5)
    assert (await store.get_task("t")).generation == 5  # type: ignore[union-attr]
    await store.finish("t", failed_frame("t", 5, "e"))
    await store.drop_results("t")
    assert await store.outbox() == []
    await store.close()


def _fail_outbox_deletes(db: Path) -> None:
    """A real SQLite trigger (from a second connection) that aborts any DELETE on the outbox:
    the second statement of put_task / set_generation then fails after the first ran."""
    other = sqlite3.connect(db)
    other.execute(
        "CREATE TRIGGER fail_drop BEFORE DELETE ON outbox BEGIN SELECT RAISE(ABORT, 'injected'); END"
    )
    other.commit()
    other.close()


async def test_adopt_generation_relabels_unanswered_results_in_memory_and_on_disk(tmp_path: Path) -> None:
    """A late `task_continue` for an ended task: its unanswered result now carries
    the new generation, frame included, as read now and after a reopen; a result
    of a newer generation and other tasks' results are left as they were."""
    db = tmp_path / "s.db"
    store = await Store.open(db)
    for tid in ("t1", "t2"):
        await store.put_task(tid, 1, {"type": "task_assign", "task_id": tid}, "m")
        await store.finish(tid, failed_frame(tid, 1, "boom", "exit_code"))
    assert await store.adopt_generation("t1", 3) == 1
    assert await store.adopt_generation("t1", 2) == 0  # never lowered

    def generations(items: list[OutboxItem]) -> dict[str, tuple[int, int]]:
        return {i.task_id: (i.generation, i.frame["generation"]) for i in items}

    assert generations(await store.outbox()) == {"t1": (3, 3), "t2": (1, 1)}
    await store.close()
    store = await Store.open(db)
    assert generations(await store.outbox()) == {"t1": (3, 3), "t2": (1, 1)}
    assert (await store.get_task("t1")).generation == 3  # type: ignore[union-attr]
    await store.close()


async def test_put_task_is_one_transaction(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = await Store.open(db)
    await store.put_task("t", 1, {"task_id": "t", "generation": 1}, "m1")
    await store.finish("t", failed_frame("t", 1, "old result"))
    _fail_outbox_deletes(db)
    # Generation 2 replaces the row and drops the generation-1 result: the drop fails.
    try:
        await store.put_task("t", 2, {"task_id": "t", "generation": 2}, "m2")
    except sqlite3.IntegrityError:
        pass
    else:
        raise AssertionError("the injected failure did not happen")
    row = await store.get_task("t")
    assert row is not None and (row.generation, row.state, row.marker) == (1, DONE, "m1")
    assert [i.generation for i in await store.outbox()] == [1]
    await store.close()


async def test_set_generation_is_one_transaction(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    store = await Store.open(db)
    await store.put_task("t", 1, {"task_id": "t", "generation": 1}, "m1")
    await store.finish("t", failed_frame("t", 1, "old result"))
    _fail_outbox_deletes(db)
    try:
        await store.set_generation("t", 3)
    except sqlite3.IntegrityError:
        pass
    else:
        raise AssertionError("the injected failure did not happen")
    row = await store.get_task("t")
    assert row is not None and row.generation == 1
    assert [i.generation for i in await store.outbox()] == [1]
    await store.close()


# -- a disk that refuses writes -------------------------------------------------
#
# Real SQLite refusals, on any machine and without root: `query_only` refuses
# every write (SQLITE_READONLY, what a file system remounted read-only gives),
# the page limit refuses growth with SQLITE_FULL ("database or disk is full"),
# which is what a full disk gives. The real full disk (a tmpfs) is in
# tests/test_state_faults.py.


def _writes(store: Store, allowed: bool) -> None:
    store._db.execute(f"PRAGMA query_only={0 if allowed else 1}")  # per connection: the store's own


def _no_journal(store: Store) -> None:
    """Writes go to SQLite directly from now on, as when the journal cannot be appended to."""
    assert store.journal is not None
    store.journal.close()


async def test_a_full_disk_refuses_a_result_and_nothing_of_it_is_written(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    await store.put_task("t", 1, {"task_id": "t"}, "m")
    db = store._db
    db.execute("VACUUM")
    db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
    _no_journal(store)  # a full disk refuses the journal's append too; here only SQLite is limited
    with pytest.raises(StoreWriteError) as info:
        await store.finish("t", failed_frame("t", 1, "x" * 1900) | {"pad": "y" * 20_000})
    assert info.value.full and str(info.value) == f"state disk is full: {store.path}"
    assert store.write_error == "state disk is full"
    assert await store.outbox() == []
    row = await store.get_task("t")
    assert row is not None and row.state == QUEUED  # the done-mark went with the result
    await store.close()


async def test_a_refused_put_task_stores_nothing(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    _writes(store, allowed=False)
    with pytest.raises(StoreWriteError) as info:
        await store.put_task("u", 1, {"task_id": "u"}, "mu")
    assert not info.value.full and "cannot write" in info.value.problem
    assert await store.get_task("u") is None and store.write_error is not None
    await store.close()


async def _three_results(store: Store) -> list[OutboxItem]:
    for tid in ("a", "b", "c"):
        await store.put_task(tid, 1, {"task_id": tid}, "m")
        await store.finish(tid, failed_frame(tid, 1, "e"))
    await store.put_task("r", 1, {"task_id": "r"}, "m")
    return await store.outbox()


async def test_refused_bookkeeping_is_owed_and_applied_by_the_next_write(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    first, _, third = await _three_results(store)
    _writes(store, allowed=False)
    # Refused by the disk (the retire, deferred, is not even tried), but the outbox
    # already leaves them out: no result is sent twice.
    store.retire(first.id)
    await store.drop_results("b")
    await store.mark_running("r")
    assert await store.set_generation("r", 2) == 0
    assert [i.id for i in await store.outbox()] == [third.id]
    assert store.write_error is not None and store.health.writes_refused == 3
    # Another connection (a restart) sees none of it yet.
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT count(*) FROM outbox").fetchone()[0] == 3

    _writes(store, allowed=True)
    await store.finish("r", failed_frame("r", 2, "small"))  # the next write that succeeds...
    assert store.write_error is None
    # ...applied what was owed first, in order, in the same transaction.
    assert [r[0] for r in other.execute("SELECT task_id FROM outbox ORDER BY id")] == ["c", "r"]
    assert other.execute("SELECT generation, state FROM tasks WHERE task_id='r'").fetchone() == (2, DONE)
    assert [i.task_id for i in await store.outbox()] == ["c", "r"]
    other.close()
    await store.close()


async def test_probe_fails_while_writes_are_refused_and_applies_the_owed_once_they_work(
    tmp_path: Path,
) -> None:
    store = await Store.open(tmp_path / "s.db")
    first, *_ = await _three_results(store)
    _writes(store, allowed=False)
    store.retire(first.id)
    assert not await store.probe() and not await store.probe()
    assert store.write_error is not None
    _writes(store, allowed=True)
    assert await store.probe()
    assert store.write_error is None
    other = sqlite3.connect(store.path)
    assert other.execute("SELECT count(*) FROM outbox").fetchone()[0] == 2  # the owed retire
    other.close()
    await store.close()


async def test_watch_recovers_by_itself_when_writes_work_again(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    _writes(store, allowed=False)
    with pytest.raises(StoreWriteError):
        await store.put_task("t", 1, {"task_id": "t"}, "m")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.watch, 0.01)
        _writes(store, allowed=True)
        with trio.fail_after(10):
            await store.wait_writable()  # nothing else writes: only watch's probe can succeed
        assert store.write_error is None
        nursery.cancel_scope.cancel()
    await store.put_task("t", 1, {"task_id": "t"}, "m")
    await store.close()


async def test_open_refuses_a_file_that_is_not_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    db.write_bytes(b"garbage" * 1000)
    with pytest.raises(StoreCorruptError) as info:
        await Store.open(db)
    text = str(info.value)
    assert str(db) in text and "move it aside" in text and "lost" in text


# --------------------------------------------------------------------------
# The outbox in memory, and the deferred retire


def _rows(path: Path) -> list[tuple[int, str]]:
    other = sqlite3.connect(path)
    try:
        return [(r[0], r[1]) for r in other.execute("SELECT id, task_id FROM outbox ORDER BY id")]
    finally:
        other.close()


async def test_a_retire_rides_in_the_next_write(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    first, second, _ = await _three_results(store)
    await store.sync()
    store.retire(first.id)
    # Gone from the outbox at once; still on disk (a crash now costs one resend).
    assert [i.id for i in await store.outbox()] == [second.id, _.id]
    assert [r[0] for r in _rows(store.path)] == [first.id, second.id, _.id]
    await store.finish("r", failed_frame("r", 1, "e"))  # journaled: the delete rides in its transaction
    await store.sync()
    assert first.id not in [r[0] for r in _rows(store.path)]
    await store.close()


async def test_watch_applies_a_deferred_retire_when_no_write_comes(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    store = await Store.open(tmp_path / "s.db")
    first, *_ = await _three_results(store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.watch)
        store.retire(first.id)
        await trio.sleep(DEFER_S / 2)
        assert first.id in [r[0] for r in _rows(store.path)]  # not yet: a write may still come
        # The flush begins DEFER_S after the retire at the latest, and holds the store's
        # lock while it writes (virtual time may jump while its thread works).
        await trio.sleep(2 * DEFER_S)
        async with store._lock:
            assert first.id not in [r[0] for r in _rows(store.path)]
        nursery.cancel_scope.cancel()
    await store.close()


async def test_close_applies_a_deferred_retire(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    first, *_ = await _three_results(store)
    store.retire(first.id)
    await store.close()
    assert first.id not in [r[0] for r in _rows(tmp_path / "s.db")]


async def test_frames_beyond_the_memory_budget_are_read_back_when_sent(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    store.pending.frame_budget = 3000  # room for about one result
    big = {"pad": "p" * 2000}
    for tid in ("a", "b", "c"):
        await store.put_task(tid, 1, {"task_id": tid}, "m")
        await store.finish(tid, failed_frame(tid, 1, tid) | big)
    assert store.pending.frame_bytes <= 3000
    items = await store.outbox()
    assert [(i.task_id, i.frame["error"]) for i in items] == [("a", "a"), ("b", "b"), ("c", "c")]
    assert [i.task_id for i in await store.outbox(limit=1)] == ["a"]
    # A restart knows every unanswered result and reads each frame only when asked.
    again = await Store.open(tmp_path / "s.db")
    assert again.outbox_size == 3 and again.pending.frame_bytes == 0
    assert [i.frame["error"] for i in await again.outbox(limit=2)] == ["a", "b"]
    await again.close()
    await store.close()


async def test_a_newer_generation_drops_older_results_from_the_outbox_in_memory(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    await store.put_task("t", 1, {"task_id": "t"}, "m")
    await store.finish("t", failed_frame("t", 1, "old"))
    assert store.outbox_size == 1
    assert await store.admit("t", 2, {"task_id": "t", "generation": 2}, "m2", running=True) == 1
    assert store.outbox_size == 0 and await store.outbox() == []
    row = await store.get_task("t")
    assert row is not None and (row.generation, row.state) == (2, RUNNING)
    await store.close()


async def test_while_watched_the_wal_is_checkpointed_in_the_background_not_by_a_commit(
    tmp_path: Path,
) -> None:
    # Real time: a checkpoint fsyncs in a worker thread, which a mock clock would jump over.
    store = await Store.open(tmp_path / "s.db")
    db_file = trio.Path(store.path)

    async def autocheckpoint() -> int:
        return int(await store._run(lambda db: db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]))

    assert await autocheckpoint() == 1000  # SQLite's own, while nobody watches
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.watch)
        while await autocheckpoint() != 0:  # watch() has started (one store hop)
            pass
        before = (await db_file.stat()).st_size
        ran = store.checkpointer.checkpointed
        for i in range(MIN_WRITES - 1):
            await store.put_task(f"t{i}", 0, {"task_id": f"t{i}", "pad": "x" * 3000}, "m")
        # No commit checkpointed: every page is still in the WAL.
        assert (await db_file.stat()).st_size == before and not ran.is_set()
        await store.put_task("last", 0, {"task_id": "last"}, "m")
        with trio.fail_after(30):
            await ran.wait()
        assert (await db_file.stat()).st_size > before + (MIN_WRITES - 1) * 3000
        nursery.cancel_scope.cancel()
    assert await autocheckpoint() == 1000
    await store.close()


async def test_a_result_whose_row_vanished_is_forgotten_not_asked_for_forever(
    tmp_path: Path, logs: Logs
) -> None:
    store = await Store.open(tmp_path / "s.db")
    store.pending.frame_budget = 0  # no frame kept: each is read back when asked for
    first, second, _ = await _three_results(store)
    other = sqlite3.connect(store.path)
    other.execute("DELETE FROM outbox WHERE id=?", (first.id,))
    other.commit()
    other.close()
    assert [i.id for i in await store.outbox(limit=1)] == []
    assert first.id not in store.pending and store.outbox_size == 2
    assert [i.id for i in await store.outbox(limit=1)] == [second.id]
    [warning] = logs.named("outbox_row_missing")
    assert warning["item_id"] == first.id
    await store.close()


def _age(path: Path, task_ids: list[str], seconds: float) -> None:
    other = sqlite3.connect(path)
    other.executemany(
        "UPDATE tasks SET finished_at = finished_at - ? WHERE task_id=?", [(seconds, t) for t in task_ids]
    )
    other.commit()
    other.close()


async def test_prune_forgets_old_finished_tasks_whose_results_were_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_PRUNE_BATCH", 2)  # several batches
    store = await Store.open(tmp_path / "s.db")
    for i in range(5):
        await store.put_task(f"old{i}", 1, {"task_id": f"old{i}"}, "m")
        await store.finish(f"old{i}", None)
    await store.put_task("unanswered", 1, {"task_id": "unanswered"}, "m")
    await store.finish("unanswered", failed_frame("unanswered", 1, "e"))
    await store.put_task("recent", 1, {"task_id": "recent"}, "m")
    await store.finish("recent", None)
    await store.put_task("running", 1, {"task_id": "running"}, "m")
    _age(store.path, [f"old{i}" for i in range(5)] + ["unanswered"], 2 * 86400)
    assert await store.prune() == 5
    left = {t: (await store.get_task(t)) is not None for t in ("old0", "unanswered", "recent", "running")}
    assert left == {"old0": False, "unanswered": True, "recent": True, "running": True}
    assert await store.prune() == 0
    await store.close()


async def test_watch_prunes_a_minute_after_start(tmp_path: Path, clock: trio.testing.MockClock) -> None:
    store = await Store.open(tmp_path / "s.db")
    await store.put_task("old", 1, {"task_id": "old"}, "m")
    await store.finish("old", None)
    await store.sync()
    _age(store.path, ["old"], 2 * 86400)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.watch)
        await trio.sleep(PRUNE_FIRST_S / 2)
        assert await store.get_task("old") is not None
        await trio.sleep(PRUNE_FIRST_S)  # the prune began at PRUNE_FIRST_S and holds the lock while it writes
        async with store._lock:
            pass
        assert await store.get_task("old") is None
        nursery.cancel_scope.cancel()
    await store.close()


async def test_a_deferred_retire_costs_no_transaction_of_its_own_while_writes_keep_coming(
    tmp_path: Path, clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The threshold clock (it jumps only after 10 ms of real idleness, not while a
    # store hop is under way) and no hourly prune: each would let virtual time run off.
    monkeypatch.setattr(store_module, "PRUNE_FIRST_S", math.inf)
    flushes: list[int] = []
    flushed = trio.Event()
    token = trio.lowlevel.current_trio_token()
    real_nothing = store_module._nothing

    def counted(db: sqlite3.Connection) -> None:  # runs in the store thread
        flushes.append(1)
        token.run_sync_soon(flushed.set)
        real_nothing(db)

    monkeypatch.setattr(store_module, "_nothing", counted)
    store = await Store.open(tmp_path / "s.db")
    first, second, _ = await _three_results(store)
    await store.sync()  # the journal's transaction is not the one counted here
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.watch)
        store.retire(first.id)
        for i in range(6):  # a write every DEFER_S / 2: the store is never quiet for DEFER_S
            await trio.sleep(DEFER_S / 2)
            await store.put_task(f"busy{i}", 1, {"task_id": f"busy{i}"}, "m")
        assert flushes == []  # the retire rode in the first of those writes
        assert first.id not in [r[0] for r in _rows(store.path)]
        store.retire(second.id)  # and now the store stays quiet: the flusher applies it
        with trio.fail_after(20 * DEFER_S):
            await flushed.wait()
        async with store._lock:
            assert second.id not in [r[0] for r in _rows(store.path)]
        assert len(flushes) == 1
        nursery.cancel_scope.cancel()
    await store.close()


async def test_a_task_id_sqlite_cannot_hold_is_refused_before_the_journal(tmp_path: Path) -> None:
    # A lone surrogate: the frame parser refuses such a task, and its failure goes
    # from memory. Were it journaled, SQLite would refuse the owed write later.
    db = tmp_path / "s.db"
    store = await Store.open(db)
    odd = "t\ud800x"
    with pytest.raises(StoreWriteError, match="surrogate"):
        await store.admit(odd, 1, {"type": "task_assign", "task_id": odd}, "m")
    with pytest.raises(StoreWriteError, match="surrogate"):
        await store.put_task(odd, 1, {"type": "task_assign", "task_id": odd}, "m")
    with pytest.raises(StoreWriteError, match="surrogate"):
        await store.finish(odd, failed_frame(odd, 1, "invalid", "invalid_task"))
    assert await store.get_task(odd) is None
    await store.mark_done(odd, 1)  # after the hub's ack of the failure sent from memory
    await store.mark_running(odd)
    assert await store.set_generation(odd, 2) == 0
    await store.drop_results(odd)
    await store.put_task("t", 1, {"type": "task_assign", "task_id": "t"}, "m")  # the store still works
    await store.close()
    again = await Store.open(db)
    assert [t.task_id for t in await again.in_flight()] == ["t"] and await again.outbox() == []
    await again.close()
