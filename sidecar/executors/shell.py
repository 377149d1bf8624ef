"""Shell tasks: `metadata.shell_command` run by /bin/sh in the task directory.

stdout and stderr stream as `stdout` / `stderr` progress events (blocks of
whole lines, not one event per line: bulk output stays cheap and the batcher
coalesces anyway); everything goes to the task's log file; the result's
`output` is stdout, capped at `config.output_cap_bytes` (head + tail).
No retries or time limits here: the dispatcher and supervisor own those.
"""

from __future__ import annotations

import os
import time

import trio

from ..log import get_logger
from ..messages import Outcome
from ..output import OutputCapture
from ..procs import ChildResult, child_env, describe_returncode, run_child
from ..taskrun import TaskRun
from . import ExecContext

log = get_logger(__name__)

# One progress event carries at most this many characters (the newest ones):
# the dashboard view is a live tail, the full text is in the log and result.
PROGRESS_TEXT_MAX = 8 * 1024
# How much of stderr an error message quotes (the hub caps `error` at 2000).
ERROR_TAIL_BYTES = 1500
_STDERR_KEEP = 64 * 1024

NO_COMMAND = "sidecar task has no metadata.shell_command"


def clip_progress(text: str, limit: int = PROGRESS_TEXT_MAX) -> str:
    """Keep the last `limit` characters of a block, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"…[{len(text) - limit} chars omitted]…\n" + text[-limit:]


class ShellExecutor:
    """Runs a task's `shell_command` with `/bin/sh -c`."""

    def __init__(self, ctx: ExecContext) -> None:
        self.ctx = ctx

    async def __call__(self, run: TaskRun) -> Outcome:
        cfg = self.ctx.config
        progress = run.progress
        command = run.task.shell_command
        if command is None:
            return Outcome(ok=False, error=NO_COMMAND, reason="no_command", transient=False)
        cwd = run.workdir
        if not cwd.is_dir():
            return Outcome(
                ok=False,
                error=f"working directory {str(cwd)!r} does not exist or is not a directory",
                reason="no_workdir",
                transient=False,
            )
        marker = run.marker
        env = child_env(os.environ, marker, secrets=[cfg.token])

        with (
            OutputCapture(cfg.output_cap_bytes, run.log_path, cfg.task_log_max_bytes) as out,
            OutputCapture(_STDERR_KEEP, None) as err,
        ):
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            out.log_bytes(f"\n=== {stamp} run: /bin/sh -c {command!r} (cwd {cwd})\n".encode())

            async def on_stdout(block: str) -> None:
                out.write(block)
                await out.wait_room()
                await progress.emit("stdout", clip_progress(block))

            async def on_stderr(block: str) -> None:
                out.write(block, keep=False)
                err.write(block)
                await out.wait_room()
                await progress.emit("stderr", clip_progress(block))

            res: ChildResult | OSError
            # The log file is created while the child starts, not before it; where
            # the daemon can take it over, the task's end does not wait for it either.
            opener = out.start_open(self.ctx.off_loop)
            if opener is not None and self.ctx.handoff is not None and self.ctx.handoff(opener):
                opener = None

            async def run_it() -> ChildResult | OSError:
                try:
                    return await run_child(
                        ["/bin/sh", "-c", command],
                        cwd=cwd,
                        env=env,
                        marker=marker,
                        on_stdout=on_stdout,
                        on_stderr=on_stderr,
                        grace_s=cfg.kill_grace_s,
                        batch_lines=True,
                        sweep_marker=False,  # the task's end sweeps the marker (run_and_sweep)
                    )
                except OSError as exc:
                    return exc

            try:
                if opener is None:  # the daemon opens the log (the usual case): no nursery needed
                    res = await run_it()
                else:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(opener)
                        res = await run_it()
            except BaseException:
                out.log_bytes(b"=== cancelled: process group killed\n")
                raise
            if isinstance(res, OSError):
                out.log_bytes(f"=== could not start: {res}\n".encode())
                return Outcome(
                    ok=False,
                    error=f"could not start /bin/sh in {cwd}: {res}",
                    reason="spawn_failed",
                    transient=False,
                )
            ending = f"=== {describe_returncode(res.returncode)} after {res.duration_s:.3f} s\n"
            out.log_bytes(ending.encode())

            output = out.text()
            if res.returncode == 0:
                return Outcome(
                    ok=True,
                    output=output,
                    exit_code=0,
                    model_used="none",
                    output_truncated=out.truncated,
                )
            detail = err.tail_text(ERROR_TAIL_BYTES).strip() or out.tail_text(ERROR_TAIL_BYTES).strip()
            message = describe_returncode(res.returncode) + (f": {detail}" if detail else "")
            return Outcome(
                ok=False,
                output=output,
                error=message,
                reason="exit_code",
                transient=True,
                exit_code=res.returncode,
                output_truncated=out.truncated,
            )
