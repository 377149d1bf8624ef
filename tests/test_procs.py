"""The process helper: streaming, cancellation, leftovers, markers, environment."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog.testing
import trio

from sidecar import procs
from sidecar.procs import (
    MARKER_VAR,
    MAX_LINE_CHARS,
    child_env,
    find_marked,
    group_alive,
    kill_group,
    kill_marked,
    run_child,
    task_marker,
)
from tests.fakes.proc_helpers import alive, kill_quietly, wait_dead, wait_marked

SH = "/bin/sh"


def marker() -> str:
    return f"test-{uuid.uuid4().hex}"


class Lines:
    def __init__(self) -> None:
        self.items: list[str] = []
        self.seen: dict[str, trio.Event] = {}
        self.first = trio.Event()

    def event_for(self, text: str) -> trio.Event:
        return self.seen.setdefault(text, trio.Event())

    async def __call__(self, line: str) -> None:
        self.items.append(line)
        self.event_for(line).set()
        self.first.set()


async def run_sh(script: str, tmp_path: Path, **kw: object) -> tuple[procs.ChildResult, Lines, Lines]:
    out, err = Lines(), Lines()
    with trio.fail_after(20):
        res = await run_child(
            [SH, "-c", script],
            cwd=tmp_path,
            env=dict(os.environ),
            marker=kw.pop("marker", None) or marker(),  # type: ignore[arg-type]
            on_stdout=out,
            on_stderr=err,
            **kw,  # type: ignore[arg-type]
        )
    return res, out, err


# --------------------------------------------------------------------------
# Streaming and exit codes


async def test_streams_lines_separately_and_reports_exit_code(tmp_path: Path) -> None:
    res, out, err = await run_sh("echo one; echo two >&2; printf 'three\\n\\nfour'; exit 7", tmp_path)
    assert out.items == ["one", "three", "", "four"]
    assert err.items == ["two"]
    assert res.returncode == 7
    assert not res.signalled and not res.killed and not res.drain_timed_out


async def test_batch_mode_passes_whole_lines_with_newlines(tmp_path: Path) -> None:
    res, out, _ = await run_sh("printf 'a\\nb\\nc'", tmp_path, batch_lines=True)
    assert res.returncode == 0
    assert "".join(out.items) == "a\nb\nc"
    # Every block but the last ends on a line boundary.
    assert all(block.endswith("\n") for block in out.items[:-1])


async def test_stdin_is_devnull_by_default_and_bytes_are_fed_then_closed(tmp_path: Path) -> None:
    # `cat` would wait forever on an inherited or open stdin.
    res, out, _ = await run_sh("cat; echo end", tmp_path)
    assert out.items == ["end"]
    res, out, _ = await run_sh("cat; echo end", tmp_path, stdin=b"fed\n")
    assert out.items == ["fed", "end"]
    assert res.returncode == 0


async def test_invalid_utf8_is_replaced_and_split_characters_survive(tmp_path: Path) -> None:
    # \xe2\x82\xac is the euro sign, written in two pieces with a pause between.
    script = "printf 'bad \\377\\n'; printf '\\342\\202'; sleep 0.05; printf '\\254\\n'"
    _, out, _ = await run_sh(script, tmp_path)
    assert out.items == ["bad \ufffd", "\u20ac"]


async def test_very_long_line_is_chunked_not_accumulated(tmp_path: Path) -> None:
    size = 3 * MAX_LINE_CHARS + 123
    _, out, _ = await run_sh(f"head -c {size} /dev/zero | tr '\\0' a; echo; echo after", tmp_path)
    assert all(len(piece) <= MAX_LINE_CHARS for piece in out.items)
    assert out.items[-1] == "after"
    assert sum(len(p) for p in out.items[:-1]) == size
    assert set("".join(out.items[:-1])) == {"a"}


async def test_missing_cwd_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        await run_sh("true", tmp_path / "nope")


@pytest.mark.parametrize("where", ["argv", "env", "stdin"])
async def test_a_nul_character_cannot_start_a_child_and_says_so_as_oserror(
    tmp_path: Path, where: str
) -> None:
    """Task text can carry a NUL (a JSON escape), which no argv or environment can
    hold: Popen's ValueError escaped every caller's OSError handling, and a
    verification command holding one stopped the daemon. Nothing is leaked either."""
    fds_before = set(os.listdir("/proc/self/fd"))
    env = dict(os.environ)
    argv = [SH, "-c", "true"]
    if where == "argv":
        argv[2] = "echo a\x00b"
    elif where == "env":
        env["TASK_NOTE"] = "a\x00b"
    stdin = b"fed" if where == "stdin" else None
    if where == "stdin":
        argv[2] = "cat\x00"
    with pytest.raises(OSError, match="null") as caught:
        await run_child(argv, cwd=tmp_path, env=env, marker=marker(), on_stdout=None, stdin=stdin)
    assert isinstance(caught.value.__cause__, ValueError)
    # No fd of ours left open (fewer is fine: the GC may close another test's meanwhile).
    assert set(os.listdir("/proc/self/fd")) <= fds_before


async def test_callback_error_propagates_unwrapped_and_child_dies(tmp_path: Path) -> None:
    pid_holder: list[int] = []

    async def boom(line: str) -> None:
        pid_holder.append(int(line))
        raise ValueError("callback failed")

    with trio.fail_after(20), pytest.raises(ValueError, match="callback failed"):
        await run_child(
            [SH, "-c", "echo $$; exec sleep 1000"],
            cwd=tmp_path,
            env=dict(os.environ),
            marker=marker(),
            on_stdout=boom,
            grace_s=0.5,
        )
    assert await wait_dead(pid_holder[0])


# --------------------------------------------------------------------------
# Cancellation


async def cancel_once(
    ready: trio.Event,
    argv: list[str],
    cwd: Path,
    out: Lines,
    grace: float,
    limit_s: float,
    before_cancel: Callable[[], None] | None = None,
    sweep_marker: bool = True,
) -> float:
    """Run `argv` through `run_child` in a cancel scope and cancel it once `ready` is set
    (after `before_cancel`); seconds from the cancel to `run_child`'s return. The whole
    run fails after `limit_s`."""
    cancelled_at = returned_at = 0.0
    with trio.fail_after(limit_s):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def runner() -> None:
                nonlocal returned_at
                with scope:
                    await run_child(
                        argv,
                        cwd=cwd,
                        env=dict(os.environ),
                        marker=marker(),
                        on_stdout=out,
                        grace_s=grace,
                        sweep_marker=sweep_marker,
                    )
                returned_at = trio.current_time()
                assert scope.cancelled_caught  # Cancelled propagated out of run_child

            nursery.start_soon(runner)
            await ready.wait()
            if before_cancel is not None:
                before_cancel()
            cancelled_at = trio.current_time()
            scope.cancel()
    return returned_at - cancelled_at


async def test_cancel_sends_term_then_kill_after_grace_to_whole_group(tmp_path: Path) -> None:
    # The shell traps TERM (prints and carries on); its grandchild ignores TERM.
    script = (
        "trap 'echo got-term' TERM; "
        "(trap '' TERM; exec sleep 1000) & echo gc $!; echo ready; "
        "while :; do wait; done"
    )
    out = Lines()
    grace = 0.5
    elapsed = await cancel_once(out.event_for("ready"), [SH, "-c", script], tmp_path, out, grace, limit_s=20)
    gc_pid = int(next(line for line in out.items if line.startswith("gc ")).split()[1])
    # SIGTERM was delivered and output was still read while the child wound down.
    assert "got-term" in out.items
    # Neither process exits on TERM, so only the SIGKILL grace_s later ends them.
    assert grace <= elapsed < grace + 3.0
    assert await wait_dead(gc_pid, limit_s=2)


async def test_a_descendant_in_its_own_session_shares_the_groups_one_grace(tmp_path: Path) -> None:
    """It holds stdout and ignores SIGTERM, as does the shell: it gets the first
    signal with the group (once, as the group does) and SIGKILL with it, so the
    run ends one grace after the cancel, not two (the drain waited a second
    grace for the pipe it held)."""
    term_log = tmp_path / "terms"
    script = (
        f"trap 'echo shell >> {term_log}' TERM; "
        f'setsid {SH} -c \'trap "echo own >> {term_log}" TERM; echo sid $$; '
        "while :; do sleep 0.05; done' & "
        "while :; do sleep 0.05; done"
    )
    out = Lines()
    grace = 2.0
    own_pid = 0

    def escaped() -> None:
        nonlocal own_pid
        own_pid = int(out.items[0].split()[1])
        assert os.getsid(own_pid) == own_pid != os.getsid(0)  # escaped our session and group

    elapsed = await cancel_once(
        out.first,
        [SH, "-c", script],
        tmp_path,
        out,
        grace,
        limit_s=30,
        before_cancel=escaped,
        sweep_marker=False,  # as the shell executor runs it
    )
    assert grace <= elapsed < 2 * grace - 0.5
    assert await wait_dead(own_pid, limit_s=2)
    assert sorted(term_log.read_text().split()) == ["own", "shell"]  # each signalled once


async def test_cancel_uses_first_signal(tmp_path: Path) -> None:
    out = Lines()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def runner() -> None:
                with scope:
                    await run_child(
                        [
                            SH,
                            "-c",
                            "trap 'echo got-int; exit 0' INT; echo ready; while :; do sleep 0.01; done",
                        ],
                        cwd=tmp_path,
                        env=dict(os.environ),
                        marker=marker(),
                        on_stdout=out,
                        first_signal=signal.SIGINT,
                        grace_s=10,
                    )

            nursery.start_soon(runner)
            await out.event_for("ready").wait()
            scope.cancel()
    assert "got-int" in out.items


async def test_grandchild_ignoring_term_dies_even_when_shell_exits_on_term(tmp_path: Path) -> None:
    # Pitfall 1: the shell dies on SIGTERM at once; its child ignoring SIGTERM
    # still gets its grace, then SIGKILL (before the shell is reaped, so the
    # group's number is still ours), instead of outliving the task.
    out = Lines()
    script = "(trap '' TERM; exec sleep 1000) >/dev/null 2>&1 & echo $!; wait"
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def runner() -> None:
                with scope:
                    await run_child(
                        [SH, "-c", script],
                        cwd=tmp_path,
                        env=dict(os.environ),
                        marker=marker(),
                        on_stdout=out,
                        grace_s=1,
                    )

            nursery.start_soon(runner)
            await out.first.wait()
            gc_pid = int(out.items[0])
            assert alive(gc_pid)
            scope.cancel()
    assert await wait_dead(gc_pid, limit_s=2)


# --------------------------------------------------------------------------
def _open_fifo_and_write_a_line(path: Path) -> None:
    with path.open("w") as fifo:  # blocks until the child opens it for reading
        fifo.write("go\n")


@pytest.mark.parametrize("batch_lines", [False, True])
async def test_output_in_the_pipe_when_the_drain_grace_ends_is_still_passed_on(
    tmp_path: Path, autojump_clock: trio.abc.Clock, batch_lines: bool
) -> None:
    """What the child wrote before it exited is its output, however late the reader gets to it.

    The reader is held (here in its callback for the first line; a full progress
    channel or a starved event loop holds it the same way) until the child has
    written its last line and exited, and the drain grace has run out. The last
    line is in the pipe at that moment and must still be passed on: a shell task
    `echo TOKEN` must not complete with empty output.
    """
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    got: list[str] = []

    async def on_stdout(text: str) -> None:
        got.append(text)
        if len(got) > 1:
            return
        pidfd = os.pidfd_open(int(text))
        try:
            await trio.to_thread.run_sync(_open_fifo_and_write_a_line, fifo)
            await trio.lowlevel.wait_readable(pidfd)  # exited: "tok" is in the pipe now
        finally:
            os.close(pidfd)
        await trio.sleep(10)  # the drain grace (0.4 s) runs out meanwhile

    res = await run_child(
        [SH, "-c", f"echo $$; read x < {fifo}; echo tok"],
        cwd=tmp_path,
        env=dict(os.environ),
        marker=marker(),
        on_stdout=on_stdout,
        drain_grace_s=0.4,
        batch_lines=batch_lines,
    )
    assert res.returncode == 0
    assert [t.rstrip("\n") for t in got[1:]] == ["tok"]
    # The pipe did reach its end: no descendant held it, the reader was late.
    assert not res.drain_timed_out


# Leftovers after a normal exit


async def test_grandchild_holding_stdout_does_not_block_the_drain(tmp_path: Path) -> None:
    # What is left of the group is SIGKILLed as soon as the direct child exits
    # (before it is reaped), so the pipe's last holder is gone and the drain ends.
    script = "sleep 1000 & echo $!; echo parent-done"
    t0 = trio.current_time()
    res, out, _ = await run_sh(script, tmp_path, drain_grace_s=30)
    assert trio.current_time() - t0 < 5
    assert out.items[1] == "parent-done"
    assert res.returncode == 0
    assert not res.drain_timed_out
    assert await wait_dead(int(out.items[0]), limit_s=2)


async def test_background_child_is_killed_when_the_task_ends(tmp_path: Path) -> None:
    res, out, _ = await run_sh("sleep 1000 >/dev/null 2>&1 & echo $!", tmp_path)
    assert not res.drain_timed_out
    assert await wait_dead(int(out.items[0]), limit_s=2)


async def test_setsid_grandchild_is_found_and_killed_through_the_marker(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    m = marker()
    # setsid -f: a new session, so neither our group kill nor its parent reach it.
    script = (
        f"setsid -f {SH} -c 'echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 1000' "
        ">/dev/null 2>&1 </dev/null; "
        f"while [ ! -s {pidfile} ]; do sleep 0.01; done"
    )
    res, _, _ = await run_sh(script, tmp_path, marker=m, kill_leftovers=False)
    pid = int(pidfile.read_text())
    try:
        assert alive(pid)
        assert os.getsid(pid) == pid != os.getsid(0)  # escaped our session and group
        assert pid in await wait_marked(m, [pid])  # `exec sleep` may still be under way
        assert pid not in find_marked(m + "x")
        assert kill_marked(m) >= 1
        assert await wait_dead(pid, limit_s=2)
        assert find_marked(m) == []
    finally:
        kill_quietly(pid)
    assert res.returncode == 0


async def test_run_child_sweeps_setsid_grandchild_by_default(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = (
        f"setsid -f {SH} -c 'echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 1000' "
        ">/dev/null 2>&1 </dev/null; "
        f"while [ ! -s {pidfile} ]; do sleep 0.01; done"
    )
    res, _, _ = await run_sh(script, tmp_path)
    pid = int(pidfile.read_text())
    try:
        assert res.strays_killed >= 1
        assert await wait_dead(pid, limit_s=2)
    finally:
        kill_quietly(pid)


async def test_kill_marked_spares_other_markers_and_supports_prefix(tmp_path: Path) -> None:
    base = marker()
    pids: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            for suffix in ("-a", "-b"):
                env = {**os.environ, MARKER_VAR: base + suffix}
                proc = await trio.lowlevel.open_process(["sleep", "1000"], env=env, start_new_session=True)
                pids.append(proc.pid)
                nursery.start_soon(proc.wait)
            # /proc/<pid>/environ reads empty until exec has fully set up the
            # new image, which can lag behind open_process returning.
            for _ in range(2000):
                if sorted(find_marked(base, prefix=True)) == sorted(pids):
                    break
                await trio.sleep(0.001)
            assert sorted(find_marked(base, prefix=True)) == sorted(pids)
            assert kill_marked(base + "-a") == 1
            assert await wait_dead(pids[0], limit_s=2)
            assert alive(pids[1])
            assert kill_marked(base, prefix=True) == 1
    finally:
        for pid in pids:
            kill_quietly(pid)
    assert not alive(pids[1])


async def test_group_helpers_tolerate_missing_groups(tmp_path: Path) -> None:
    proc = await trio.lowlevel.open_process(["sleep", "1000"], start_new_session=True)
    try:
        assert group_alive(proc.pid)
        assert kill_group(proc.pid, signal.SIGKILL)
        await proc.wait()
        assert not group_alive(proc.pid)
        assert kill_group(proc.pid, signal.SIGKILL) is False
        assert kill_group(0) is False and kill_group(1) is False
    finally:
        kill_quietly(proc.pid)


async def test_kill_marked_any_kills_several_markers_in_one_call_and_spares_the_rest(tmp_path: Path) -> None:
    base = marker()
    pids: dict[str, int] = {}
    try:
        async with trio.open_nursery() as nursery:
            for suffix in ("-a", "-b", "-c"):
                env = {**os.environ, MARKER_VAR: base + suffix}
                proc = await trio.lowlevel.open_process(["sleep", "1000"], env=env, start_new_session=True)
                pids[suffix] = proc.pid
                nursery.start_soon(proc.wait)
            for _ in range(2000):  # environ reads empty until exec is done (see above)
                if len(find_marked(base, prefix=True)) == 3:
                    break
                await trio.sleep(0.001)
            assert procs.kill_marked_any([base + "-a", base + "-c", base + "-a"]) == 2
            assert await wait_dead(pids["-a"], limit_s=2) and await wait_dead(pids["-c"], limit_s=2)
            assert alive(pids["-b"])
            assert procs.kill_marked_any([]) == 0
            assert kill_marked(base + "-b") == 1
    finally:
        for pid in pids.values():
            kill_quietly(pid)


# --------------------------------------------------------------------------
# Environment


def test_child_env_drops_token_and_secrets_and_adds_marker() -> None:
    base = {
        "PATH": "/usr/bin",
        "SIDECAR_TOKEN": "tok-very-secret",
        "SIDECAR_HUB_URL": "ws://x",
        "COPY_OF_TOKEN": "tok-very-secret",
        "AUTH_HEADER": "Bearer tok-very-secret",
        "SHORT": "ab",
        "DROP_ME": "1",
        MARKER_VAR: "old",
    }
    env = child_env(base, "m-1", drop=["DROP_ME"], secrets=["tok-very-secret", "ab"])
    assert env == {"PATH": "/usr/bin", MARKER_VAR: "m-1"}


def test_child_env_of_our_own_environment_follows_its_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The filtered copy of os.environ is reused while it is unchanged, never after a change."""
    secret = "hub-token-0123456789"
    first = child_env(os.environ, "m-1", secrets=[secret])
    assert child_env(os.environ, "m-2", secrets=[secret]) == {**first, MARKER_VAR: "m-2"}
    monkeypatch.setenv("ADDED_LATER", "yes")
    monkeypatch.setenv("LEAKS_IT", f"Bearer {secret}")
    monkeypatch.setenv("SIDECAR_TOKEN", secret)
    later = child_env(os.environ, "m-3", secrets=[secret])
    assert later["ADDED_LATER"] == "yes" and later[MARKER_VAR] == "m-3"
    assert "LEAKS_IT" not in later and "SIDECAR_TOKEN" not in later
    assert "ADDED_LATER" not in child_env(os.environ, "m-4", secrets=[secret], drop=["ADDED_LATER"])
    monkeypatch.delenv("ADDED_LATER")
    assert "ADDED_LATER" not in child_env(os.environ, "m-5", secrets=[secret])
    # A copy each time: one child's environment never leaks into the next.
    later["MUTATED"] = "1"
    assert "MUTATED" not in child_env(os.environ, "m-6", secrets=[secret])


