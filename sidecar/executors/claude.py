"""Claude Code executor: runs `claude -p` with stream-json output and relays it.

The prompt goes in on stdin, written and closed at once (a pipe left open makes
the CLI wait ~3 s). stdout is one JSON object per line: text deltas
(`stream_event` / `content_block_delta` / `text_delta`) become `token` events,
tool calls become `status` events, and the last line, `type: result`, is the
truth: output, `is_error`, tokens and cost. Judge by `is_error`, never by
`subtype` (an API failure says `"subtype": "success"`), and take the output from
`result`, never from the deltas (after a broken stream the CLI retries without
streaming, so deltas can repeat).

Cancellation sends SIGINT first: the CLI then stops, kills its tools and still
prints a final result; SIGKILL follows `kill_grace_s` later. The CLI's Bash
tool starts its commands in a session of their own, out of reach of a group
kill; `run_child` sweeps them by the task's environment marker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs

from .. import procs
from ..log import get_logger
from ..messages import Outcome, Task
from ..progress import ProgressSender
from ..prompt import build_prompt
from ..taskrun import TaskRun
from . import ExecContext

log = get_logger(__name__)

BASE_ARGS = ("-p", "--output-format", "stream-json", "--verbose", "--include-partial-messages")
INSTALL_HINT = (
    "install it with `npm install -g @anthropic-ai/claude-code`, "
    "or set `claude.binary` in the sidecar config to the path of the `claude` executable"
)
# Names the hub uses for "Claude, whichever model": never passed to --model.
_DEFAULT_MODEL_NAMES = frozenset({"", "claude", "default", "claude_api"})
# API statuses worth another attempt: timeouts, conflicts, rate limits, overload, 5xx.
_TRANSIENT_STATUS = frozenset({408, 409, 429})
_TAIL_LINES = 40
_SHOWN_CHARS = 300


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def cli_model(selected_model: str | None) -> str | None:
    """The `--model` value for the hub's `selected_model`, or None for the CLI default."""
    if selected_model is None or selected_model.strip().lower() in _DEFAULT_MODEL_NAMES:
        return None
    return selected_model.strip()


def resolve_binary(binary: str, path: str | None) -> str | None:
    """The executable to run, or None when it is missing or not executable."""
    if os.sep in binary:
        return binary if os.path.isfile(binary) and os.access(binary, os.X_OK) else None
    return shutil.which(binary, path=path)


def cost_of(result: Mapping[str, Any]) -> float | None:
    """`total_cost_usd` of a `result` line, None unless it is a number."""
    cost = result.get("total_cost_usd")
    return float(cost) if isinstance(cost, (int, float)) and not isinstance(cost, bool) else None


def usage_tokens(result: Mapping[str, Any]) -> tuple[int, int]:
    """(tokens_in, tokens_out) of a `result` line.

    tokens_in counts every prompt token the API processed: plain input plus
    cache writes plus cache reads (`input_tokens` alone excludes cached parts,
    which for Claude Code is most of the prompt). `usage` is summed over
    retries. After SIGINT the CLI reports zeros in `usage` but the real counts
    in `modelUsage` (camelCase, per model), so that is the fallback.
    """
    usage = result.get("usage")
    if isinstance(usage, Mapping):
        tin = (
            _int(usage.get("input_tokens"))
            + _int(usage.get("cache_creation_input_tokens"))
            + _int(usage.get("cache_read_input_tokens"))
        )
        tout = _int(usage.get("output_tokens"))
        if tin or tout:
            return tin, tout
    tin = tout = 0
    per_model = result.get("modelUsage")
    if isinstance(per_model, Mapping):
        for entry in per_model.values():
            if isinstance(entry, Mapping):
                tin += (
                    _int(entry.get("inputTokens"))
                    + _int(entry.get("cacheCreationInputTokens"))
                    + _int(entry.get("cacheReadInputTokens"))
                )
                tout += _int(entry.get("outputTokens"))
    return tin, tout


def _main_model(result: Mapping[str, Any]) -> str | None:
    """The model that wrote most output, per the result's `modelUsage`."""
    per_model = result.get("modelUsage")
    if not isinstance(per_model, Mapping):
        return None
    best: tuple[int, str] | None = None
    for name, entry in per_model.items():
        if isinstance(name, str) and name and isinstance(entry, Mapping):
            out = _int(entry.get("outputTokens"))
            if best is None or out > best[0]:
                best = (out, name)
    return best[1] if best else None


def _cap(text: str, cap_bytes: int) -> tuple[str, bool]:
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= cap_bytes:
        return text, False
    return data[:cap_bytes].decode("utf-8", "ignore"), True


