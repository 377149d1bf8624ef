"""The one place that runs a child process.

Every child gets its own session (so its own process group), `stdin` from
/dev/null unless bytes are given, each output pipe drained in its own task,
and an environment marker (`SIDECAR_TASK_MARKER`) that all its descendants
inherit. When the child is cancelled the whole group gets `first_signal`, then
SIGKILL `grace_s` later. Whatever happens, once the direct child is gone the
group is SIGKILLed once more and every process still carrying the marker is
killed too: that is what catches grandchildren that ignored SIGTERM after the
shell died, and those that started a session of their own (`setsid`), which a
group kill never reaches. See design.md, "Known pitfalls".
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

import attrs
import trio

from .childwait import ChildExit, KillState, feed_stdin, wait_or_kill
from .log import get_logger
from .pipes import MAX_LINE_CHARS as MAX_LINE_CHARS  # re-exported: the callbacks' contract
from .pipes import LineCallback, PipeReader, salvage
from .proctree import (
    MARKER_VAR,
    agent_marker_prefix,
    alive,
    become_subreaper,
    find_marked,
    group_alive,
    group_members,
    kill_group,
    kill_marked,
    kill_marked_any,
    kill_strays,
    running_children,
    signal_marked,
    task_marker,
)

log = get_logger(__name__)

# After cleanup, how long we wait for SIGKILLed processes to be gone (not zombies).
_REAP_WAIT_S = 2.0


@attrs.frozen
class ChildResult:
    """How a child ended.

    `returncode` follows Popen: negative for death by a signal. `signalled`: we
    sent `first_signal` (only on cancellation); `killed`: we sent SIGKILL after
    the grace period. `drain_timed_out`: a pipe had not reached its end
    `drain_grace_s` after the direct child exited (a descendant held it open;
    what it held then was still passed on). `strays_killed`: how
    many processes the final sweep (group + marker) had to kill.
    """

    returncode: int
    signalled: bool
    killed: bool
    duration_s: float
    drain_timed_out: bool = False
    strays_killed: int = 0


# --------------------------------------------------------------------------
# Environments


def child_env(
    base: Mapping[str, str],
    marker: str,
    *,
    drop: Iterable[str] = (),
    secrets: Iterable[str] = (),
) -> dict[str, str]:
    """The environment for a child: `base` minus anything secret, plus the marker.

    Removed: every `SIDECAR_*` variable (the hub token travels as
    SIDECAR_TOKEN), every name in `drop`, and every variable whose value equals
    a secret or, for secrets of 8 characters or more, contains one (e.g.
    `AUTH=Bearer <token>`).
    """
    drop_key, secrets_key = tuple(drop), tuple(s for s in secrets if s)
    if base is os.environ:
        # Filtering our own environment costs ~40 us a call, twice a task; the
        # result depends only on its raw bytes, which say when it changed
        # (CPython's `_data`, 1 us to read, else the public bytes view, 12 us).
        data = getattr(os.environ, "_data", None)
        raw = tuple(data.items()) if isinstance(data, dict) else tuple(os.environb.items())
        env = dict(_own_env_filtered(raw, drop_key, secrets_key))
    else:
        env = _filtered(base, drop_key, secrets_key)
    env[MARKER_VAR] = marker
    return env


@functools.lru_cache(maxsize=8)
def _own_env_filtered(
    raw: tuple[tuple[bytes, bytes], ...], drop: tuple[str, ...], secrets: tuple[str, ...]
) -> dict[str, str]:
    """`_filtered(os.environ, …)`, remembered by the raw environment it was made from (do not mutate)."""
    return _filtered(os.environ, drop, secrets)


def _filtered(base: Mapping[str, str], drop: tuple[str, ...], secrets: tuple[str, ...]) -> dict[str, str]:
    dropped = set(drop)
    env: dict[str, str] = {}
    for key, value in base.items():
        if key.startswith("SIDECAR_") or key in dropped:
            continue
        if any(value == s or (len(s) >= 8 and s in value) for s in secrets):
            continue
        env[key] = value
    return env


def describe_returncode(returncode: int) -> str:
    """'exit code N', or 'killed by signal NAME' for a Popen-style negative code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit code {returncode}"


