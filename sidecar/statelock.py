"""One sidecar per state dir: an exclusive `flock` on the state dir itself.

Two daemons on one state dir each take the other's tasks for a dead process's
leftovers: the second's start-up recovery kills the first's task processes,
and the two replace each other's hub session in a loop. The lock is taken on
the directory (no file to create, so a full disk still lets a sidecar start
and wait for space) and held for the life of the process: the kernel lets go
of it when the process dies, a `kill -9` included. `sidecar.lock` names the
holder's pid for the message, where the disk takes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

PID_FILE = "sidecar.lock"


class StateDirError(Exception):
    """The state dir cannot be used (made, opened, or it is another sidecar's)."""


def lock_state_dir(state_dir: Path) -> int:
    """Make `state_dir` if needed and lock it for this process; the lock's fd (keep it open)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StateDirError(f"state_dir {str(state_dir)!r} cannot be used: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = (state_dir / PID_FILE).read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise StateDirError(
            f"state_dir {str(state_dir)!r} is in use by another sidecar (pid {holder}):"
            " two sidecars must never share one (give each its own state_dir)"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise StateDirError(f"state_dir {str(state_dir)!r} cannot be locked: {exc.strerror or exc}") from exc
    with contextlib.suppress(OSError):  # only the message needs it (a full disk may refuse it)
        (state_dir / PID_FILE).write_text(f"{os.getpid()}\n")
    return fd
