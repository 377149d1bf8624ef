"""The legacy wake path (protocol.md, "Legacy wake path").

The configured `wake_command` wakes an agent, which confirms by creating
`results_dir/<task_id>.started` and finishes by writing
`results_dir/<task_id>.json`.

No injection: the original substituted `${TASK_ID}`, `${TASK_JSON}` and
`${TASK_DESCRIPTION}` into the shell text (escaping only double quotes), so a
description holding `$(…)` ran code. Here the template is never edited: the
values are passed as environment variables TASK_ID, TASK_JSON and
TASK_DESCRIPTION and `/bin/sh -c <template>` expands `${TASK_ID}` itself. The
result of a parameter expansion is never parsed again as shell code, so `$(…)`,
backticks and `;` inside a value stay text. (A template that leaves
`${TASK_DESCRIPTION}` unquoted still gets field splitting and globbing of the
value, as any shell variable does, but never command substitution: quote it,
`"${TASK_DESCRIPTION}"`, to pass it as one word.) A placeholder inside single
quotes, which sh would leave as text, is made to expand (`waketemplate`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..config import Config
from ..log import get_logger
from ..messages import LIMITS, Outcome, Task, converter, now_ms, truncate
from ..output import OutputCapture
from ..procs import child_env, describe_returncode, kill_marked, run_child
from ..progress import ProgressSender
from ..taskrun import TaskRun
from . import ExecContext
from .shell import clip_progress
from .waketemplate import expand_in_single_quotes

log = get_logger(__name__)

# Back-off before each retry of a failing wake command (1 attempt + 3 retries).
RETRY_DELAYS_S = (5.0, 15.0, 30.0)
# How often the results directory is looked at.
POLL_S = 0.2
# A result file that does not parse is re-read until it stops changing (the
# agent may still be writing it), up to this many times, this far apart.
_PARSE_SETTLE_S = 0.5
_PARSE_ROUNDS = 20
_ERROR_TAIL = 1000


def _env_safe(value: str) -> str:
    """An environment value cannot hold NUL or lone surrogates."""
    return value.replace("\0", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _file_safe(task_id: str) -> bool:
    return task_id not in ("", ".", "..") and "/" not in task_id and "\0" not in task_id


def task_json(task: Task) -> str:
    """The task as JSON for TASK_JSON: the frame as the hub sent it."""
    data: dict[str, Any] = task.raw or converter.unstructure(task)
    return json.dumps(data, default=str)


def results_dir_of(config: Config, state_dir: Path) -> Path:
    """Where woken agents write their files: `results_dir`, else `<state_dir>/results`."""
    return Path(config.results_dir) if config.results_dir else state_dir / "results"


def result_files(results: Path, task_id: str) -> tuple[Path, Path]:
    """The woken agent's confirmation (`<task_id>.started`) and result (`<task_id>.json`)."""
    return results / f"{task_id}.started", results / f"{task_id}.json"


