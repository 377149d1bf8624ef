"""One sidecar per state dir: an exclusive `flock` on `<state_dir>/sidecar.lock`.

Two daemons on one state dir each take the other's tasks for a dead process's
leftovers: the second's start-up recovery kills the first's task processes,
and the two replace each other's hub session in a loop. The lock is held for
the life of the process (the kernel lets go of it when the process dies, a
`kill -9` included), and the file names the holder's pid for the message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "sidecar.lock"


class StateDirError(Exception):
    """The state dir cannot be used (made, written, or it is another sidecar's)."""


def lock_state_dir(state_dir: Path) -> int:
    """Make `state_dir` if needed and lock it for this process; the lock's fd (keep it open)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StateDirError(f"state_dir {str(state_dir)!r} cannot be used: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StateDirError(
            f"state_dir {str(state_dir)!r} is in use by another sidecar (pid {holder}):"
            " two sidecars must never share one (give each its own state_dir)"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StateDirError(f"state_dir {str(state_dir)!r} cannot be locked: {exc.strerror or exc}") from exc
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
