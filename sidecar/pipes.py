"""Reading a child's output pipes: UTF-8 decoding, lines or blocks of lines.

`run_child` (procs.py) runs one `PipeReader` per pipe while the child lives and
for at most its drain grace after the direct child exits; `salvage` then
passes on what the pipes still hold, so output the child wrote before it
exited is never lost to a reader that ran late.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import os
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import trio

# A line longer than this (in characters) without a newline is passed on in pieces.
MAX_LINE_CHARS = 64 * 1024
# Bytes asked of the pipe per read. The pipe itself is enlarged to this size
# where the kernel allows, so one wake-up moves up to 1 MiB instead of 64 KiB.
READ_SIZE = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# At most this much is read from a pipe after a cut-short drain: what the child
# left there is at most a pipe's capacity; more comes from a descendant still writing.
_SALVAGE_MAX_BYTES = 4 * READ_SIZE

LineCallback = Callable[[str], Awaitable[None]]


def enlarge_pipe(stream: trio.abc.ReceiveStream) -> None:
    fileno = getattr(stream, "fileno", None)
    if fileno is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(fileno(), _F_SETPIPE_SZ, READ_SIZE)


class PipeReader:
    """Reads one output pipe to EOF and passes its text on (see `run_child`).

    Its state (the decoder, a partial line, text decoded but not yet passed on)
    outlives a drain cut short at `drain_grace_s`, so that `salvage` can pass on
    what the pipe already holds: everything the direct child wrote before it
    exited is in the pipe by then, and is output however late the reader got
    to run (a starved event loop, a callback waiting on a full channel).
    """

    def __init__(
        self, stream: trio.lowlevel.FdStream, callback: LineCallback | None, batch_lines: bool
    ) -> None:
        self.stream = stream
        self.callback = callback
        self.batch_lines = batch_lines
        self.eof = False
        self.salvaged_bytes = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self._ready: deque[str] = deque()

    async def pump(self) -> None:
        enlarge_pipe(self.stream)
        while not self.eof:
            data = await self.stream.receive_some(READ_SIZE)
            self.eof = not data
            self._take(data, final=self.eof)
            await self._pass_on()

    async def salvage(self) -> None:
        """Pass on what the pipe holds right now, without waiting for more.

        The stream then counts as ended: a pipe still held open by a descendant
        is not waited for (that is what the drain grace bounds).
        """
        while not self.eof and self.salvaged_bytes < _SALVAGE_MAX_BYTES:
            try:
                data = os.read(self.stream.fileno(), READ_SIZE)
            except OSError:  # BlockingIOError: nothing more in it now
                break
            self.salvaged_bytes += len(data)
            self.eof = not data
            self._take(data, final=self.eof)
        if not self.eof:
            self._take(b"", final=True)
        await self._pass_on()

    def _take(self, data: bytes, *, final: bool) -> None:
        """Decode `data` into the pieces the callback gets; `final`: nothing follows."""
        if self.callback is None:
            return
        text = self._pending + self._decoder.decode(data, final=final)
        self._pending = ""
        if final:  # what is left holds no newline (and fits MAX_LINE_CHARS)
            if text:
                self._ready.append(text)
            return
        if self.batch_lines:
            cut = text.rfind("\n") + 1
            if cut:
                self._ready.append(text[:cut])
                text = text[cut:]
            if len(text) >= MAX_LINE_CHARS:
                self._ready.append(text)
                text = ""
            self._pending = text
            return
        lines = text.split("\n")
        pending = lines.pop()
        for line in lines:
            while len(line) > MAX_LINE_CHARS:
                self._ready.append(line[:MAX_LINE_CHARS])
                line = line[MAX_LINE_CHARS:]
            self._ready.append(line)
        while len(pending) >= MAX_LINE_CHARS:
            self._ready.append(pending[:MAX_LINE_CHARS])
            pending = pending[MAX_LINE_CHARS:]
        self._pending = pending

    async def _pass_on(self) -> None:
        # A piece counts as passed on once its callback has started: a callback
        # cut short in its await has already taken it (the shell executor's
        # capture is written before its progress event).
        while self.callback is not None and self._ready:
            await self.callback(self._ready.popleft())


async def salvage(readers: Iterable[PipeReader], bound_s: float) -> None:
    """After a drain cut short: pass on what the pipes hold (shielded, bounded by `bound_s`).

    The reads never wait; the bound is for callbacks that do (a full channel).
    """
    with trio.CancelScope(shield=True), trio.move_on_after(bound_s):
        for reader in readers:
            await reader.salvage()