def _unlink_quietly(paths: tuple[Path, ...]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("wake_cleanup_failed", path=str(path), error=str(exc))


def discard_result_files(config: Config, task_id: str) -> None:
    """Remove a task's wake files when the task ends without reaching the executor.

    A wake task held at a kill -9 and then reassigned by the hub after the
    restart never runs here again, so the executor's own clean-up never comes.
    Synchronous (two unlinks), so callers in shielded clean-up need no deadline.
    """
    if _file_safe(task_id):
        _unlink_quietly(result_files(results_dir_of(config, config.resolved_state_dir()), task_id))


class WakeExecutor:
    """Wakes an agent with `wake_command` and waits for its result file."""

    def __init__(self, ctx: ExecContext) -> None:
        self.ctx = ctx
        self._template: str | None = None
        if ctx.config.wake_command:
            self._template, requoted = expand_in_single_quotes(ctx.config.wake_command)
            if requoted:
                log.info("wake_command_requoted", placeholders_in_single_quotes=requoted)

    @property
    def results_dir(self) -> Path:
        return results_dir_of(self.ctx.config, self.ctx.state_dir)

    async def __call__(self, run: TaskRun) -> Outcome:
        task = run.task
        if not self._template:
            return Outcome(
                ok=False,
                error="legacy wake task, but this sidecar has no wake_command configured",
                reason="no_wake_command",
                transient=False,
            )
        if not _file_safe(task.task_id):
            return Outcome(
                ok=False,
                error=f"task_id {task.task_id!r} cannot name a result file",
                reason="bad_task_id",
                transient=False,
            )
        results = self.results_dir
        started, result = result_files(results, task.task_id)
        marker = run.marker
        try:
            results.mkdir(parents=True, exist_ok=True)
            # Files a killed earlier run of this task left behind are not this run's.
            for path in (started, result):
                path.unlink(missing_ok=True)
            return await self._wake_and_wait(run, self._template, started, result)
        except OSError as exc:
            return Outcome(ok=False, error=f"results directory {results}: {exc}", reason="results_dir_error")
        finally:
            # The task ends here: its result files and every process it started
            # (the woken agent included) go. Synchronous, so no shield needed.
            _unlink_quietly((started, result))
            kill_marked(marker)

    async def _wake_and_wait(self, run: TaskRun, template: str, started: Path, result: Path) -> Outcome:
        """Wake the agent, then wait for its confirmation and its result.

        A command that runs the agent in the foreground (the onboarding tool's
        `openclaw agent --message …` does) has confirmed long before it exits.
        So an attempt that reaches its bound is first asked whether the agent
        confirmed: if so it runs on, bounded by the task's limit only, the
        result is waited for while it runs, and no attempt follows, whatever the
        command does (found from outside: such an agent was killed at 60 s and
        woken four times). A command that fails after the agent confirmed is not
        a failed wake either. The files are looked at when an attempt ends or
        reaches its bound, not on a timer, while a command runs.
        """
        confirmation = _Confirmation(started, result)
        wake_error: list[str | None] = []

        async def wake() -> None:
            wake_error.append(await self._wake(run, template, confirmation))
            confirmation.changed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wake)
            await confirmation.changed.wait()
            try:
                outcome = await self._outcome(run, confirmation, wake_error)
            except OSError as exc:  # here, not outside: the nursery would wrap it in a group
                outcome = Outcome(
                    ok=False, error=f"results directory {result.parent}: {exc}", reason="results_dir_error"
                )
            # A wake command still running (a foreground agent that wrote its
            # result) is killed with the task's other processes (see __call__).
            nursery.cancel_scope.cancel()
        return outcome

    async def _outcome(
        self, run: TaskRun, confirmation: _Confirmation, wake_error: list[str | None]
    ) -> Outcome:
        """Once the wake has ended or the agent has confirmed: the task's outcome."""
        task = run.task
        if not confirmation.check():
            error = wake_error[0]
            if error is not None:
                return Outcome(ok=False, error=error, reason="wake_failed", transient=False)
            timeout_ms = self.ctx.config.confirmation_timeout_ms
            with trio.move_on_after(timeout_ms / 1000):
                await _poll_until(confirmation.check)
            if not confirmation.check():
                log.warning("wake_confirmation_timeout", task_id=task.task_id, timeout_ms=timeout_ms)
                return Outcome(
                    ok=False,
                    error=f"woken agent did not create {confirmation.started.name} within {timeout_ms} ms",
                    reason="confirmation_timeout",
                    transient=False,
                )
        await run.progress.emit("status", "agent confirmed; waiting for its result")
        await _poll_until(confirmation.result.exists)
        return await self._read_result(confirmation.result)

    async def _wake(self, run: TaskRun, template: str, confirmation: _Confirmation) -> str | None:
        """Run the wake command with retries; None on success (or once the agent
        has confirmed), else the last error."""
        cfg = self.ctx.config
        task, progress, marker = run.task, run.progress, run.marker
        env = child_env(os.environ, marker, secrets=[cfg.token])
        env["TASK_ID"] = _env_safe(task.task_id)
        env["TASK_JSON"] = _env_safe(task_json(task))
        env["TASK_DESCRIPTION"] = _env_safe(task.description)
        cwd = run.workdir
        if not cwd.is_dir():
            cwd = self.ctx.state_dir if self.ctx.state_dir.is_dir() else Path("/")
        attempts = len(RETRY_DELAYS_S) + 1
        error: str | None = "not run"
        for attempt in range(1, attempts + 1):
            await progress.emit("status", f"wake attempt {attempt}/{attempts}")
            status, error = await self._attempt(template, cwd, env, marker, progress, confirmation)
            await self._report(task, status, attempt, error)
            if error is None:
                log.info("wake_ok", task_id=task.task_id, attempt=attempt)
                if not confirmation.check():
                    await progress.emit("status", f"wake command ran; waiting for {task.task_id}.started")
                return None
            if confirmation.check():
                # The agent is at work: what its wake command does now is not a failed wake.
                log.warning("wake_command_failed_after_confirmation", task_id=task.task_id, error=error)
                await progress.emit("status", f"wake command ended ({error}) after the agent confirmed")
                return None
            log.warning("wake_attempt_failed", task_id=task.task_id, attempt=attempt, error=error)
            if attempt < attempts:
                delay = RETRY_DELAYS_S[attempt - 1]
                await progress.emit(
                    "status", f"wake attempt {attempt}/{attempts} failed ({error}); retrying in {delay:g} s"
                )
                await trio.sleep(delay)
        await progress.emit("error", f"wake command failed {attempts} times: {error}")
        return f"wake command failed after {attempts} attempts: {error}"

    async def _report(self, task: Task, status: str, attempt: int, error: str | None) -> None:
        """`wake_result` for one attempt, to a hub that accepts the type (protocol.md)."""
        if self.ctx.notify is None:
            return
        frame: dict[str, Any] = {
            "type": "wake_result",
            "task_id": task.task_id,
            "status": status,
            "attempt": attempt,
            "generation": task.generation,
            "timestamp": now_ms(),
        }
        if error is not None:
            frame["error"] = truncate(error, LIMITS["error"])
        await self.ctx.notify(frame)

    async def _attempt(
        self,
        template: str,
        cwd: Path,
        env: dict[str, str],
        marker: str,
        progress: ProgressSender,
        confirmation: _Confirmation,
    ) -> tuple[str, str | None]:
        """("success", None), or ("failed" | "timeout", why). Bounded by
        `wake_attempt_timeout_s`, unless the agent has confirmed when it is reached."""
        cfg = self.ctx.config
        err = OutputCapture(4 * _ERROR_TAIL, None)

        async def on_stdout(block: str) -> None:
            await progress.emit("stdout", clip_progress(block))

        async def on_stderr(block: str) -> None:
            err.write(block)
            await progress.emit("stderr", clip_progress(block))

        try:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:

                    async def bound() -> None:
                        await trio.sleep(cfg.wake_attempt_timeout_s)
                        if confirmation.check():
                            log.info("wake_command_runs_on", reason="agent confirmed")
                            return
                        scope.cancel()

                    nursery.start_soon(bound)
                    res = await run_child(
                        ["/bin/sh", "-c", template],
                        cwd=cwd,
                        env=env,
                        marker=marker,
                        on_stdout=on_stdout,
                        on_stderr=on_stderr,
                        grace_s=cfg.kill_grace_s,
                        batch_lines=True,
                        # The command may leave the woken agent running: it is
                        # killed at task end (see __call__), not when the command exits.
                        kill_leftovers=False,
                    )
                    nursery.cancel_scope.cancel()
        except OSError as exc:
            return "failed", f"could not start /bin/sh: {exc}"
        if scope.cancelled_caught:
            return "timeout", f"timed out after {cfg.wake_attempt_timeout_s:g} s"
        if res.returncode != 0:
            tail = err.tail_text(_ERROR_TAIL).strip()
            return "failed", describe_returncode(res.returncode) + (f": {tail}" if tail else "")
        return "success", None

    async def _read_result(self, path: Path) -> Outcome:
        """Parse the agent's result file, waiting out a write still in progress."""
        previous: bytes | None = None
        problem = "empty file"
        for _ in range(_PARSE_ROUNDS):
            data = await trio.Path(path).read_bytes()
            try:
                obj = json.loads(data)
            except (ValueError, RecursionError) as exc:
                problem = str(exc)
            else:
                if isinstance(obj, dict):
                    return _outcome_of(obj)
                problem = f"expected a JSON object, got {type(obj).__name__}"
                break
            if data == previous:
                break
            previous = data
            await trio.sleep(_PARSE_SETTLE_S)
        log.warning("wake_result_unparsable", path=str(path), error=problem)
        return Outcome(ok=False, error=f"result_parse_error: {problem}", reason="result_parse_error")