def _short(text: str, limit: int = _SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@attrs.define
class _Run:
    """What one CLI run printed, gathered line by line."""

    model: str | None = None
    result: dict[str, Any] | None = None
    started: bool = False  # saw any JSON line: the CLI got past argument parsing
    token_count: int = 0
    partial_in_message: bool = False  # text deltas seen since the last `assistant` line
    assistant_text: list[str] = attrs.field(factory=list)
    stderr_tail: deque[str] = attrs.field(factory=lambda: deque(maxlen=_TAIL_LINES))
    junk_lines: int = 0


class ClaudeExecutor:
    """Runs Claude tasks through the Claude Code CLI.

    `env` adds variables to the child's environment on top of the sidecar's
    own (secrets removed), e.g. `ANTHROPIC_BASE_URL` in tests.
    """

    def __init__(self, ctx: ExecContext, *, env: Mapping[str, str] | None = None) -> None:
        self._ctx = ctx
        self._extra_env = {**ctx.config.claude.env, **(env or {})}

    def argv(self, binary: str, task: Task) -> list[str]:
        rd = task.routing_decision
        model = cli_model(rd.selected_model if rd else None)
        cfg = self._ctx.config.claude
        return [binary, *BASE_ARGS, *(["--model", model] if model else []), *cfg.extra_args]

    def child_environment(self, marker: str) -> dict[str, str]:
        base = {**os.environ, **self._extra_env}
        return procs.child_env(base, marker, secrets=[self._ctx.config.token])

    async def __call__(self, run: TaskRun) -> Outcome:
        cfg = self._ctx.config
        task, progress, marker, workdir = run.task, run.progress, run.marker, run.workdir
        tlog = log.bind(task_id=task.task_id)
        env = self.child_environment(marker)
        binary = resolve_binary(cfg.claude.binary, env.get("PATH"))
        if binary is None:
            tlog.warning("claude_not_installed", binary=cfg.claude.binary)
            return Outcome(
                ok=False,
                error=f"Claude Code CLI not found ({cfg.claude.binary!r}): {INSTALL_HINT}",
                reason="claude_not_installed",
                transient=False,
                model_used="claude",
            )
        prompt = build_prompt(task).combined()
        if not prompt.strip():
            return Outcome(
                ok=False,
                error="the task has no description: nothing to send to Claude Code",
                reason="claude_empty_prompt",
                transient=False,
                model_used="claude",
            )
        argv = self.argv(binary, task)
        state = _Run()

        async def on_stdout(line: str) -> None:
            await self._on_line(line, state, progress, tlog)

        async def on_stderr(line: str) -> None:
            if line.strip():
                state.stderr_tail.append(line)
                await progress.emit("stderr", line)

        tlog.info("claude_start", argv=argv[1:], cwd=str(workdir), prompt_chars=len(prompt))
        try:
            child = await procs.run_child(
                argv,
                cwd=workdir,
                env=env,
                marker=marker,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                stdin=prompt.encode("utf-8", "surrogatepass"),
                grace_s=cfg.kill_grace_s,
                first_signal=signal.SIGINT,
                sweep_marker=False,  # the task's end sweeps the marker (run_and_sweep)
            )
        except OSError as exc:
            tlog.warning("claude_spawn_failed", error=str(exc))
            return Outcome(
                ok=False,
                error=f"cannot start Claude Code CLI {binary!r} in {workdir}: {exc}",
                reason="claude_spawn_failed",
                transient=False,
                model_used="claude",
            )
        except BaseException:
            # Cancelled (deadline, hub cancel, shutdown): the CLI got SIGINT and
            # usually printed a final result with the cost so far; log it, then
            # let the cancellation go on.
            res = state.result or {}
            cost = cost_of(res)
            if state.result is not None:
                tokens_in, tokens_out = usage_tokens(res)
                run.spent.model = state.model or "claude"
                run.spent.tokens_in += tokens_in
                run.spent.tokens_out += tokens_out
                run.spent.cost_usd += cost or 0.0
            tlog.info("claude_cancelled", cost_usd=cost, result_seen=state.result is not None)
            raise
        return self._outcome(state, child.returncode, tlog)

    async def _on_line(self, line: str, run: _Run, progress: ProgressSender, tlog: Any) -> None:
        text = line.strip()
        if not text:
            return
        try:
            obj = json.loads(text)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            # Not ours to judge: keep it as stderr-ish noise, never crash.
            run.junk_lines += 1
            run.stderr_tail.append(text)
            tlog.debug("claude_junk_line", line=_short(text))
            await progress.emit("stderr", _short(text, 2000))
            return
        run.started = True
        match obj:
            case {
                "type": "stream_event",
                "event": {"type": "content_block_delta", "delta": {"type": "text_delta", "text": str(piece)}},
            } if piece:
                run.partial_in_message = True
                run.token_count += 1
                await progress.emit("token", piece, tokens_so_far=run.token_count, model=run.model)
            case {"type": "assistant", "message": dict(message)}:
                await self._on_assistant(message, run, progress)
            case {"type": "result"}:
                run.result = obj
                if run.model is None:
                    run.model = _main_model(obj)
            case {"type": "system", "subtype": "init"}:
                match obj.get("model"):
                    case str(model) if model:
                        run.model = model
                await progress.emit(
                    "status", f"Claude Code started (model {run.model or 'default'})", model=run.model
                )

    async def _on_assistant(self, message: dict[str, Any], run: _Run, progress: ProgressSender) -> None:
        match message.get("model"):
            case str(model) if run.model is None and model and not model.startswith("<"):
                run.model = model
        had_partial, run.partial_in_message = run.partial_in_message, False
        match message.get("content"):
            case list(content):
                pass
            case _:
                return
        for block in content:
            match block:
                case {"type": "text", "text": str(text)}:
                    run.assistant_text.append(text)
                    if not had_partial and text:
                        # No partial deltas (an older CLI, or extra_args without
                        # --include-partial-messages): relay the whole text.
                        run.token_count += 1
                        await progress.emit("token", text, tokens_so_far=run.token_count, model=run.model)
                case {"type": "tool_use"}:
                    name = block.get("name") if isinstance(block.get("name"), str) else "tool"
                    args = block.get("input")
                    shown = json.dumps(args, ensure_ascii=False) if args is not None else ""
                    await progress.emit("status", _short(f"tool {name}: {shown}"), model=run.model)

    def _outcome(self, run: _Run, returncode: int, tlog: Any) -> Outcome:
        cfg = self._ctx.config
        res = run.result
        model = run.model or "claude"
        stderr = "\n".join(run.stderr_tail).strip()
        if res is None:
            error = f"Claude Code CLI ended ({procs.describe_returncode(returncode)}) without a result line"
            if stderr:
                error += f": {stderr[-1500:]}"
            # A CLI that printed nothing JSON refused its arguments or setup
            # (unknown option, missing --verbose, no input), and one that exited 0
            # without the line does not speak stream-json as we expect: retrying
            # cannot help. One that died mid-run (signal, crash) may do better next
            # time (the dispatcher allows it one more run).
            transient = returncode < 0 or (run.started and returncode != 0)
            tlog.warning("claude_no_result", returncode=returncode, transient=transient)
            return Outcome(
                ok=False,
                error=error,
                reason="claude_no_result",
                transient=transient,
                model_used=model,
                exit_code=returncode,
            )
        tokens_in, tokens_out = usage_tokens(res)
        cost_usd = cost_of(res)
        text = res.get("result")
        output = text if isinstance(text, str) else "".join(run.assistant_text)
        common: dict[str, Any] = {
            "model_used": model,
            "tokens_in": tokens_in,
            "tokens_out": tokens_out,
            "cost_usd": cost_usd,
            "exit_code": returncode,
        }
        if res.get("is_error") is True or returncode != 0:
            error, reason, transient = self._failure(res, output, returncode, stderr)
            tlog.warning("claude_failed", reason=reason, returncode=returncode, transient=transient)
            capped, _ = _cap(output, cfg.output_cap_bytes)
            return Outcome(ok=False, output=capped, error=error, reason=reason, transient=transient, **common)
        capped, truncated = _cap(output, cfg.output_cap_bytes)
        tlog.info("claude_done", tokens_in=tokens_in, tokens_out=tokens_out, cost_usd=cost_usd, model=model)
        return Outcome(ok=True, output=capped, output_truncated=truncated, **common)

    @staticmethod
    def _failure(res: dict[str, Any], output: str, returncode: int, stderr: str) -> tuple[str, str, bool]:
        """(error, reason, transient) for a result line that says the run failed."""
        subtype = res.get("subtype") if isinstance(res.get("subtype"), str) else "unknown"
        status = res.get("api_error_status")
        errors = res.get("errors")
        detail = output.strip()
        if not detail and isinstance(errors, list):
            detail = "; ".join(str(e) for e in errors if e)
        if not detail:
            detail = stderr[-1500:] or f"subtype {subtype}"
        if res.get("is_error") is not True:
            # A result that claims success from a CLI that then failed.
            return f"Claude Code CLI exited with code {returncode}: {detail}", "claude_exit_code", True
        if isinstance(status, int) and not isinstance(status, bool):
            transient = status >= 500 or status in _TRANSIENT_STATUS
            return f"Claude Code: {detail}", f"claude_api_{status}", transient
        if detail.startswith("API Error"):
            # No HTTP status: the request never got an answer (connection
            # refused, reset, timed out). The network may recover.
            return f"Claude Code: {detail}", "claude_api_unreachable", True
        if subtype == "error_max_turns":
            return f"Claude Code stopped at its turn limit: {detail}", "claude_max_turns", False
        # error_during_execution and the like: interrupted or crashed mid-run.
        return f"Claude Code failed ({subtype}): {detail}", f"claude_{subtype}", True