# --------------------------------------------------------------------------
# Running a child


def _sweep(marker: str | None) -> set[int]:
    """SIGKILL every marked process; return the pids signalled."""
    return signal_marked((marker,), signal.SIGKILL) if marker is not None else set()


async def _final_cleanup(pgid: int | None, marker: str | None) -> int:
    """Shielded and bounded: kill leftovers, then wait (briefly) until they are gone.

    The group itself was SIGKILLed before its leader was reaped (`childwait`):
    here it is only counted and waited for, never signalled by its number, which
    may since belong to a stranger. The common case (nothing left) costs one
    killpg(0) and, with a marker, one scan.
    """
    in_group = len(group_members(pgid)) if pgid is not None and group_alive(pgid) else 0
    killed = _sweep(marker)
    strays = in_group + len(killed)
    if not strays:
        return 0  # no cancel scope either: this runs at the end of every task

    def left() -> bool:
        # A killed process drops its marker (its memory) before it is dead: wait for both.
        if pgid is not None and group_alive(pgid):
            return True
        if marker is not None and find_marked(marker):
            return True
        return any(alive(pid) for pid in killed)

    # One scope, shielded from outer cancellation, with its own deadline.
    with trio.CancelScope(shield=True, deadline=trio.current_time() + _REAP_WAIT_S) as scope:
        delay = 0.001
        while left():
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)
            killed |= _sweep(marker)
    if scope.cancelled_caught:
        log.warning("child_leftovers_alive", pgid=pgid, marker=marker)
    return strays


async def sweep_marked(marker: str) -> int:
    """Kill every process carrying `marker` and wait (shielded, at most 2 s) until they are gone.

    The common case, nothing left, costs one scan and no wait.
    """
    return await _final_cleanup(None, marker)