def test_task_marker_is_deterministic_safe_and_agent_prefixed() -> None:
    a = task_marker("agent", "task\0with nul\n")
    assert a == task_marker("agent", "task\0with nul\n")
    assert a != task_marker("agent", "other")
    assert a.startswith(procs.agent_marker_prefix("agent"))
    assert a.isascii() and "\0" not in a


async def test_token_is_absent_from_the_child_environment(tmp_path: Path) -> None:
    m = marker()
    base = {**os.environ, "SIDECAR_TOKEN": "hub-token-xyz", "OTHER": "hub-token-xyz"}
    out = Lines()
    with trio.fail_after(20):
        await run_child(
            ["env"], cwd=tmp_path, env=child_env(base, m, secrets=["hub-token-xyz"]), marker=m, on_stdout=out
        )
    assert f"{MARKER_VAR}={m}" in out.items
    assert not any("hub-token-xyz" in line for line in out.items)


async def test_capture_keeps_both_streams_and_their_tails(tmp_path: Path) -> None:
    m = marker()
    env = procs.child_env(os.environ, m)
    res = await procs.capture(
        ["/bin/sh", "-c", "echo out; echo err >&2; head -c 5000 /dev/zero | tr '\\0' x; exit 3"],
        cwd=tmp_path,
        env=env,
        marker=m,
        timeout_s=30,
        cap_bytes=1000,
    )
    assert res.returncode == 3 and not res.ok and not res.timed_out
    assert res.stderr == "err\n"
    assert len(res.stdout) == 1000 and res.stdout.endswith("x" * 100)
    assert res.describe().startswith("exit code 3: ")


