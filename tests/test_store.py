"""The SQLite store: tasks before accept, results until acked, recovery after a crash."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sidecar.messages import failed_frame
from sidecar.store import DONE, QUEUED, RUNNING, Store


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
    await store.retire(items[0].id)
    assert await store.outbox() == []
    await store.close()


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
