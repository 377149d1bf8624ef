"""The progress sender that executors write events into.

Executors never talk to the hub: they put `ProgressEvent`s on a bounded trio
memory channel, and one batcher task forwards them (see `batcher.py`).
"""

from __future__ import annotations

from typing import Any

import trio

from .messages import ProgressEvent

DEFAULT_CHANNEL_SIZE = 1024


class ProgressSender:
    """Sends progress events for one task into the shared bounded channel."""

    def __init__(self, channel: trio.MemorySendChannel[ProgressEvent], task_id: str) -> None:
        self._channel = channel
        self.task_id = task_id

    async def emit(
        self,
        event_type: str,
        text: str,
        *,
        tokens_so_far: int | None = None,
        model: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Queue one event; waits only while the batcher's channel is full.

        `extra` fields travel beside the standard ones (tool_call events).
        """
        event = ProgressEvent(
            self.task_id, event_type, text, tokens_so_far=tokens_so_far, model=model, extra=extra
        )
        try:
            await self._channel.send(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The batcher is gone (shutdown): progress is best-effort, results are not.
            pass

    def emit_nowait(
        self,
        event_type: str,
        text: str,
        *,
        tokens_so_far: int | None = None,
        model: str | None = None,
    ) -> bool:
        """Queue one event without a checkpoint; False if the channel is full.

        For hot loops (a token per NDJSON line): yielding to the scheduler per
        event costs more than the event. The caller must still checkpoint
        regularly (it does, on every socket read) and fall back to `emit`.
        """
        event = ProgressEvent(self.task_id, event_type, text, tokens_so_far=tokens_so_far, model=model)
        try:
            self._channel.send_nowait(event)
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return True


def open_progress(
    size: int = DEFAULT_CHANNEL_SIZE,
) -> tuple[trio.MemorySendChannel[ProgressEvent], trio.MemoryReceiveChannel[ProgressEvent]]:
    """A bounded channel for progress events."""
    return trio.open_memory_channel[ProgressEvent](size)
