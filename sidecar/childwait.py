"""Waiting for a child and killing it, without a worker thread (used by `procs.run_child`).

`ChildExit` waits on a pidfd (polling where there is none) and reaps; on
cancellation `wait_or_kill` signals the child's group, waits the grace, then
SIGKILLs it, and only then lets the cancellation go on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import attrs
import trio

from .proctree import kill_group


@attrs.define
class KillState:
    first_signal: int
    grace_s: float
    signalled: bool = False
    killed: bool = False


async def deliver_cancel(state: KillState, pid: int) -> None:
    # Runs shielded while the direct child is alive, and is cancelled as soon as
    # it exits. Must not raise: kill_group never does.
    state.signalled = True
    kill_group(pid, state.first_signal)
    await trio.sleep(state.grace_s)
    state.killed = True
    kill_group(pid, signal.SIGKILL)


class ChildExit:
    """Waits for a child's exit and reaps it, without a worker thread.

    Linux gives a pidfd that becomes readable when the child exits; the child
    is then reaped at once by `Popen.wait`. Without pidfds (old kernels) the
    child is polled with a growing pause (1 ms to 50 ms).
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            self._pidfd = None

    async def wait(self, *, kill_group_first: bool = False) -> int:
        """The exit status, once the child is reaped.

        With `kill_group_first`, the child's process group is SIGKILLed after
        it exits and before it is reaped: while the leader is a zombie its pid,
        the group's number, cannot be given to another process, so the kill
        reaches only what is left of our group (after the reap, a number taken
        again by a stranger's group could be hit).
        """
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)  # readable once it has exited
            if kill_group_first:
                kill_group(self.popen.pid, signal.SIGKILL)
            return self.popen.wait()
        delay = 0.001
        while (code := self.popen.poll()) is None:
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return code

    def close(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def wait_or_kill(exit_: ChildExit, state: KillState, *, kill_group_first: bool) -> int:
    """Wait for the child; on cancellation signal its group, wait for it, re-raise.

    What is left of the group is SIGKILLed before the reap on cancellation, and
    after a normal exit too with `kill_group_first` (see `ChildExit.wait`).
    """
    try:
        return await exit_.wait(kill_group_first=kill_group_first)
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(deliver_cancel, state, exit_.popen.pid)
                await exit_.wait(kill_group_first=True)
                nursery.cancel_scope.cancel()
        raise


async def feed_stdin(fd: int, data: bytes) -> None:
    """Write `data` to the child's stdin and close it; a child that stops reading is fine."""
    stream = trio.lowlevel.FdStream(fd)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(data)
