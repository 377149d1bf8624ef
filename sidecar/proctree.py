"""Finding and killing what a task started: markers, process groups, /proc scans.

Every child of a task carries `SIDECAR_TASK_MARKER=<marker>` in its
environment, and so does everything it starts, a new session (`setsid`)
included, which a process-group kill never reaches. `kill_marked` finds and
kills them.

A daemon that became a child subreaper (`become_subreaper`, Linux) keeps every
descendant in its own process tree: an orphan is re-parented to it instead of
to init. Then a task's leftovers are all below us, and `find_marked` walks that
subtree (`/proc/<pid>/task/<tid>/children`) instead of reading the environment
of every process on the host: the scan then costs in proportion to what we
run, not to what the machine runs. Orphans re-parented to us that die become
our zombies; `kill_marked` reaps the ones it killed. `everywhere=True` (the
start-up sweep after a crash, whose leftovers went to init) scans all of /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import signal
from collections.abc import Iterable

MARKER_VAR = "SIDECAR_TASK_MARKER"
_PR_SET_CHILD_SUBREAPER = 36
_subreaper = False
# Pids of the children `procs.run_child` is waiting for: never reaped here.
running_children: set[int] = set()


def task_marker(agent_id: str, task_id: str) -> str:
    """A deterministic per-task marker, safe as an environment value.

    Hashed so that any task id (even one holding NUL or newlines) gives a short
    printable value; deterministic so that after a crash the supervisor can
    recompute it, and prefixed per agent (`agent_marker_prefix`) so that a
    start-up sweep touches only this agent's leftovers.
    """
    digest = hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()
    return agent_marker_prefix(agent_id) + digest[:20]


@functools.lru_cache(maxsize=16)
def agent_marker_prefix(agent_id: str) -> str:
    """The prefix every `task_marker` of this agent starts with."""
    return "sc-" + hashlib.sha256(agent_id.encode("utf-8", "surrogatepass")).hexdigest()[:12] + "-"


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Send `sig` to process group `pgid`; False if there was no one to signal. Never raises."""
    if pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
    except OSError:  # ProcessLookupError: group empty; PermissionError: not ours
        return False
    return True


def _proc_pids() -> list[int]:
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    me = os.getpid()
    return [int(n) for n in names if n.isdigit() and int(n) != me]


def _read_proc(pid: int, name: str) -> bytes | None:
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
    except OSError:  # gone, or not ours
        return None
    try:
        chunk = os.read(fd, 65536)
        if len(chunk) < 32768:
            # /proc files are produced in one go up to a page or more: a short
            # read is the whole file, which saves the read that would see EOF.
            return chunk
        chunks = [chunk]
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


# A zombie (exited, not reaped) or a dead process: gone for every purpose but the reap.
_DEAD_STATES = ("Z", "X")


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, pgrp) of a process, from /proc/<pid>/stat."""
    raw = _read_proc(pid, "stat")
    if not raw:
        return None
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return rest[0].decode("ascii", "replace"), int(rest[2])
    except (IndexError, ValueError):
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in group `pgid`."""
    out = []
    for pid in _proc_pids():
        fields = _stat_fields(pid)
        if fields is not None and fields[1] == pgid and fields[0] not in _DEAD_STATES:
            out.append(pid)
    return out


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process is left in group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    return bool(group_members(pgid))


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); True if it is now.

    Also needs `/proc/<pid>/task/<tid>/children`; without either, scans stay host-wide.
    """
    global _subreaper
    if _subreaper:
        return True
    me = os.getpid()
    if not os.path.exists(f"/proc/{me}/task/{me}/children"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        ok = False
    _subreaper = ok
    return ok


def is_subreaper() -> bool:
    return _subreaper


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (all its threads'), from /proc."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        data = _read_proc(pid, f"task/{tid}/children")
        if data:
            out.extend(int(c) for c in data.split())
    return out


_WALL = 0x40000000  # __WALL: children of any exit signal (Python does not name it)


def _has_children() -> bool:
    """False when this process has no child at all, running or zombie: one system call.

    A subreaper with no child has no descendant either (an orphan below it would
    have become its child), so the end of a task that left nothing costs this
    instead of a walk of every thread's /proc children list.
    """
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT | _WALL)
    except ChildProcessError:
        return False
    except OSError:
        return True  # cannot tell: walk
    return True


def _descendants() -> list[int]:
    """Every process below this one (children first), by walking /proc's children lists."""
    if not _has_children():
        return []
    found: list[int] = []
    seen = {os.getpid()}
    todo = [os.getpid()]
    while todo:
        for child in _children(todo.pop()):
            if child not in seen:
                seen.add(child)
                found.append(child)
                todo.append(child)
    return found


def _candidates(everywhere: bool) -> list[int]:
    if _subreaper and not everywhere:
        return _descendants()
    return _proc_pids()


def find_marked(marker: str, *, prefix: bool = False, everywhere: bool = False) -> list[int]:
    """Pids (not ours) whose environment carries `SIDECAR_TASK_MARKER=<marker>`.

    With `prefix=True`, any marker starting with `marker` matches. Zombies have
    an empty environment and so never match. Processes we may not read (other
    users) or that vanish mid-scan are skipped. A subreaper looks only at its
    own descendants unless `everywhere` (see the module doc).
    """
    needles = (_needle(marker, prefix),)
    return [pid for pid in _candidates(everywhere) if _carries(pid, needles)]


