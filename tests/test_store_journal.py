"""The store's intake journal (`sidecar.journal`): a task's two writes without a thread hop.

What must hold: an admission of a new task and a result are durable when the
call returns (a real kill -9 right after loses neither), each journal record
reaches SQLite exactly once (a replay never brings back a result the hub
already answered), a torn last line is dropped, a task id the file knows
still gets its duplicate check, reads see journaled writes, and when the
journal cannot be written the write goes to SQLite as before.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from sidecar import journal as journal_module
from sidecar.journal import journal_path, read_records
from sidecar.messages import failed_frame
from sidecar.store import DONE, RUNNING, Store
from tests.conftest import Logs


def _db_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    other = sqlite3.connect(path)
    try:
        return list(other.execute(sql))
    finally:
        other.close()


def _run_then_kill(db: Path, body: str) -> None:
    """Run `body` (async, with `store` open on `db`) in a child process that then dies by SIGKILL."""
    script = textwrap.dedent(
        """
        import os, signal, sys, trio
        from pathlib import Path
        from sidecar.messages import failed_frame
        from sidecar.store import Store

        async def main():
            store = await Store.open(Path(sys.argv[1]))
        {body}
            os.kill(os.getpid(), signal.SIGKILL)

        trio.run(main)
        """
    ).format(body=textwrap.indent(textwrap.dedent(body), "    "))
    done = subprocess.run([sys.executable, "-c", script, str(db)], capture_output=True, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()


async def test_an_admission_and_a_result_survive_a_kill_9_right_after_the_calls(
    tmp_path: Path, logs: Logs
) -> None:
    db = tmp_path / "s.db"
    _run_then_kill(
        db,
        """
        await store.admit("t1", 3, {"task_id": "t1", "n": 1}, "m1", running=True)
        await store.admit("t2", 1, {"task_id": "t2"}, "m2")
        await store.finish("t2", failed_frame("t2", 1, "boom"))
        """,
    )
    # Nothing reached SQLite (the child died before the journal's transaction)...
    assert _db_rows(db, "SELECT task_id FROM tasks") == []
    assert len(read_records(journal_path(db))[0]) == 3
    # ...and the next open has all of it.
    store = await Store.open(db)
    try:
        (held,) = await store.in_flight()
        assert (held.task_id, held.generation, held.state, held.marker) == ("t1", 3, RUNNING, "m1")
        assert held.frame == {"task_id": "t1", "n": 1}
        (item,) = await store.outbox()
        assert (item.task_id, item.generation, item.frame["error"]) == ("t2", 1, "boom")
        row = await store.get_task("t2")
        assert row is not None and row.state == DONE
        assert journal_path(db).stat().st_size == 0  # applied, so emptied
        (replayed,) = logs.named("journal_replayed")
        assert replayed["records"] == 3 and replayed["torn_bytes"] == 0
        # Ids go on from the replayed ones: a new result does not take the old one's.
        await store.admit("t3", 1, {"task_id": "t3"}, "m3")
        new = await store.finish("t3", failed_frame("t3", 1, "e"))
        assert new is not None and new.id > item.id
    finally:
        await store.close()


async def test_a_record_is_applied_once_so_an_answered_result_does_not_come_back(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    _run_then_kill(
        db,
        """
        await store.admit("t", 1, {"task_id": "t"}, "m")
        item = await store.finish("t", failed_frame("t", 1, "e"))
        await store.sync()          # the journal's records are in SQLite (the file still holds them)
        store.retire(item.id)       # the hub answered it
        await store.put_task("other", 1, {"task_id": "other"}, "m")  # the delete rides in this write
        """,
    )
    assert len(read_records(journal_path(db))[0]) == 2  # still there: small, not yet emptied
    assert _db_rows(db, "SELECT id FROM outbox") == []
    store = await Store.open(db)
    try:
        assert await store.outbox() == []  # replaying would have put the answered result back
        row = await store.get_task("t")
        assert row is not None and row.state == DONE
    finally:
        await store.close()


async def test_a_torn_last_line_is_dropped_and_the_whole_ones_applied(tmp_path: Path, logs: Logs) -> None:
    db = tmp_path / "s.db"
    _run_then_kill(db, 'await store.admit("t", 1, {"task_id": "t"}, "m")')
    with journal_path(db).open("ab") as f:
        f.write(b'{"seq":2,"op":"admit","row":["u",1,')  # a death in mid-write
    store = await Store.open(db)
    try:
        assert [t.task_id for t in await store.in_flight()] == ["t"]
        (replayed,) = logs.named("journal_replayed")
        assert replayed["records"] == 1 and replayed["torn_bytes"] > 0
        # The torn record's number is given out again: nothing of it was acknowledged.
        await store.admit("v", 1, {"task_id": "v"}, "m")
        assert [r["seq"] for r in read_records(journal_path(db))[0]] == [2]
    finally:
        await store.close()


async def test_a_known_task_id_gets_its_duplicate_check_from_the_file(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.admit("t", 2, {"task_id": "t"}, "m")
        await store.finish("t", failed_frame("t", 2, "e"))
        size = journal_path(store.path).stat().st_size
        assert await store.admit("t", 2, {"task_id": "t"}, "m") is None  # finished here: ignored
        assert await store.admit("t", 1, {"task_id": "t"}, "m") is None  # an older generation too
        assert journal_path(store.path).stat().st_size == size  # not journaled: SQLite decided
        assert await store.admit("t", 3, {"task_id": "t"}, "m") == 1  # a new run: its old result goes
        assert await store.outbox() == []
    finally:
        await store.close()


async def test_reads_see_journaled_writes(tmp_path: Path) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.admit("t", 1, {"task_id": "t"}, "m")
        assert [t.task_id for t in await store.in_flight()] == ["t"]
        await store.finish("t", None)
        row = await store.get_task("t")
        assert row is not None and row.state == DONE
        assert await store.in_flight() == []
    finally:
        await store.close()


async def test_when_the_journal_refuses_a_write_it_goes_to_sqlite_at_once(tmp_path: Path, logs: Logs) -> None:
    """/dev/full refuses every write with ENOSPC, as a full disk does."""
    store = await Store.open(tmp_path / "s.db")
    assert store.journal is not None
    store.journal.close()
    store.journal = journal_module.Journal(Path("/dev/full"), store.journal.seq)
    try:
        assert await store.admit("t", 1, {"task_id": "t"}, "m") == 0
        assert _db_rows(store.path, "SELECT task_id FROM tasks") == [("t",)]  # there before the return
        assert logs.named("journal_append_failed")
        item = await store.finish("t", failed_frame("t", 1, "e"))
        assert item is not None
        assert _db_rows(store.path, "SELECT id FROM outbox") == [(item.id,)]
    finally:
        await store.close()


async def test_a_journal_past_its_size_is_emptied_once_sqlite_has_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "TRUNCATE_AT_BYTES", 100)
    store = await Store.open(tmp_path / "s.db")
    try:
        await store.admit("t", 1, {"task_id": "t", "pad": "x" * 200}, "m")
        path = journal_path(store.path)
        assert path.stat().st_size > 100
        await store.sync()
        assert path.stat().st_size == 0
        assert [t.task_id for t in await store.in_flight()] == ["t"]
    finally:
        await store.close()


async def test_watch_applies_journaled_writes_soon_without_another_write(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    store = await Store.open(tmp_path / "s.db")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.watch)
            await store.admit("t", 1, {"task_id": "t"}, "m")
            assert _db_rows(store.path, "SELECT task_id FROM tasks") == []
            await trio.sleep(1.0)
            async with store._lock:  # (virtual time may jump while the store thread works)
                assert _db_rows(store.path, "SELECT task_id FROM tasks") == [("t",)]
            nursery.cancel_scope.cancel()
    finally:
        await store.close()


def test_the_journal_file_is_private(tmp_path: Path) -> None:
    j = journal_module.Journal(tmp_path / "j", 0)
    try:
        assert j.append({"op": "admit"}) == 1
        assert os.stat(tmp_path / "j").st_mode & 0o777 == 0o600
    finally:
        j.close()


def test_the_chaos_checks_read_the_state_a_restart_will_see(tmp_path: Path) -> None:
    """`read_state` (invariant 6's snapshot after a kill -9) applies the journal, as the next open does."""
    from tests.chaos.procscan import read_state

    db = tmp_path / "sidecar.db"
    _run_then_kill(
        db,
        """
        await store.admit("held", 1, {"task_id": "held"}, "m")
        await store.admit("ended", 1, {"task_id": "ended"}, "m")
        await store.finish("ended", failed_frame("ended", 1, "e"))
        """,
    )
    assert _db_rows(db, "SELECT task_id FROM tasks") == []  # all of it in the journal only
    in_flight, outbox = read_state(tmp_path)
    assert in_flight == [("held", 1, "queued")]
    assert outbox == [("ended", 1, "task_failed")]
    assert len(read_records(journal_path(db))[0]) == 3  # the sidecar's own files are untouched


async def test_a_record_sqlite_cannot_take_is_skipped_not_a_stop_of_the_store(
    tmp_path: Path, logs: Logs
) -> None:
    """A generation over 64 bits, journaled: its owed write raised in every write
    after it and stopped the daemon, and the replay of it every start. The frame
    parser refuses such numbers now; this is the store's own guard."""
    db = tmp_path / "s.db"
    _run_then_kill(
        db,
        """
        await store.admit("huge", 2**70, {"task_id": "huge"}, "m1")
        await store.admit("t1", 1, {"task_id": "t1"}, "m2")
        """,
    )
    store = await Store.open(db)  # the replay skips the one record, applies the other
    try:
        assert [t.task_id for t in await store.in_flight()] == ["t1"]
        (skipped,) = logs.named("journal_record_skipped")
        assert "OverflowError" in skipped["problem"] and skipped["log_level"] == "error"
        # And while running: the bad record is skipped, the writes after it go on.
        await store.admit("huge2", 2**64, {"task_id": "huge2"}, "m3")
        await store.admit("t2", 1, {"task_id": "t2"}, "m4")
        await store.finish("t1", failed_frame("t1", 1, "boom"))
        assert [t.task_id for t in await store.in_flight()] == ["t2"]
        assert [i.task_id for i in await store.outbox()] == ["t1"]
        assert len(logs.named("journal_record_skipped")) == 2
    finally:
        await store.close()
    again = await Store.open(db)
    try:
        assert [t.task_id for t in await again.in_flight()] == ["t2"]
    finally:
        await again.close()


async def test_a_frame_goes_into_the_journal_as_it_is_and_old_records_still_replay(tmp_path: Path) -> None:
    """The frame's text is written as the line's `frame` object, not escaped into a
    string a second time (for 64 KB of output that was 0.5 ms of the loop's time).
    Lines from before (the text inside `row` / `item`) replay as they did."""
    db = tmp_path / "s.db"
    # Built in the child too: as a literal it would be too long for a command line.
    output = "line\n" * 13_000 + 'quote " and backslash \\ and é'
    _run_then_kill(
        db,
        r"""
        output = "line\n" * 13_000 + "quote \" and backslash \\ and é"
        await store.admit("t1", 2, {"task_id": "t1", "description": output}, "m1")
        await store.finish("t1", {"type": "task_complete", "task_id": "t1", "generation": 2,
                                  "result": {"output": output}})
        """,
    )
    lines = journal_path(db).read_bytes().splitlines()
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)
        assert isinstance(record["frame"], dict)  # an object, not a string holding one
        assert b"\\\\n" not in line  # each newline escaped once: "\n", never "\\n"
    # A line as the previous version wrote it: the frame's text inside the row.
    old = {"seq": 3, "op": "admit", "row": ["t0", 1, json.dumps({"task_id": "t0"}), "queued", "m0", 1.0]}
    with journal_path(db).open("a") as f:
        f.write(json.dumps(old) + "\n")
    store = await Store.open(db)
    try:
        tasks = {t.task_id: t for t in await store.in_flight()}
        assert set(tasks) == {"t0"} and tasks["t0"].frame == {"task_id": "t0"}
        (item,) = await store.outbox()
        assert (item.task_id, item.generation, item.frame["result"]["output"]) == ("t1", 2, output)
        row = await store.get_task("t1")
        assert row is not None and row.frame["description"] == output and row.state == DONE
    finally:
        await store.close()
