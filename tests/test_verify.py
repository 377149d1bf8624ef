"""Verification: each check type, the report's shape, the time limit, a live event loop.

Checks run as real children in tmp_path. Time-outs run on a MockClock that
jumps only after 10 ms of real idleness, so a hanging child is killed at the
virtual `verification_timeout_ms` without a real wait.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from sidecar import procs
from sidecar import verify as verify_mod
from sidecar.verify import run_verification
from tests.fakes.proc_helpers import RecordingProgress
from tests.gitrepos import git, make_origin

from .harness import alive

MARKER = "sc-verify-test-marker"
REPORT_KEYS = [
    "task_id",
    "run_number",
    "status",
    "started_at",
    "duration_ms",
    "timeout_ms",
    "checks",
    "summary",
]
CHECK_KEYS = ["type", "target", "description", "status", "output", "duration_ms"]


async def verify(cwd: Path, steps: list[Any], **kw: Any) -> tuple[dict[str, Any], RecordingProgress]:
    progress = RecordingProgress("t1")
    report = await run_verification(
        "t1",
        steps,
        cwd=cwd,
        marker=MARKER,
        env=procs.child_env(os.environ, MARKER),
        timeout_ms=kw.pop("timeout_ms", 120_000),
        emit=progress.emit,
        grace_s=kw.pop("grace_s", 0.5),
        **kw,
    )
    return report, progress


def step(kind: str, target: str | None, description: str | None = None) -> dict[str, Any]:
    return {"type": kind, "target": target, "description": description}


PY = sys.executable


def wait_for_file(path: Path, limit_s: float = 10.0) -> None:
    """In a worker thread: until `path` holds something (real time, the loop is not blocked)."""
    end = time.monotonic() + limit_s
    while not (path.exists() and path.read_text()):
        if time.monotonic() > end:
            raise TimeoutError(path)
        time.sleep(0.005)


@pytest.mark.parametrize(
    ("setup", "check", "status"),
    [
        ("touch", step("file_exists", "made.txt"), "pass"),
        ("", step("file_exists", "made.txt"), "fail"),
        ("touch", step("file_exists", "{cwd}/made.txt"), "pass"),
        ("makefile_ok", step("test_passes", "auto"), "pass"),
        ("makefile_bad", step("test_passes", "auto"), "fail"),
        ("", step("test_passes", "auto"), "error"),
        ("", step("test_passes", f"{PY} -c 'import sys; sys.exit(0)'"), "pass"),
        ("", step("test_passes", f"{PY} -c 'import sys; sys.exit(3)'"), "fail"),
        ("git_clean", step("git_clean", None), "pass"),
        ("git_dirty", step("git_clean", None), "fail"),
        ("git_dirty", step("git_clean", "checkout"), "fail"),
        ("", step("command_succeeds", "true"), "pass"),
        ("", step("command_succeeds", "false"), "fail"),
        ("", step("command_succeeds", "no-such-binary-xyz --flag"), "error"),
        ("", step("command_succeeds", "echo 'unbalanced"), "error"),
        ("", step("lint_passes", "x"), "error"),
        # Targets the system cannot look at are errors of their check, not of the
        # task (they raised out of the run: ENAMETOOLONG, `~user` of no user, NUL).
        ("", step("file_exists", "x" * 100_000), "error"),
        ("", step("file_exists", "~nosuchuser_zz/x"), "error"),
        ("", step("git_clean", "y" * 5000), "error"),
        ("", step("command_succeeds", "true\x00"), "error"),
    ],
)
async def test_each_check_type(tmp_path: Path, setup: str, check: dict[str, Any], status: str) -> None:
    cwd = tmp_path
    if setup == "touch":
        (cwd / "made.txt").write_text("x")
    elif setup.startswith("makefile"):
        code = "0" if setup == "makefile_ok" else "1"
        (cwd / "Makefile").write_text(f"test:\n\t@echo running tests\n\t@exit {code}\n")
    elif setup.startswith("git"):
        _bare, checkout = make_origin(tmp_path / "g")
        cwd = checkout if check["target"] is None else checkout.parent
        if setup == "git_dirty":
            (checkout / "stray.txt").write_text("x")
    if check["target"] and "{cwd}" in check["target"]:
        check = {**check, "target": check["target"].format(cwd=cwd)}
    report, _ = await verify(cwd, [check])
    assert report["status"] == status, report
    assert report["checks"][0]["status"] == status
    if check["type"] == "lint_passes":
        assert "lint_passes" in report["checks"][0]["output"]
    if setup == "git_dirty":
        assert "stray.txt" in report["checks"][0]["output"]
    if setup == "makefile_ok":
        assert "running tests" in report["checks"][0]["output"]


async def test_report_has_the_originals_shape_and_runs_every_check(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    steps = [
        step("file_exists", "a.txt", "a exists"),
        step("command_succeeds", "false", "fails"),
        step("file_exists", "b.txt"),
        step("command_succeeds", "echo hello"),
    ]
    report, progress = await verify(tmp_path, steps, run_number=2, timeout_ms=5000)
    assert list(report) == REPORT_KEYS
    assert all(list(c) == CHECK_KEYS for c in report["checks"])
    assert report["task_id"] == "t1" and report["run_number"] == 2 and report["timeout_ms"] == 5000
    assert [c["status"] for c in report["checks"]] == ["pass", "fail", "fail", "pass"]  # no fail-fast
    assert report["checks"][0]["description"] == "a exists" and report["checks"][2]["description"] is None
    assert report["checks"][3]["output"] == "hello\n"
    assert report["status"] == "fail"
    assert report["summary"] == {"total": 4, "passed": 2, "failed": 2, "errors": 0, "timed_out": 0}
    assert isinstance(report["started_at"], int) and report["started_at"] > 1_600_000_000_000
    # Each check's start and outcome is a status event.
    texts = progress.texts("status")
    assert texts[0].startswith("verification 1/4: file_exists a.txt")
    assert any(t.startswith("verification 2/4 fail: command_succeeds false") for t in texts)
    assert texts[-1] == "verification fail: 2/4 checks passed"


@pytest.mark.parametrize(
    ("statuses", "overall"),
    [(["pass", "fail", "error"], "error"), (["fail", "pass"], "fail"), (["pass", "pass"], "pass")],
)
async def test_error_beats_fail_beats_pass(tmp_path: Path, statuses: list[str], overall: str) -> None:
    by_status = {"pass": step("command_succeeds", "true"), "fail": step("command_succeeds", "false")}
    by_status["error"] = step("bogus", "x")
    report, _ = await verify(tmp_path, [by_status[s] for s in statuses])
    assert report["status"] == overall


async def test_skip_and_auto_pass(tmp_path: Path) -> None:
    skipped, _ = await verify(tmp_path, [step("command_succeeds", "false")], skip=True)
    assert skipped["status"] == "skip" and skipped["checks"] == []
    none, _ = await verify(tmp_path, [])
    assert none["status"] == "auto_pass" and none["summary"]["total"] == 0
    assert list(none) == REPORT_KEYS


async def test_output_is_capped(tmp_path: Path) -> None:
    report, _ = await verify(tmp_path, [step("command_succeeds", f"{PY} -c 'print(\"x\" * 100000)'")])
    output = report["checks"][0]["output"]
    assert report["status"] == "pass" and len(output) < 5000 and "bytes omitted" in output


async def test_hanging_check_is_killed_at_verification_timeout(
    tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    pidfile = tmp_path / "pid"
    code = f'import os, time; print("started", flush=True); open("{pidfile}", "w").write(str(os.getpid()))'
    hang = f"{PY} -c '{code}; time.sleep(1000)'"
    steps = [step("command_succeeds", "true"), step("command_succeeds", hang), step("file_exists", "x")]
    got: list[dict[str, Any]] = []

    async def run() -> None:
        got.append((await verify(tmp_path, steps, timeout_ms=30_000))[0])

    # Virtual time stands still until the child is up, then jumps to the limit.
    clock.autojump_threshold = math.inf
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.to_thread.run_sync(wait_for_file, pidfile)
        clock.autojump_threshold = 0.01
    elapsed = trio.current_time() - t0
    report = got[0]
    assert report["status"] == "timeout"
    assert 30 <= elapsed < 30 + 1, elapsed  # the limit, plus at most the kill grace (0.5 s)
    assert [c["status"] for c in report["checks"]] == ["pass", "timeout", "timeout"]
    assert "started" in report["checks"][1]["output"] and "killed" in report["checks"][1]["output"]
    assert report["summary"] == {"total": 3, "passed": 1, "failed": 0, "errors": 0, "timed_out": 2}
    pid = int(pidfile.read_text())
    assert not alive(pid)
    assert procs.find_marked(MARKER) == []


async def test_a_cancelled_verification_kills_its_check(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    hang = f'{PY} -c \'import os, time; open("{pidfile}", "w").write(str(os.getpid())); time.sleep(1000)\''
    with trio.move_on_after(5) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(verify, tmp_path, [step("command_succeeds", hang)])
            await trio.to_thread.run_sync(wait_for_file, pidfile)
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    assert not alive(int(pidfile.read_text()))


async def test_git_clean_counts_untracked_files(tmp_path: Path) -> None:
    _bare, checkout = make_origin(tmp_path / "g")
    (checkout / "README.md").write_text("changed\n")
    report, _ = await verify(checkout, [step("git_clean", None)])
    assert report["status"] == "fail" and "README.md" in report["checks"][0]["output"]
    git(checkout, "checkout", "README.md")
    report, _ = await verify(checkout, [step("git_clean", None)])
    assert report["status"] == "pass"


@pytest.mark.parametrize(
    ("command", "found"),
    [
        ("true && make test", "&&"),
        ("grep -q x f 2>/dev/null", ">"),
        ("a;b", ";"),
        ("x | y", "|"),
        ("echo $(id)", "$("),
        ('echo "$(id)"', "$("),
        ("echo `id`", "`"),
        ("make test", None),
        ('echo "a && b"', None),
        ("sh -c 'a && b; c | d'", None),
        ("echo '$(id)'", None),
        ("echo a\\;b", None),
        ('python -c "print(1>0)"', None),
    ],
)
def test_shell_syntax_is_found_outside_quotes(command: str, found: str | None) -> None:
    assert verify_mod.shell_syntax(command) == found


async def test_a_command_using_shell_syntax_is_an_error_not_a_false_pass(tmp_path: Path) -> None:
    """Found from outside: `true && touch x` passed without running `touch`."""
    steps = [{"type": "command_succeeds", "target": f"true && touch {tmp_path / 'x'}"}]
    report, _ = await verify(tmp_path, steps)
    [check] = report["checks"]
    assert check["status"] == "error" and "shell syntax ('&&')" in check["output"]
    assert "sh -c" in check["output"] and report["status"] == "error"
    assert not (tmp_path / "x").exists()
