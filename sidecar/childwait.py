"""Waiting for a child and stopping its group, without a worker thread (used by `procs.run_child`).

Until it is reaped, an exited child is a zombie that keeps its pid, which is
also its process group's number (every child leads a session of its own): a
signal to that group then reaches only what is left of our group. After the
reap the number may be given to a stranger, so every group kill happens
before it. `ChildExit` waits for the exit on a pidfd (polling `waitid` with
WNOWAIT where there is none) and reaps only when told to.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess

import attrs
import trio

from .proctree import alive, group_alive, kill_group, signal_marked


@attrs.define
class KillState:
    first_signal: int
    grace_s: float
    # The task's marker: processes carrying it outside the group (a descendant
    # that started its own session) are stopped with the group, in its grace.
    marker: str | None = None
    signalled: bool = False
    killed: bool = False


class ChildExit:
    """A child's exit, waited for without reaping it (see the module doc)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        try:
            self._pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            self._pidfd = None

    async def exited(self) -> None:
        """Until the child has exited (it stays a zombie until `reap`)."""
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
            return
        delay = 0.001
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT  # WNOHANG: never blocks
        while os.waitid(os.P_PID, self.popen.pid, flags) is None:  # noqa: ASYNC222
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def reap(self) -> int:
        """The exit status; only once `exited` has returned."""
        return self.popen.wait()

    def close(self) -> None:
        if self._pidfd is not None:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


async def wait_or_kill(exit_: ChildExit, state: KillState, *, kill_group_first: bool) -> int:
    """Wait for the child and reap it; on cancellation stop its group first, then re-raise.

    After a normal exit, with `kill_group_first`, what is left of the group is
    SIGKILLed before the reap. On cancellation the group gets `first_signal`,
    then up to `grace_s` to be gone, the direct child and the rest of the group
    alike (a shell that dies at SIGTERM does not cut its children's grace
    short), then SIGKILL, and only then the reap.
    """
    try:
        await exit_.exited()
    except trio.Cancelled:
        with trio.CancelScope(shield=True):
            await _stop_group(exit_, state)
        raise
    if kill_group_first:
        kill_group(exit_.popen.pid, signal.SIGKILL)
    return exit_.reap()


async def _stop_group(exit_: ChildExit, state: KillState) -> None:
    pid = exit_.popen.pid
    state.signalled = True
    kill_group(pid, state.first_signal)  # never raises
    # One grace for all: a marked descendant in a session of its own gets the
    # first signal now and SIGKILL with the group, rather than a grace of its
    # own after it (it may hold the output pipes, which the drain waits for).
    marker = state.marker
    outside = signal_marked((marker,), state.first_signal, outside_group=pid) if marker else set()
    with trio.move_on_after(state.grace_s) as grace:
        await exit_.exited()
        delay = 0.005
        # The zombie leader keeps the group's number ours meanwhile.
        while group_alive(pid) or any(alive(p) for p in outside):
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)
    if grace.cancelled_caught:
        state.killed = True
    kill_group(pid, signal.SIGKILL)
    if marker:
        signal_marked((marker,), signal.SIGKILL)
    await exit_.exited()
    exit_.reap()


async def feed_stdin(fd: int, data: bytes) -> None:
    """Write `data` to the child's stdin and close it; a child that stops reading is fine."""
    stream = trio.lowlevel.FdStream(fd)
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(data)
