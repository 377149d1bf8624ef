"""Bounded capture of a child's output, with the full text in a log file.

A task may print gigabytes; the result sent to the hub keeps only the first
and the last part (`cap_bytes` in all), the log file keeps everything the disk
takes. The log is best effort: when the disk refuses a write (full, quota, I/O
error) the log stops growing there and ends with a line saying it was cut
short; the task and its captured head and tail carry on.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol, TypeVar

import trio

from .log import get_logger

log = get_logger("sidecar.output")

# The log is written from the Trio thread through our own buffer. Writes land in
# the page cache (a memcpy, microseconds per 1 MiB block) and never wait for
# the disk, so a worker thread per write would cost more than it saves; the
# buffer turns many small line writes into few system calls. Unbuffered file
# underneath, so that after a refused write we know exactly what is on disk.
_LOG_BUFFER = 256 * 1024


_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC

T = TypeVar("T")


class OffLoop(Protocol):
    """Runs a short blocking call off the event loop and returns what it returned."""

    async def __call__(self, fn: Callable[[], T], /) -> T: ...


async def in_worker_thread(fn: Callable[[], T], /) -> T:
    """The default `OffLoop`: a trio worker thread."""
    return await trio.to_thread.run_sync(fn)


def _open_append_fd(path: Path) -> int:
    """The log's file descriptor, its directory made if missing.

    One system call in the common case: in a worker thread, each call releases
    the GIL and takes it back from the event loop, a futex round trip or two.
    """
    try:
        return os.open(path, _APPEND, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, _APPEND, 0o666)


def _as_file(fd: int) -> BinaryIO:
    """The file object over `fd` (an fstat and a seek of the open file, never a wait on the disk)."""
    try:
        return os.fdopen(fd, "ab", buffering=0)  # closed by OutputCapture.close()
    except BaseException:
        os.close(fd)
        raise


def _open_append(path: Path) -> BinaryIO:
    return _as_file(_open_append_fd(path))


class OutputCapture:
    """Keeps head + tail of everything written (at most `cap_bytes`), logs it all.

    Memory is bounded by `cap_bytes` plus the log buffer, whatever the child
    prints. The log file is opened once (append mode), when first needed or by
    `open_log`, and closed by `close()` or by leaving the `with` block; it is
    created with its parent directory. A file that cannot be opened leaves the
    capture without a log (`log_error` says why); the capture carries on.

    Creating a file can wait on the disk (a cold inode table: 0.3-0.9 ms per
    new file measured on this project's VMs, against 15 us warm), so a task
    opens its log with `open_log` off the loop while its child starts, not on
    the way to its result. Output that arrives meanwhile stays in the
    buffer; `wait_room` holds the writer back once the buffer is full. A
    capture closed while its `open_log` is still under way (one run in a
    nursery that outlives the task: the daemon's `handoff`) leaves the last
    write and the close to `open_log`, so a short task's end does not wait
    for its log's create.
    """

    def __init__(self, cap_bytes: int, log_path: Path | None, log_max_bytes: int | None = None) -> None:
        self.cap_bytes = max(0, cap_bytes)
        # The log file's bound (None: none): past it the log is cut short, saying so.
        self.log_max_bytes = log_max_bytes
        self._head_cap = self.cap_bytes // 2
        self._tail_cap = self.cap_bytes - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.total_bytes = 0
        self.log_path = log_path
        # Why the log was cut short (None while it is whole).
        self.log_error: str | None = None
        self._log: BinaryIO | None = None
        self._logged = 0
        self._buf = bytearray()
        # None: not opened yet; an Event while a worker thread opens it; True once tried.
        self._open_state: trio.Event | bool | None = None if log_path is not None else True
        self._close_when_opened = False

    # -- opening

    async def open_log(self, off_loop: OffLoop = in_worker_thread) -> None:
        """Open (create) the log file through `off_loop` (a worker thread by default); idempotent."""
        run = self.start_open(off_loop)
        if run is not None:
            await run()

    def start_open(self, off_loop: OffLoop = in_worker_thread) -> Callable[[], Awaitable[None]] | None:
        """The log is being opened from now on; the function that opens it (run it once,
        in any nursery), or None if it is open or opening already.

        The open is shielded (a create is short, and the log of a cancelled task
        is still written). If the capture is closed meanwhile, the open writes
        what it holds and closes the file.
        """
        if self._open_state is not None:
            return None
        assert self.log_path is not None
        opened = trio.Event()
        self._open_state = opened
        return partial(self._open, off_loop, opened)

    async def _open(self, off_loop: OffLoop, opened: trio.Event) -> None:
        assert self.log_path is not None
        fd: int | None = None
        try:
            with trio.CancelScope(shield=True):
                fd = await off_loop(partial(_open_append_fd, self.log_path))
        except Exception as exc:  # a stopped store thread too: the log is best effort
            self._unavailable(exc)
        finally:
            self._open_state = True
            try:
                if fd is not None:
                    try:
                        self._adopt(_as_file(fd))
                    except OSError as exc:
                        self._unavailable(exc)
                if self._close_when_opened:
                    self.close()
            finally:
                opened.set()  # a writer held back by wait_room goes on, whatever happened

    async def wait_room(self) -> None:
        """Wait while the buffer is full and the log is still being opened."""
        state = self._open_state
        if isinstance(state, trio.Event) and len(self._buf) >= _LOG_BUFFER:
            await state.wait()
            if len(self._buf) >= _LOG_BUFFER:
                self._write_out()

    def _open_now(self) -> None:
        """Open the log file here and now (a capture used without `open_log`)."""
        assert self.log_path is not None
        self._open_state = True
        try:
            f = _open_append(self.log_path)
        except OSError as exc:
            self._unavailable(exc)
            return
        self._adopt(f)

    def _adopt(self, f: BinaryIO | None) -> None:
        self._log = f
        if f is not None:
            self._logged = f.seek(0, os.SEEK_END)

    def _unavailable(self, exc: Exception) -> None:
        self.log_error = getattr(exc, "strerror", None) or str(exc)
        self._buf.clear()
        log.warning("task_log_unavailable", path=str(self.log_path), error=self.log_error)

    # -- writing

    def write(self, text: str, *, keep: bool = True) -> None:
        """Append `text` to the log and, if `keep`, to the captured head/tail."""
        data = text.encode("utf-8", "surrogatepass")
        self.log_bytes(data)
        if keep:
            self._keep(data)

    def log_bytes(self, data: bytes) -> None:
        """Append raw bytes to the log file only (headers, other streams)."""
        if data and self.log_error is None and (self._log is not None or self._open_state is not True):
            self._buf += data
            if len(self._buf) >= _LOG_BUFFER and not isinstance(self._open_state, trio.Event):
                self._write_out()

    def _write_out(self) -> None:
        """Write the buffer to the file; on a refused write, cut the log short there."""
        if self._open_state is None and self._buf:
            self._open_now()
        f = self._log
        if f is None:
            return
        limit = self.log_max_bytes
        full = limit is not None and self._logged + len(self._buf) > limit
        if limit is not None and full:
            del self._buf[max(0, limit - self._logged) :]
        view = memoryview(self._buf)
        try:
            while view:
                n = f.write(view)
                if not n:
                    raise OSError(0, "the file takes no more data")
                view = view[n:]
                self._logged += n
        except OSError as exc:
            view.release()
            self._cut_short(f, exc)
            return
        view.release()
        self._buf.clear()
        if full:
            self._cut_short(f, OSError(errno.EFBIG, f"the log reached task_log_max_bytes ({limit} bytes)"))

    def _cut_short(self, f: BinaryIO, exc: OSError) -> None:
        """Stop logging; end the log with a line saying so (best effort: the disk
        may have no room left even for it, so one block of the log's end gives way)."""
        self._log = None
        self._buf.clear()
        self.log_error = exc.strerror or str(exc)
        note = f"\n=== log cut short: {self.log_error}; the rest of the output is not logged"
        try:
            try:
                f.write(f"{note}\n".encode())
            except OSError:
                block = os.fstat(f.fileno()).st_blksize or 4096
                keep = max(0, self._logged - 200) // block * block
                os.ftruncate(f.fileno(), keep)
                f.write(f"{note} (nor the {self._logged - keep} bytes before this line)\n".encode())
        except OSError:
            pass
        try:
            f.close()
        except OSError:
            pass
        log.warning(
            "task_log_cut_short",
            path=str(self.log_path),
            error=self.log_error,
            logged_bytes=self._logged,
        )

    def _keep(self, data: bytes) -> None:
        self.total_bytes += len(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
            if not data:
                return
        if self._tail_cap == 0:
            return
        if len(data) >= self._tail_cap:
            self._tail = bytearray(data[-self._tail_cap :])
        else:
            self._tail += data
            excess = len(self._tail) - self._tail_cap
            if excess > 0:
                del self._tail[:excess]

    # -- reading

    @property
    def truncated(self) -> bool:
        return self.total_bytes > len(self._head) + len(self._tail)

    @property
    def omitted_bytes(self) -> int:
        return self.total_bytes - len(self._head) - len(self._tail)

    def text(self) -> str:
        """Head + tail; when something was cut, a marker says how many bytes."""
        if not self.truncated:
            return (bytes(self._head) + bytes(self._tail)).decode("utf-8", "replace")
        # A cut may split a multi-byte character: drop the broken edges quietly.
        head = bytes(self._head).decode("utf-8", "ignore")
        tail = bytes(self._tail).decode("utf-8", "ignore")
        return f"{head}\n…[{self.omitted_bytes} bytes omitted]…\n{tail}"

    def tail_text(self, max_bytes: int) -> str:
        """The last `max_bytes` of what was kept (for error messages)."""
        data = bytes(self._head) + bytes(self._tail) if not self.truncated else bytes(self._tail)
        return data[-max_bytes:].decode("utf-8", "ignore")

    # -- closing

    def flush(self) -> None:
        self._write_out()

    def close(self) -> None:
        """Flush and close the log file; never raises, safe to call twice.

        While `open_log` is under way, that is left to it (see the class doc).
        """
        if isinstance(self._open_state, trio.Event):
            self._close_when_opened = True
            return
        if self._open_state is None and self.log_path is not None:
            self._open_now()  # a log is written even for a task that printed nothing
        self._write_out()
        f, self._log = self._log, None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                self.log_error = exc.strerror or str(exc)
                log.warning("task_log_cut_short", path=str(self.log_path), error=self.log_error)

    def __enter__(self) -> OutputCapture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
