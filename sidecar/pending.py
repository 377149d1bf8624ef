"""The store's outbox in memory: which stored results await the hub's answer.

The outbox table is the truth across restarts; this mirror is the truth while
the process runs, so delivering a result costs no read of the database. Only
the store changes it, in step with the table: an entry is added once the
result's transaction has committed, and removed as soon as the result is
retired or dropped (even when that delete is still owed to the disk).

Frames are kept for the newest results up to `frame_budget` bytes of JSON;
older entries (and every entry loaded at start-up) keep only their row id,
and the store reads their frame when one is about to be sent. So the memory
it holds is bounded whatever the backlog (1 MiB results by the thousand
after a long outage).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

FRAME_BUDGET_BYTES = 8 * 1024 * 1024


@attrs.frozen
class OutboxItem:
    id: int
    task_id: str
    generation: int
    frame: dict[str, Any]


@attrs.define
class _Entry:
    task_id: str
    generation: int
    frame: dict[str, Any] | None
    size: int


class PendingResults:
    """Stored, unanswered results by row id, in the order they were stored."""

    def __init__(self, frame_budget: int = FRAME_BUDGET_BYTES) -> None:
        self._entries: dict[int, _Entry] = {}
        self._frame_bytes = 0
        self.frame_budget = frame_budget

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._entries

    @property
    def frame_bytes(self) -> int:
        """JSON bytes of the frames held in memory (at most `frame_budget`)."""
        return self._frame_bytes

    def load(self, rows: Iterable[tuple[int, str, int]]) -> None:
        """Entries for rows found at start-up (frames read when needed)."""
        for item_id, task_id, generation in rows:
            self._entries[item_id] = _Entry(task_id, generation, None, 0)

    def add(self, item: OutboxItem, size: int) -> None:
        """A result just committed; its frame is kept if the budget allows."""
        keep = self._frame_bytes + size <= self.frame_budget
        self._entries[item.id] = _Entry(item.task_id, item.generation, item.frame if keep else None, size)
        if keep:
            self._frame_bytes += size

    def head(self, limit: int | None) -> list[tuple[int, _Entry]]:
        entries = list(self._entries.items())
        return entries if limit is None else entries[:limit]

    def remove(self, item_id: int) -> None:
        entry = self._entries.pop(item_id, None)
        if entry is not None and entry.frame is not None:
            self._frame_bytes -= entry.size

    def relabel(self, task_id: str, generation: int) -> int:
        """A task's entries below `generation` now carry it (their frames too); how many."""
        count = 0
        for entry in self._entries.values():
            if entry.task_id == task_id and entry.generation < generation:
                entry.generation = generation
                if entry.frame is not None:
                    entry.frame = {**entry.frame, "generation": generation}
                count += 1
        return count

    def remove_task(self, task_id: str, below_generation: int | None = None) -> int:
        """Drop a task's entries (those below a generation, if given); how many went."""
        gone = [
            i
            for i, e in self._entries.items()
            if e.task_id == task_id and (below_generation is None or e.generation < below_generation)
        ]
        for item_id in gone:
            self.remove(item_id)
        return len(gone)