def _needle(marker: str, prefix: bool) -> bytes:
    needle = b"\0" + f"{MARKER_VAR}={marker}".encode()
    return needle if prefix else needle + b"\0"


def _carries(pid: int, needles: tuple[bytes, ...]) -> bool:
    data = _read_proc(pid, "environ")
    if not data:
        return False
    env = b"\0" + data + (b"" if data.endswith(b"\0") else b"\0")
    return any(needle in env for needle in needles)


def _signal_if_marked(pid: int, needles: tuple[bytes, ...], sig: int) -> bool:
    """Signal `pid` only if it is still the marked process we found (pid reuse is checked).

    A pidfd is taken first and the marker read after it: if the pid was given
    to another process in between, the pidfd's process is dead and the signal
    fails, so a stranger that got the number is never hit.
    """
    try:
        fd = os.pidfd_open(pid)
    except AttributeError:  # no pidfds: plain kill, after a fresh look
        if not _carries(pid, needles):
            return False
        try:
            os.kill(pid, sig)
        except OSError:
            return False
        return True
    except OSError:
        return False  # gone
    try:
        if not _carries(pid, needles):
            return False
        signal.pidfd_send_signal(fd, sig)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def kill_marked(
    marker: str, sig: int = signal.SIGKILL, *, prefix: bool = False, everywhere: bool = False
) -> int:
    """Signal every process carrying the marker; return how many distinct ones.

    Rescans (a few rounds at most) while new pids turn up, so that a process
    forked between a scan and the kill is caught too. A process already
    signalled may still show up while it dies; it is not counted twice. Those
    that were re-parented to us are reaped once dead (`reap_orphans`).
    """
    return kill_marked_any((marker,), sig, prefix=prefix, everywhere=everywhere)


def kill_marked_any(
    markers: Iterable[str], sig: int = signal.SIGKILL, *, prefix: bool = False, everywhere: bool = False
) -> int:
    """`kill_marked` for several markers at once: one scan a round, whatever their number."""
    return len(signal_marked(markers, sig, prefix=prefix, everywhere=everywhere))


def signal_marked(
    markers: Iterable[str],
    sig: int = signal.SIGKILL,
    *,
    prefix: bool = False,
    everywhere: bool = False,
    outside_group: int | None = None,
) -> set[int]:
    """`kill_marked_any`, returning the pids signalled (to wait for their death: `alive`).

    With `outside_group`, members of that process group are left alone (the
    caller signals the group itself, and a second signal would run a trap twice).
    """
    needles = tuple(_needle(m, prefix) for m in dict.fromkeys(markers))
    signalled: set[int] = set()
    if not needles:
        return signalled  # no marker: nothing to look for, no /proc walk
    below_us = False
    for _ in range(5):
        candidates = _candidates(everywhere)
        below_us = below_us or bool(candidates)
        fresh = [
            pid
            for pid in candidates
            if pid not in signalled and _carries(pid, needles) and not _in_group(pid, outside_group)
        ]
        if not fresh:
            break
        for pid in fresh:
            if _signal_if_marked(pid, needles, sig):
                signalled.add(pid)
        if sig != signal.SIGKILL:
            break
    if _subreaper and below_us:
        # Nothing below a subreaper means no orphan of ours either, dead or alive.
        reap_orphans()
    return signalled


def _in_group(pid: int, pgid: int | None) -> bool:
    if pgid is None:
        return False
    try:
        return os.getpgid(pid) == pgid
    except OSError:
        return True  # gone: nothing to signal either


def alive(pid: int) -> bool:
    """True while `pid` exists and is neither a zombie nor dead.

    Not the same as still carrying its marker: a process dying of SIGKILL loses
    its environment (its memory) before it becomes a zombie, and may stay in
    that state for a while (closing its files) on a busy machine.
    """
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in _DEAD_STATES


def kill_strays() -> int:
    """SIGKILL every live process below us that no `run_child` is waiting for; how many.

    For a subreaper with no task running, each such process is a leftover of
    some task that the marker cannot find: one that dropped its environment
    (`env -i`, `sudo`, `su -`) and left its session (`setsid`), so that
    neither the group kill nor the marker sweep reached it. Call it only when
    no task runs: a task's own helper may look just the same while it does.
    """
    if not _subreaper:
        return 0
    signalled: set[int] = set()
    for _ in range(5):  # a stray's children are re-parented to us when it dies
        ours = running_children | signalled  # waited for by run_child, or killed already
        strays = [pid for pid in _descendants() if pid not in ours and alive(pid)]
        if not strays:
            break
        for pid in strays:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                signalled.add(pid)
    reap_orphans()
    return len(signalled)


def reap_orphans() -> int:
    """Reap our dead children that `run_child` is not waiting for: orphans re-parented to us.

    Only a subreaper has such children; `running_children` are left to their
    waiter. Returns how many were reaped.
    """
    if not _subreaper:
        return 0
    reaped = 0
    for child in _children(os.getpid()):
        if child in running_children:
            continue
        fields = _stat_fields(child)
        if fields is None or fields[0] not in _DEAD_STATES:
            continue
        try:
            pid, _status = os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            continue
        reaped += int(pid == child)
    return reaped
