"""The shell executor and the bounded output capture."""

from __future__ import annotations

import os
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
import trio.testing

from sidecar import output, procs
from sidecar.executors.shell import NO_COMMAND, PROGRESS_TEXT_MAX, ShellExecutor
from sidecar.messages import parse_task
from sidecar.output import OutputCapture
from tests.conftest import Logs
from tests.fakes.proc_helpers import RecordingProgress, make_ctx, task_run, wait_dead

T = TypeVar("T")


def shell_task(command: object = None, task_id: str = "t1") -> object:
    metadata = {} if command is None else {"shell_command": command}
    return parse_task({"type": "task_assign", "task_id": task_id, "metadata": metadata})


@pytest.fixture
def executor(make_config, tmp_path: Path) -> ShellExecutor:  # type: ignore[no-untyped-def]
    repo = tmp_path / "repo"
    repo.mkdir()
    return ShellExecutor(make_ctx(make_config(repo_dir=str(repo), output_cap_bytes=4096, kill_grace_s=0.5)))


async def run(
    executor: ShellExecutor, command: object, task_id: str = "t1", marker: str | None = None
) -> tuple[object, RecordingProgress]:
    progress = RecordingProgress(task_id)
    with trio.fail_after(30):
        run = task_run(executor.ctx, shell_task(command, task_id), progress, marker)  # type: ignore[arg-type]
        outcome = await executor(run)
    return outcome, progress


# --------------------------------------------------------------------------
# Results


async def test_success_streams_both_streams_and_logs_everything(executor: ShellExecutor) -> None:
    outcome, progress = await run(executor, "echo hello; echo warn >&2; pwd")
    assert outcome.ok and outcome.exit_code == 0 and outcome.model_used == "none"  # type: ignore[attr-defined]
    repo = executor.ctx.workdir()
    assert outcome.output == f"hello\n{repo}\n"  # type: ignore[attr-defined]
    assert not outcome.output_truncated  # type: ignore[attr-defined]
    assert progress.joined("stdout") == f"hello\n{repo}\n"
    assert progress.joined("stderr") == "warn\n"
    log = executor.ctx.log_path("t1").read_text()
    assert "run: /bin/sh -c 'echo hello; echo warn >&2; pwd'" in log
    assert "hello\n" in log and "warn\n" in log and "=== exit code 0" in log


async def test_log_is_appended_per_attempt(executor: ShellExecutor) -> None:
    await run(executor, "echo first")
    await run(executor, "echo second")
    log = executor.ctx.log_path("t1").read_text()
    assert log.count("=== ") == 4
    assert log.index("first") < log.index("second")


async def test_nonzero_exit_is_a_transient_failure_quoting_stderr(executor: ShellExecutor) -> None:
    outcome, _ = await run(executor, "echo partial; echo 'it broke' >&2; exit 3")
    assert not outcome.ok  # type: ignore[attr-defined]
    assert outcome.error == "exit code 3: it broke"  # type: ignore[attr-defined]
    assert outcome.reason == "exit_code" and outcome.transient  # type: ignore[attr-defined]
    assert outcome.exit_code == 3 and outcome.output == "partial\n"  # type: ignore[attr-defined]


async def test_death_by_signal_is_named(executor: ShellExecutor) -> None:
    outcome, _ = await run(executor, "kill -9 $$")
    assert outcome.error == "killed by signal SIGKILL"  # type: ignore[attr-defined]
    assert outcome.exit_code == -9  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", [None, "", "   ", 42])
async def test_missing_command_fails_at_once_not_transient(executor: ShellExecutor, command: object) -> None:
    outcome, progress = await run(executor, command)
    assert not outcome.ok and not outcome.transient  # type: ignore[attr-defined]
    assert outcome.error == NO_COMMAND == "sidecar task has no metadata.shell_command"  # type: ignore[attr-defined]
    assert outcome.reason == "no_command"  # type: ignore[attr-defined]
    assert progress.events == []