async def test_capture_time_limit_kills_the_group(tmp_path: Path) -> None:
    # A real clock: the limit is what is tested, and a MockClock would jump past
    # it while the child still starts.
    m = marker()
    pidfile = tmp_path / "pid"
    res = await procs.capture(
        ["/bin/sh", "-c", f"trap '' TERM; sleep 1000 & echo $! > {pidfile}; wait"],
        cwd=tmp_path,
        env=procs.child_env(os.environ, m),
        marker=m,
        timeout_s=2,
        grace_s=0.5,
    )
    assert res.timed_out and res.returncode is None and not res.ok
    assert "timed out after" in res.describe()
    assert await wait_dead(int(pidfile.read_text()))
    assert procs.find_marked(m) == []


async def test_leftovers_that_will_not_go_are_waited_for_shielded_then_reported(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.abc.Clock
) -> None:
    """A group that stays alive after its SIGKILL (here: a kernel that keeps saying
    so) is waited for at most the reap wait, whatever cancels the caller, then
    reported; the common case returns at once, without a wait."""
    clock_start = trio.current_time()
    assert await procs._final_cleanup(None, None) == 0
    assert trio.current_time() == clock_start  # nothing to wait for: no wait at all

    monkeypatch.setattr(procs, "group_alive", lambda pgid: True)
    monkeypatch.setattr(procs, "group_members", lambda pgid: [pgid])
    with structlog.testing.capture_logs() as events, trio.CancelScope() as outer:
        outer.cancel()  # the caller is cancelled already: the wait happens anyway
        t0 = trio.current_time()
        strays = await procs._final_cleanup(4_000_000, None)
        waited = trio.current_time() - t0
    assert strays == 1
    assert procs._REAP_WAIT_S <= waited < procs._REAP_WAIT_S + 0.5
    assert [e["event"] for e in events] == ["child_leftovers_alive"]


async def test_a_sweep_returns_only_once_what_it_killed_is_dead() -> None:
    """A process dying of SIGKILL loses its environment, and with it the marker,
    before it is a zombie, and can stay so for a while on a busy machine. The
    sweep used to wait only until no process carried the marker, so it returned
    with 9 in 1,000 of the killed processes not dead yet (a CI failure of
    `test_own_session_descendant_is_swept_after_normal_exit`). Without the fix
    this fails in about 99 runs in 100."""
    not_dead = 0
    for n in range(500):
        marker = f"sc-sweep-death-{os.getpid()}-{n}"
        env = {**os.environ, procs.MARKER_VAR: marker}
        child = await trio.lowlevel.open_process(
            ["sleep", "100"], start_new_session=True, env=env, stdin=subprocess.DEVNULL
        )
        try:
            # Past its exec (mid-exec its environment is briefly unreadable: the late sweep's case).
            assert await wait_marked(marker, [child.pid]) == [child.pid]
            assert await procs.sweep_marked(marker) == 1
            not_dead += alive(child.pid)
        finally:
            child.kill()
            await child.wait()
    assert not_dead == 0
