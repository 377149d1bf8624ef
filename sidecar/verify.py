"""Verification: run a task's `verification_steps` and build the hub's report.

Check types (protocol.md, "Verification"):

- `file_exists`: the target path exists (a relative one is resolved against
  the task's working directory);
- `test_passes`: target `auto` runs `mix test`, `npm test` or `make test`,
  whichever the working directory's files call for; any other target is the
  command;
- `git_clean`: `git status --porcelain` prints nothing (the sidecar's own files aside), in the target
  directory or the working directory;
- `command_succeeds`: the target command exits 0;
- any other type is an `error` check naming the type.

Every check runs, whatever the ones before it gave, each as its own child
through `procs.run_child` (own process group, the task's marker, SIGTERM then
SIGKILL on cancellation), in the working directory, its output captured and
capped. A command target is split with shell rules (`shlex`) into an argv and
run without a shell: nothing from a task reaches `/bin/sh`; a check that needs
a pipeline says so itself (`sh -c '…'`), and one that uses shell syntax
unquoted (`&&`, `|`, `>`, `$(…)`) is an `error` check rather than a false pass.

`verification_timeout_ms` bounds all the checks together. When it expires the
check that is running is killed and the report's status is `timeout`: unlike
the original (whose blocking `execSync` kept the timer from ever firing), it
does fire. The report has exactly the original's shape.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from .gitflow import own_excludes
from .log import get_logger
from .messages import now_ms
from .output import OutputCapture
from .procs import describe_returncode, run_child

log = get_logger(__name__)

Emit = Callable[[str, str], Awaitable[None]]

PASS, FAIL, ERROR, TIMEOUT, SKIP, AUTO_PASS = "pass", "fail", "error", "timeout", "skip", "auto_pass"
# Output kept per check (head + tail): the report is stored and shown by the hub.
CHECK_OUTPUT_CAP_BYTES = 4096
# Test runners `test_passes: auto` knows, in the original's order.
TEST_RUNNERS: tuple[tuple[str, list[str]], ...] = (
    ("mix.exs", ["mix", "test"]),
    ("package.json", ["npm", "test"]),
    ("Makefile", ["make", "test"]),
)
NOT_RUN = "not run: the verification time limit was reached first"


@attrs.frozen
class Step:
    """One entry of `verification_steps`, read leniently (a bad entry becomes an error check)."""

    type: str
    target: str | None
    description: str | None
    problem: str | None = None

    @classmethod
    def of(cls, raw: Any) -> Step:
        if not isinstance(raw, dict):
            return cls("invalid", None, None, f"verification step is not an object: {raw!r:.200}")
        kind, target, desc = raw.get("type"), raw.get("target"), raw.get("description")
        return cls(
            kind if isinstance(kind, str) else repr(kind),
            target if isinstance(target, str) else (None if target is None else str(target)),
            desc if isinstance(desc, str) else None,
        )


@attrs.define
class _Running:
    """The check in progress, so that a time-out can still report what it printed."""

    step: Step
    started: float
    output: OutputCapture


def _summary(checks: Sequence[Mapping[str, Any]], total: int) -> dict[str, int]:
    statuses = [c["status"] for c in checks]
    return {
        "total": total,
        "passed": statuses.count(PASS),
        "failed": statuses.count(FAIL),
        "errors": statuses.count(ERROR),
        "timed_out": statuses.count(TIMEOUT),
    }


def overall_status(checks: Sequence[Mapping[str, Any]]) -> str:
    """`error` beats `fail` beats `pass` (a time-out is decided by the caller)."""
    statuses = {c["status"] for c in checks}
    if ERROR in statuses:
        return ERROR
    if FAIL in statuses:
        return FAIL
    return PASS


def empty_report(task_id: str, status: str, timeout_ms: int, run_number: int = 1) -> dict[str, Any]:
    """A report with no checks: `skip` (skip_verification) or `auto_pass` (no steps)."""
    return {
        "task_id": task_id,
        "run_number": run_number,
        "status": status,
        "started_at": now_ms(),
        "duration_ms": 0,
        "timeout_ms": timeout_ms,
        "checks": [],
        "summary": _summary([], 0),
    }


_OPERATOR_CHARS = frozenset(";&|<>")


def shell_syntax(command: str) -> str | None:
    """The first piece of shell syntax in `command` that a shell would act on and
    an argv cannot carry (an operator, a redirection, a command substitution), or
    None. Quoted text is text, but `$(` and backticks act inside double quotes too.

    Found from outside: `true && make test` passed without running the tests,
    `&&`, `make` and `test` being arguments of `true`. The original ran targets
    through a shell; here they never are, so such a check is an `error` that
    says why, not a false pass.
    """
    quote: str | None = None
    i = 0
    while i < len(command):
        c = command[i]
        if c == "\\" and quote != "'":
            i += 2
            continue
        if quote == "'":
            quote = None if c == "'" else quote
        elif c == "`" or command.startswith("$(", i):
            return command[i : i + 2] if c == "$" else c
        elif quote == '"':
            quote = None if c == '"' else quote
        elif c in "'\"":
            quote = c
        elif c in _OPERATOR_CHARS:
            j = i
            while j < len(command) and command[j] in _OPERATOR_CHARS:
                j += 1
            return command[i:j]
        i += 1
    return None


def _check(step: Step, status: str, output: str, duration_s: float) -> dict[str, Any]:
    return {
        "type": step.type,
        "target": step.target,
        "description": step.description,
        "status": status,
        "output": output,
        "duration_ms": round(duration_s * 1000),
    }


def _resolve(cwd: Path, target: str) -> Path:
    path = Path(target).expanduser()
    return path if path.is_absolute() else cwd / path


class _Checker:
    """Runs the checks of one verification run."""

    def __init__(
        self, cwd: Path, marker: str, env: Mapping[str, str], grace_s: float, own: Sequence[Path] = ()
    ) -> None:
        self.cwd = cwd
        self.marker = marker
        self.env = dict(env)
        self.grace_s = grace_s
        self.own = own

    async def run(self, running: _Running) -> tuple[str, str]:
        """(status, output) of one check; a target the system cannot look at is an error of the check.

        Such as a path too long for the file system, or `~user` of no user.
        """
        try:
            return await self._run(running)
        except (OSError, RuntimeError, ValueError) as exc:
            return ERROR, f"cannot check {running.step.target!r:.200}: {type(exc).__name__}: {exc}"[:2000]

    async def _run(self, running: _Running) -> tuple[str, str]:
        step = running.step
        if step.problem is not None:
            return ERROR, step.problem
        if step.type == "file_exists":
            return await self._file_exists(step)
        if step.type == "test_passes":
            return await self._test_passes(step, running.output)
        if step.type == "git_clean":
            return await self._git_clean(step, running.output)
        if step.type == "command_succeeds":
            if not step.target or not step.target.strip():
                return ERROR, "command_succeeds needs a command in `target`"
            return await self._command(step.target, self.cwd, running.output)
        return ERROR, f"Unknown check type: {step.type}"

    async def _file_exists(self, step: Step) -> tuple[str, str]:
        if not step.target:
            return ERROR, "file_exists needs a path in `target`"
        path = _resolve(self.cwd, step.target)
        if await trio.Path(path).exists():
            return PASS, ""
        return FAIL, f"File not found: {path}"

    async def _test_passes(self, step: Step, out: OutputCapture) -> tuple[str, str]:
        target = (step.target or "auto").strip()
        if target != "auto":
            return await self._command(target, self.cwd, out)
        for name, argv in TEST_RUNNERS:
            if await trio.Path(self.cwd / name).exists():
                return await self._argv(argv, self.cwd, out)
        looked = ", ".join(name for name, _ in TEST_RUNNERS)
        return ERROR, f"no test runner found in {self.cwd} (looked for {looked})"

    async def _git_clean(self, step: Step, out: OutputCapture) -> tuple[str, str]:
        where = _resolve(self.cwd, step.target) if step.target else self.cwd
        argv = ["git", "status", "--porcelain", *own_excludes(where, self.own)]
        status, text = await self._argv(argv, where, out)
        if status == PASS and text.strip():
            return FAIL, text
        return status, text

    async def _command(self, command: str, cwd: Path, out: OutputCapture) -> tuple[str, str]:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            return ERROR, f"cannot parse command {command!r}: {exc}"
        if not argv:
            return ERROR, "empty command"
        syntax = shell_syntax(command)
        if syntax is not None:
            return ERROR, (
                f"the command uses shell syntax ({syntax!r}), and checks run without a shell: "
                f"write sh -c '…' to run it in one"
            )
        return await self._argv(argv, cwd, out)

    async def _argv(self, argv: list[str], cwd: Path, out: OutputCapture) -> tuple[str, str]:
        async def collect(block: str) -> None:
            out.write(block)

        if not await trio.Path(cwd).is_dir():
            return ERROR, f"directory {cwd} does not exist"
        try:
            res = await run_child(
                argv,
                cwd=cwd,
                env=self.env,
                marker=self.marker,
                on_stdout=collect,
                on_stderr=collect,
                grace_s=self.grace_s,
                batch_lines=True,
            )
        except FileNotFoundError:
            return ERROR, f"command not found: {argv[0]}"
        except OSError as exc:
            return ERROR, f"could not start {argv[0]}: {exc}"
        text = out.text()
        if res.returncode == 0:
            return PASS, text
        ending = describe_returncode(res.returncode)
        return FAIL, f"{text.rstrip()}\n[{ending}]".lstrip()


async def run_verification(
    task_id: str,
    steps: Sequence[Any],
    *,
    cwd: Path,
    marker: str,
    env: Mapping[str, str],
    timeout_ms: int,
    emit: Emit,
    run_number: int = 1,
    skip: bool = False,
    grace_s: float = 5.0,
    own: Sequence[Path] = (),
) -> dict[str, Any]:
    """Run `steps` in `cwd` and return the report (never raises but `trio.Cancelled`).

    `emit(event_type, text)` gets a `status` event as each check starts and
    ends. `env` is the children's environment (build it with `procs.child_env`).
    `own`: the sidecar's own files, which `git_clean` leaves out.
    """
    if skip:
        log.info("verification_skipped", task_id=task_id)
        return empty_report(task_id, SKIP, timeout_ms, run_number)
    if not steps:
        return empty_report(task_id, AUTO_PASS, timeout_ms, run_number)
    parsed = [Step.of(s) for s in steps]
    checker = _Checker(cwd, marker, env, grace_s, own)
    checks: list[dict[str, Any]] = []
    started_at, t0 = now_ms(), trio.current_time()
    n = len(parsed)
    running: _Running | None = None
    log.info("verification_started", task_id=task_id, run=run_number, checks=n, timeout_ms=timeout_ms)
    with trio.move_on_after(timeout_ms / 1000) as scope:
        for i, step in enumerate(parsed, 1):
            what = f"{step.type} {step.target}" if step.target else step.type
            await emit("status", f"verification {i}/{n}: {what}…")
            running = _Running(step, trio.current_time(), OutputCapture(CHECK_OUTPUT_CAP_BYTES, None))
            status, output = await checker.run(running)
            duration = trio.current_time() - running.started
            checks.append(_check(step, status, output, duration))
            running = None
            await emit("status", f"verification {i}/{n} {status}: {what} ({duration:.1f} s)")
    if scope.cancelled_caught:
        # What was running was killed (group SIGTERM, then SIGKILL) by run_child.
        if running is not None:
            partial = running.output.text().rstrip()
            note = f"killed: verification time limit of {timeout_ms} ms reached"
            output = f"{partial}\n[{note}]" if partial else f"[{note}]"
            checks.append(_check(running.step, TIMEOUT, output, trio.current_time() - running.started))
        for step in parsed[len(checks) :]:
            checks.append(_check(step, TIMEOUT, NOT_RUN, 0.0))
        status = TIMEOUT
    else:
        status = overall_status(checks)
    summary = _summary(checks, n)
    duration_ms = round((trio.current_time() - t0) * 1000)
    log.info(
        "verification_finished",
        task_id=task_id,
        run=run_number,
        status=status,
        passed=summary["passed"],
        total=n,
        duration_ms=duration_ms,
    )
    await emit("status", f"verification {status}: {summary['passed']}/{n} checks passed")
    return {
        "task_id": task_id,
        "run_number": run_number,
        "status": status,
        "started_at": started_at,
        "duration_ms": duration_ms,
        "timeout_ms": timeout_ms,
        "checks": checks,
        "summary": summary,
    }
