"""Bounded capture of a child's output, with the full text in a log file.

A task may print gigabytes; the result sent to the hub keeps only the first
and the last part (`cap_bytes` in all), the log file keeps everything.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import BinaryIO

# The log is written through a buffered file in the Trio thread. Writes land in
# the page cache (a memcpy, microseconds per 1 MiB block) and never wait for
# the disk, so a worker thread per write would cost more than it saves; the
# buffer turns many small line writes into few system calls.
_LOG_BUFFER = 256 * 1024


class OutputCapture:
    """Keeps head + tail of everything written (at most `cap_bytes`), logs it all.

    Memory is bounded by `cap_bytes` plus the log buffer, whatever the child
    prints. The log file is opened once (append mode) and closed by `close()`
    or by leaving the `with` block; it is created with its parent directory.
    """

    def __init__(self, cap_bytes: int, log_path: Path | None) -> None:
        self.cap_bytes = max(0, cap_bytes)
        self._head_cap = self.cap_bytes // 2
        self._tail_cap = self.cap_bytes - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.total_bytes = 0
        self._log: BinaryIO | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(log_path, "ab", buffering=_LOG_BUFFER)  # closed in close()

    # -- writing

    def write(self, text: str, *, keep: bool = True) -> None:
        """Append `text` to the log and, if `keep`, to the captured head/tail."""
        data = text.encode("utf-8", "surrogatepass")
        self.log_bytes(data)
        if keep:
            self._keep(data)

    def log_bytes(self, data: bytes) -> None:
        """Append raw bytes to the log file only (headers, other streams)."""
        if self._log is not None and data:
            self._log.write(data)

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
        if self._log is not None:
            self._log.flush()

    def close(self) -> None:
        """Flush and close the log file; safe to call twice."""
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def __enter__(self) -> OutputCapture:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