def _unwrap(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception worth raising out of our private nursery."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(eg)
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real and leaves:
        return leaves[0]
    return eg


async def run_child(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    marker: str,
    on_stdout: LineCallback | None,
    on_stderr: LineCallback | None = None,
    stdin: bytes | None = None,
    grace_s: float = 5.0,
    first_signal: int = signal.SIGTERM,
    drain_grace_s: float | None = None,
    batch_lines: bool = False,
    kill_leftovers: bool = True,
    sweep_marker: bool = True,
) -> ChildResult:
    """Run `argv` to completion, streaming its output; kill it all on cancellation.

    Callbacks get one line at a time without its "\\n" (a line longer than
    MAX_LINE_CHARS comes in pieces); with `batch_lines=True` they get blocks of
    one or more whole lines, newlines included, which is far cheaper for bulk
    output. A callback of None discards that stream (still drained).

    `env` is used as given plus the marker (build it with `child_env`). On
    cancellation: `first_signal` to the group, SIGKILL `grace_s` later, child
    reaped, output still read meanwhile (so a CLI's last words after SIGINT are
    seen), then `trio.Cancelled` propagates. After the direct child exits,
    pipes are drained for at most `drain_grace_s` (default `grace_s`); what a
    pipe holds when that time is up is still passed on (all the direct child
    wrote is in it), only more is not waited for. Raises
    OSError if the child cannot be started (e.g. missing cwd or binary).

    `sweep_marker=False` kills only the group after a normal exit: processes
    that left it (`setsid`) are left to the caller, whose end-of-task sweep
    (`taskrun.run_and_sweep`) comes right after; that saves a /proc scan per
    task on the critical path. `kill_leftovers=False` spares descendants after
    a normal exit (the wake
    path: the command starts an agent that outlives it; the caller must then
    `kill_marked` at task end). On cancellation or error they are killed anyway.
    """
    if drain_grace_s is None:
        drain_grace_s = grace_s
    full_env = dict(env)
    full_env[MARKER_VAR] = marker
    state = KillState(first_signal=first_signal, grace_s=grace_s, marker=marker)
    # Readers are shielded from outer cancellation so that output written while
    # the child winds down is still read; their deadline is set once the direct
    # child has exited. One scope per reader (a scope is entered once).
    drain_scopes = (trio.CancelScope(shield=True), trio.CancelScope(shield=True))
    pgid: int | None = None
    returncode: int | None = None
    t0 = trio.current_time()
    # The pipes are ours (not run_process's) and closed in the `finally` below
    # whatever happens: the read ends at the end, the write ends as soon as the
    # child holds its copies.
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    stdout_stream = trio.lowlevel.FdStream(out_r)
    stderr_stream = trio.lowlevel.FdStream(err_r)
    write_ends = [out_w, err_w]

    def close_write_ends() -> None:
        while write_ends:
            os.close(write_ends.pop())

    def spawn() -> tuple[subprocess.Popen[bytes], int | None]:
        # Popen on the event loop thread: with `start_new_session` and no
        # preexec_fn CPython uses vfork, about 0.1 ms whatever our size, which
        # is cheaper than the hand-off to a worker thread that trio.open_process does.
        stdin_r: int | None = None
        stdin_w: int | None = None
        if stdin is not None:
            stdin_r, stdin_w = os.pipe()
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL if stdin_r is None else stdin_r,
                stdout=out_w,
                stderr=err_w,
                cwd=cwd,
                env=full_env,
                start_new_session=True,
            )
        except BaseException as exc:
            for fd in (stdin_r, stdin_w):
                if fd is not None:
                    os.close(fd)
            if isinstance(exc, ValueError):
                # A NUL character in an argument, the environment or the cwd (task
                # text can carry one): the child cannot start, as for a missing binary.
                raise OSError(errno.EINVAL, f"cannot start {argv[0]!r}: {exc}") from exc
            raise
        if stdin_r is not None:
            os.close(stdin_r)
        return popen, stdin_w

    def start() -> tuple[ChildExit, int | None]:
        popen, stdin_w = spawn()
        running_children.add(popen.pid)  # ours to reap (proctree.reap_orphans leaves it)
        return ChildExit(popen), stdin_w

    async def wait_it(exit_: ChildExit, stdin_w: int | None) -> None:
        # Entered with no checkpoint after the spawn: a cancellation that comes
        # first meets wait_or_kill's first await, which stops the group and reaps.
        nonlocal returncode
        popen = exit_.popen
        try:
            if stdin_w is None:
                returncode = await wait_or_kill(exit_, state, kill_group_first=kill_leftovers)
            else:
                async with trio.open_nursery() as feeder:
                    feeder.start_soon(feed_stdin, stdin_w, stdin or b"")
                    returncode = await wait_or_kill(exit_, state, kill_group_first=kill_leftovers)
                    feeder.cancel_scope.cancel()
        finally:
            exit_.close()
            if popen.returncode is not None:
                running_children.discard(popen.pid)
            until = trio.current_time() + drain_grace_s
            for scope in drain_scopes:
                scope.deadline = min(scope.deadline, until)

    readers = (
        PipeReader(stdout_stream, on_stdout, batch_lines),
        PipeReader(stderr_stream, on_stderr, batch_lines),
    )

    async def drain(reader: PipeReader, scope: trio.CancelScope) -> None:
        with scope:
            await reader.pump()

    def drain_timed_out() -> bool:
        return any(scope.cancelled_caught for scope in drain_scopes)

    strays = 0
    try:
        try:
            # Spawned here, not in a task of its own started with nursery.start: that
            # hand-off cost a scheduler round on every child's way to its start.
            exit_, stdin_w = start()
            pgid = exit_.popen.pid
            close_write_ends()  # the child has its copies: EOF comes when it (and its heirs) exit
            async with trio.open_nursery() as nursery:
                for reader, scope in zip(readers, drain_scopes, strict=True):
                    nursery.start_soon(drain, reader, scope)
                # In the nursery's own body, not a task of its own: one spawn less a child.
                # However it ends, the readers' deadlines are set (its `finally`), and
                # the nursery then waits for them.
                await wait_it(exit_, stdin_w)
        except BaseExceptionGroup as eg:
            raise _unwrap(eg) from None
        finally:
            if drain_timed_out():
                await salvage(readers, drain_grace_s)
    except BaseException:
        await _final_cleanup(pgid, marker)
        raise
    finally:
        close_write_ends()
        stdout_stream.close()
        stderr_stream.close()
    if kill_leftovers:
        strays = await _final_cleanup(pgid, marker if sweep_marker else None)
    held_open = not all(reader.eof for reader in readers)
    if drain_timed_out():
        salvaged = sum(reader.salvaged_bytes for reader in readers)
        if held_open:
            log.warning("child_drain_timed_out", pgid=pgid, marker=marker, salvaged_bytes=salvaged)
        else:
            log.info("child_output_read_late", pgid=pgid, marker=marker, salvaged_bytes=salvaged)
    assert returncode is not None
    return ChildResult(
        returncode=returncode,
        signalled=state.signalled,
        killed=state.killed,
        duration_s=trio.current_time() - t0,
        drain_timed_out=held_open,
        strays_killed=strays,
    )


