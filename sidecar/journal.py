"""The store's intake journal: the two writes on a task's path, durable without a thread hop.

A task's row must be durable before `task_accepted`, and its result before it
is sent. Through SQLite each is a hand-off to the store thread and back:
~0.3 ms on this class of machine, most of it two thread wake-ups, where the
write itself is ~0.1 ms. The journal makes the same promise with one
`write(2)` from the event loop (~10-20 us): a line appended to a file is in
the kernel's page cache when the call returns, so it survives the process's
death (kill -9, OOM) exactly as a commit in SQLite's WAL with
`synchronous=NORMAL` does; neither survives a power cut before the next
writeback (docs/benchmarks.md, "Durability").

The store then applies each record to SQLite soon after, in a transaction
of its own or riding in the next one (`Store._owed`), and that transaction
also records the record's sequence number (`meta.journal_applied`). At the
next open the store replays, in order, every record above that number: a
record is applied exactly once, whether the process died before, during or
after its transaction. A line cut short by a death in mid-write (or by a full
disk) is not a record: it was never acknowledged to anyone, so it is dropped.

The file is emptied when every record in it has been applied and it has
grown past `TRUNCATE_AT_BYTES`, and at a clean close.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

# Emptied (once everything in it is applied) when it is larger than this.
TRUNCATE_AT_BYTES = 1 << 20
# Past this, the store stops journaling (its writes go to SQLite directly)
# until the journal has been applied and emptied: a bound if SQLite lags.
MAX_BYTES = 64 << 20


def journal_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + "-intake")


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The whole records in the file, in order, and how many bytes at its end were not one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    records: list[dict[str, Any]] = []
    end = 0
    while (newline := data.find(b"\n", end)) != -1:
        try:
            record = json.loads(data[end:newline])
        except ValueError:
            break  # not a line we wrote whole: nothing after it was acknowledged either
        if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
            break
        records.append(record)
        end = newline + 1
    return records, len(data) - end


class Journal:
    """The open journal file, appended to from the event loop's thread only."""

    def __init__(self, path: Path, last_seq: int) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.size = os.fstat(self._fd).st_size
        self.seq = last_seq  # the last sequence number given out
        self.applied = last_seq  # the last one SQLite has (committed)

    @property
    def usable(self) -> bool:
        return self._fd >= 0 and self.size < MAX_BYTES

    @property
    def unapplied(self) -> bool:
        """Some record given out is not yet committed to SQLite."""
        return self.applied < self.seq

    def append(self, record: dict[str, Any], frame_text: str | None = None) -> int:
        """Write one record (its `seq` added); its sequence number. OSError if the disk refuses.

        `frame_text`, the text `json.dumps` made of a frame (one line, always),
        goes in as the record's `frame` as it is: not escaped into a string a
        second time, which for a result with 64 KB of output cost 0.5 ms of the
        event loop's time on the result's way out. A write cut short (a full
        disk) is taken back, so the file never holds half a record followed by
        whole ones.
        """
        seq = self.seq + 1
        line = json.dumps({"seq": seq, **record}, separators=(",", ":"))
        if frame_text is not None:
            line = f'{line[:-1]},"frame":{frame_text}}}'
        data = (line + "\n").encode()
        try:
            written = os.write(self._fd, data)
        except OSError:
            self._take_back()
            raise
        if written != len(data):
            self._take_back()
            raise OSError(errno.ENOSPC, "the state disk took only part of a journal record")
        self.size += written
        self.seq = seq
        return seq

    def _take_back(self) -> None:
        try:
            os.ftruncate(self._fd, self.size)
        except OSError:
            # The file's end is unknown now: journal no more (writes go to SQLite).
            self.close()

    def applied_up_to(self, seq: int) -> None:
        """SQLite has committed every record up to `seq`: empty the file if that is all and it is big."""
        self.applied = max(self.applied, seq)
        if self.applied == self.seq and self.size > TRUNCATE_AT_BYTES:
            self.empty()

    def empty(self) -> None:
        """Drop every record (the caller knows SQLite has them all)."""
        if self._fd < 0 or self.size == 0:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            return  # kept: replaying applied records is skipped by their sequence numbers
        self.size = 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