async def test_missing_workdir_is_a_clear_permanent_failure(make_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ex = ShellExecutor(make_ctx(make_config(repo_dir=str(tmp_path / "gone"))))
    outcome, _ = await run(ex, "true")
    assert not outcome.ok and not outcome.transient  # type: ignore[attr-defined]
    assert outcome.reason == "no_workdir" and "gone" in outcome.error  # type: ignore[attr-defined]


async def test_token_is_not_in_the_child_environment(
    executor: ShellExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDECAR_TOKEN", executor.ctx.config.token)
    monkeypatch.setenv("SOME_COPY", executor.ctx.config.token)
    outcome, _ = await run(executor, "env")
    assert executor.ctx.config.token not in outcome.output  # type: ignore[attr-defined]
    marker = procs.task_marker(executor.ctx.config.agent_id, "t1")
    assert f"{procs.MARKER_VAR}={marker}\n" in outcome.output  # type: ignore[attr-defined]


async def test_the_runs_marker_is_what_children_carry(executor: ShellExecutor) -> None:
    outcome, _ = await run(executor, 'printf %s "$SIDECAR_TASK_MARKER"', marker="from-supervisor")
    assert outcome.output == "from-supervisor"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Big output


class LengthsProgress(RecordingProgress):
    """Keeps each event's length, not its text.

    A recorder that kept every text (up to 8 KB each, one per block read: 700 to
    1,500 blocks for 64 MB, as the reads fall) held up to 24 MB itself, inside
    the memory the test measures, and failed it in 1 run of 4.
    """

    def __init__(self) -> None:
        super().__init__("t1")
        self.lengths: list[int] = []

    async def emit(self, event_type: str, text: str, **_kw: object) -> None:
        if event_type == "stdout":
            self.lengths.append(len(text))
        await trio.lowlevel.checkpoint()


async def test_huge_output_keeps_memory_bounded_and_caps_the_result(executor: ShellExecutor) -> None:
    total = 64 * 1024 * 1024
    # 16-byte lines "0000000000line\n"-ish: many lines, then a recognisable end.
    command = f"yes 0123456789abcde | head -c {total}; echo THE-END"
    progress = LengthsProgress()
    tracemalloc.start()
    try:
        with trio.fail_after(30):
            run_ = task_run(executor.ctx, shell_task(command), progress, None)  # type: ignore[arg-type]
            outcome = await executor(run_)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert outcome.ok and outcome.output_truncated
    out = outcome.output
    assert out.startswith("0123456789abcde\n0123456789abcde\n")
    assert out.endswith("0123456789abcde\nTHE-END\n")
    omitted = total + len("THE-END\n") - 4096
    assert f"\n…[{omitted} bytes omitted]…\n" in out
    assert len(out.encode()) <= 4096 + 64
    # The full text is in the log (plus the header and footer lines).
    log_size = executor.ctx.log_path("t1").stat().st_size
    assert total + 8 < log_size < total + 8 + 1024
    # Every progress event is clipped; memory stayed far below what was printed.
    assert progress.lengths and max(progress.lengths) <= PROGRESS_TEXT_MAX + 40
    # 3.1-4.5 MB in 10 runs: a block read, its text, its bytes and the log's buffer.
    assert peak < 8 * 1024 * 1024, peak


async def test_very_long_line_without_newline(executor: ShellExecutor) -> None:
    size = 5 * 1024 * 1024
    outcome, progress = await run(executor, f"head -c {size} /dev/zero | tr '\\0' x")
    out: str = outcome.output  # type: ignore[attr-defined]
    assert outcome.ok and outcome.output_truncated  # type: ignore[attr-defined]
    assert out.startswith("x" * 2048) and out.endswith("x" * 2048)
    assert progress.texts("stdout")
    assert all(len(text) <= PROGRESS_TEXT_MAX + 40 for text in progress.texts("stdout"))
    assert executor.ctx.log_path("t1").stat().st_size > size


async def test_a_task_log_stops_at_its_bound_and_says_so(make_config: Any, tmp_path: Path) -> None:
    """One task printing at full speed must not fill the state disk: its log
    stops at `task_log_max_bytes` with a line saying why, the task runs on to
    its end, and its result still has the output's tail."""
    repo = tmp_path / "repo"
    repo.mkdir()
    bound = 256 * 1024
    executor = ShellExecutor(
        make_ctx(make_config(repo_dir=str(repo), output_cap_bytes=4096, task_log_max_bytes=bound))
    )
    outcome, _ = await run(executor, "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo THE-END")
    assert outcome.ok and outcome.output.endswith("THE-END\n")  # type: ignore[attr-defined]
    log = executor.ctx.log_path("t1").read_bytes()
    assert bound <= len(log) < bound + 200
    assert log.endswith(
        b"log cut short: the log reached task_log_max_bytes (262144 bytes);"
        b" the rest of the output is not logged\n"
    )


# --------------------------------------------------------------------------
# Cancellation


async def test_cancel_kills_the_group_and_propagates(executor: ShellExecutor) -> None:
    task = shell_task("trap '' TERM; sleep 1000 & echo $!; wait")
    seen = trio.Event()

    class Watch(RecordingProgress):
        async def emit(self, event_type: str, text: str, **kw: object) -> None:
            await super().emit(event_type, text)
            seen.set()

    progress = Watch("t1")
    with trio.fail_after(20):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(executor, task_run(executor.ctx, task, progress))  # type: ignore[arg-type]
                await seen.wait()
                scope.cancel()
    assert scope.cancelled_caught
    pid = int(progress.texts("stdout")[0])
    assert await wait_dead(pid, limit_s=2)
    assert "=== cancelled" in executor.ctx.log_path("t1").read_text()


# --------------------------------------------------------------------------
# OutputCapture


def test_capture_small_output_is_kept_whole(tmp_path: Path) -> None:
    with OutputCapture(10, tmp_path / "logs" / "a.log") as cap:
        cap.write("héllo")
        cap.write("!", keep=False)
        assert not cap.truncated and cap.text() == "héllo"
    assert (tmp_path / "logs" / "a.log").read_text() == "héllo!"


def test_capture_keeps_head_and_tail_with_a_count(tmp_path: Path) -> None:
    cap = OutputCapture(10, tmp_path / "b.log")
    for chunk in ("abc", "defgh", "ijklmnop", "qrstuvwxyz"):
        cap.write(chunk)
    cap.close()
    cap.close()  # idempotent
    assert cap.truncated and cap.omitted_bytes == 16
    assert cap.text() == "abcde\n…[16 bytes omitted]…\nvwxyz"
    assert (tmp_path / "b.log").read_text() == "abcdefghijklmnopqrstuvwxyz"


def test_capture_memory_is_bounded_by_the_cap(tmp_path: Path) -> None:
    cap = OutputCapture(1000, None)
    block = "y" * 100_000
    for _ in range(50):
        cap.write(block)
    assert len(cap._head) + len(cap._tail) == 1000
    assert cap.total_bytes == 5_000_000


def test_capture_does_not_break_multibyte_characters_at_the_cut(tmp_path: Path) -> None:
    cap = OutputCapture(7, None)
    cap.write("€€€€€€")  # 3 bytes each
    text = cap.text()
    assert "\ufffd" not in text
    assert text.startswith("€") and text.endswith("€")


async def test_open_log_makes_the_missing_directory_and_appends_to_an_existing_log(tmp_path: Path) -> None:
    fresh = tmp_path / "new" / "deeper" / "a.log"
    with OutputCapture(64, fresh) as cap:
        await cap.open_log()
        cap.write("one\n")
    assert fresh.read_text() == "one\n"
    with OutputCapture(64, fresh) as again:  # a later run of the task: the log grows
        await again.open_log()
        again.write("two\n")
    assert fresh.read_text() == "one\ntwo\n"


async def test_a_log_whose_file_object_cannot_be_made_is_unavailable_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logs: Logs
) -> None:
    """The descriptor came back from the thread but wrapping it failed: the fd is not leaked,
    the log is reported unavailable, and a writer held back by `wait_room` goes on."""

    def refuse(fd: int) -> None:
        os.close(fd)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(output, "_as_file", refuse)
    before = set(os.listdir("/proc/self/fd"))
    with OutputCapture(64, tmp_path / "a.log") as cap:
        await cap.open_log()
        cap.write("still kept\n")
        await cap.wait_room()
        assert cap.text() == "still kept\n"
    assert cap.log_error == "Input/output error"
    [warning] = logs.named("task_log_unavailable")
    assert warning["error"] == "Input/output error"
    assert set(os.listdir("/proc/self/fd")) == before


async def test_log_file_is_closed_even_on_cancel(executor: ShellExecutor) -> None:
    before = set(os.listdir("/proc/self/fd"))
    with trio.move_on_after(0.2):
        await executor(task_run(executor.ctx, shell_task("sleep 1000"), RecordingProgress("t1")))  # type: ignore[arg-type]
    assert set(os.listdir("/proc/self/fd")) == before


async def test_a_task_whose_log_cannot_be_created_still_runs(executor: ShellExecutor, logs: Logs) -> None:
    log_dir = executor.ctx.log_dir
    log_dir.parent.mkdir(parents=True, exist_ok=True)
    log_dir.write_text("a file where the log directory should be")
    outcome, progress = await run(executor, "echo still-here")
    assert outcome.ok and outcome.output == "still-here\n"  # type: ignore[attr-defined]
    assert progress.texts("stdout") == ["still-here\n"]
    [warning] = logs.named("task_log_unavailable")
    assert warning["path"] == str(executor.ctx.log_path("t1")) and warning["error"]


def _gate_log_creates(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Every log create waits (in its thread) until the returned event is set."""
    gate = threading.Event()
    real_open = output._open_append_fd

    def slow_open(path: Path) -> int:
        gate.wait(30)
        return real_open(path)

    monkeypatch.setattr(output, "_open_append_fd", slow_open)
    return gate


async def test_output_waits_in_the_buffer_while_the_log_is_being_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log is created in a worker thread (a new file can wait on the disk):
    what arrives meanwhile is buffered, and a writer is held back once the buffer is full."""
    gate = _gate_log_creates(monkeypatch)
    path = tmp_path / "logs" / "slow.log"
    block = "z" * 100_000 + "\n"
    cap = OutputCapture(64, path)
    held_back = trio.Event()
    wrote_all = trio.Event()

    async def writer() -> None:
        for _ in range(5):
            cap.write(block)
            if len(cap._buf) >= output._LOG_BUFFER:
                held_back.set()
            await cap.wait_room()
        wrote_all.set()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(cap.open_log)
            await trio.testing.wait_all_tasks_blocked()  # open_log is in its thread
            nursery.start_soon(writer)
            await held_back.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert not wrote_all.is_set() and not path.exists()
            gate.set()
        cap.close()
    assert wrote_all.is_set()
    assert path.read_text() == block * 5


async def test_a_short_tasks_end_does_not_wait_for_its_logs_create(  # type: ignore[no-untyped-def]
    make_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a `handoff` (the daemon's nursery), a create that outlasts the task finishes
    after the task's end, and then writes the whole log and closes it."""
    gate = _gate_log_creates(monkeypatch)
    repo = tmp_path / "repo"
    repo.mkdir()
    before = set(os.listdir("/proc/self/fd"))
    with trio.fail_after(30):
        async with trio.open_nursery() as daemon:

            def handoff(fn: object) -> bool:
                daemon.start_soon(fn)  # type: ignore[arg-type]
                return True

            ctx = attrs.evolve(make_ctx(make_config(repo_dir=str(repo))), handoff=handoff)
            executor = ShellExecutor(ctx)
            outcome, _ = await run(executor, "echo quick")
            assert outcome.ok and outcome.output == "quick\n"  # type: ignore[attr-defined]
            log_path = ctx.log_path("t1")
            assert not log_path.exists()  # its create is still held at the gate
            gate.set()
        # The daemon's nursery waited for the create, which wrote the log and closed it.
    text = log_path.read_text()
    assert "run: /bin/sh -c 'echo quick'" in text and "quick\n" in text and "exit code 0" in text
    assert set(os.listdir("/proc/self/fd")) == before


async def test_an_open_that_fails_otherwise_than_by_the_disk_leaves_no_log_not_a_crash(
    tmp_path: Path, logs: Logs
) -> None:
    """A handed-off open runs in the daemon's nursery: it must not raise there (a stopped store thread)."""

    async def stopped(fn: Callable[[], T]) -> T:
        raise RuntimeError("the store thread has stopped")

    with OutputCapture(64, tmp_path / "x.log") as cap:
        await cap.open_log(stopped)
        cap.write("still captured\n")
    assert cap.log_error == "the store thread has stopped" and cap.text() == "still captured\n"
    assert not (tmp_path / "x.log").exists()
    assert logs.named("task_log_unavailable")