@attrs.frozen
class Captured:
    """A finished child's exit and output (each capped), from `capture`."""

    returncode: int | None  # None: killed at its time limit
    stdout: str
    stderr: str
    timed_out: bool
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """What happened, for an error message: exit status and the tail of its output."""
        if self.timed_out:
            what = f"timed out after {self.duration_s:.0f} s"
        else:
            what = describe_returncode(self.returncode if self.returncode is not None else -9)
        detail = (self.stderr.strip() or self.stdout.strip())[-500:]
        return f"{what}: {detail}" if detail else what


async def capture(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    marker: str,
    timeout_s: float,
    cap_bytes: int = 64 * 1024,
    stdin: bytes | None = None,
    grace_s: float = 5.0,
) -> Captured:
    """Run `argv` to its end (at most `timeout_s`) through `run_child`, keeping its output.

    Each stream keeps its last `cap_bytes` (UTF-8). At the time limit the group
    gets SIGTERM, then SIGKILL `grace_s` later, and `timed_out` is set; an outer
    cancellation propagates as usual. Raises OSError if the child cannot start.
    """
    out: list[str] = []
    err: list[str] = []
    sizes = [0, 0]

    def keeper(parts: list[str], i: int) -> LineCallback:
        async def keep(block: str) -> None:
            parts.append(block)
            sizes[i] += len(block)
            while sizes[i] > cap_bytes and len(parts) > 1:
                sizes[i] -= len(parts.pop(0))

        return keep

    t0 = trio.current_time()
    returncode: int | None = None
    with trio.move_on_after(timeout_s) as scope:
        res = await run_child(
            argv,
            cwd=cwd,
            env=env,
            marker=marker,
            on_stdout=keeper(out, 0),
            on_stderr=keeper(err, 1),
            stdin=stdin,
            grace_s=grace_s,
            batch_lines=True,
        )
        returncode = res.returncode
    return Captured(
        returncode=returncode,
        stdout="".join(out)[-cap_bytes:],
        stderr="".join(err)[-cap_bytes:],
        timed_out=scope.cancelled_caught,
        duration_s=trio.current_time() - t0,
    )


__all__ = [
    "MARKER_VAR",
    "Captured",
    "ChildResult",
    "agent_marker_prefix",
    "become_subreaper",
    "capture",
    "child_env",
    "describe_returncode",
    "find_marked",
    "group_alive",
    "group_members",
    "kill_group",
    "kill_marked",
    "kill_marked_any",
    "kill_strays",
    "run_child",
    "sweep_marked",
    "task_marker",
]