class _Confirmation:
    """Whether the woken agent has confirmed (its `.started` or its result exists);
    `changed` is set once it has, or once the wake has ended."""

    def __init__(self, started: Path, result: Path) -> None:
        self.started = started
        self.result = result
        self.changed = trio.Event()
        self._seen = False

    def check(self) -> bool:
        if not self._seen and (_exists(self.started) or _exists(self.result)):
            self._seen = True
            self.changed.set()
        return self._seen


def _exists(path: Path) -> bool:
    """`path.exists()`, False where the file system refuses to say (EACCES)."""
    try:
        return path.exists()
    except OSError:
        return False


async def _poll_until(check: Callable[[], bool]) -> None:
    """Look at the file system every POLL_S until `check()` holds."""
    while True:
        if check():
            return
        await trio.sleep(POLL_S)


def _outcome_of(obj: dict[str, Any]) -> Outcome:
    output = obj.get("output")
    text = output if isinstance(output, str) else ("" if output is None else json.dumps(output))
    if obj.get("status") == "success":
        return Outcome(ok=True, output=text, result=obj, model_used=str(obj.get("model_used") or "none"))
    reason = obj.get("reason") or obj.get("error") or "unknown"
    error = obj.get("error") or obj.get("reason") or f"woken agent reported status {obj.get('status')!r}"
    return Outcome(ok=False, output=text, error=str(error), reason=str(reason), transient=False)
