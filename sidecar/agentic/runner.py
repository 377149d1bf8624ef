"""One agentic task: its workspace, tool context and chat function, then the loop.

The working directory, the marker and the deadline are explicit parameters,
so that whoever owns the task's run (its worktree, its marker, its time
limit) hands them over; `scratch_workdir` is the fallback when a task has no
directory of its own: a fresh directory under the state dir, never the
sidecar's own working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import trio

from ..config import Config
from ..log import get_logger
from ..messages import Outcome, Task
from ..progress import ProgressSender
from ..prompt import build_prompt
from .chat import Reply, TokenCallback, chat_turn
from .loop import ERROR, conversation, max_iterations_for, run_loop
from .sandbox import Workspace, command_env, find_bwrap
from .tools import TOOL_SCHEMAS, ToolContext

log = get_logger(__name__)


def scratch_workdir(state_dir: Path, task_id: str) -> Path:
    """`<state_dir>/agentic/<task id>`, created: where a task without a directory works."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in task_id)[:150].lstrip(".") or "task"
    path = state_dir / "agentic" / safe
    path.mkdir(parents=True, exist_ok=True)
    return path


def tier_of(task: Task) -> str | None:
    rd = task.routing_decision
    if rd is not None and rd.effective_tier:
        return rd.effective_tier.strip().lower()
    if task.complexity is not None and task.complexity.effective_tier:
        return task.complexity.effective_tier.strip().lower()
    return None


class SandboxUnavailable(Exception):
    """The config asks for bwrap and the host has none."""


def bwrap_for(mode: str) -> str | None:
    """The bwrap binary to jail commands in, per `ollama.agentic_sandbox`."""
    if mode == "none":
        return None
    found = find_bwrap()
    if found is None and mode == "bwrap":
        raise SandboxUnavailable(
            "ollama.agentic_sandbox is 'bwrap' but no bwrap binary is on PATH (install bubblewrap, "
            "or set it to 'auto' or 'none')"
        )
    return found


async def run_agentic(
    config: Config,
    http: httpx.AsyncClient,
    task: Task,
    progress: ProgressSender,
    *,
    url: str,
    model: str,
    workdir: Path,
    marker: str,
    deadline: float,
    http_timeout: httpx.Timeout,
    stream: bool = True,
) -> Outcome:
    """Run the tool loop for `task` in `workdir` and shape its Outcome."""
    cfg = config.ollama
    try:
        bwrap = bwrap_for(cfg.agentic_sandbox)
    except SandboxUnavailable as exc:
        return Outcome(ok=False, error=str(exc), reason="agentic_sandbox_unavailable", model_used=model)
    if not await trio.to_thread.run_sync(workdir.is_dir):
        return Outcome(
            ok=False,
            error=f"working directory {str(workdir)!r} does not exist or is not a directory",
            reason="no_workdir",
            model_used=model,
        )
    env = command_env(
        os.environ, marker, passed=cfg.agentic_env_pass, added=cfg.agentic_env, secrets=[config.token]
    )
    tools = ToolContext(
        workspace=Workspace(workdir, reserved=(config.resolved_state_dir(),)),
        marker=marker,
        deadline=deadline,
        env=env,
        command_timeout_s=cfg.agentic_command_timeout_s,
        grace_s=config.kill_grace_s,
        bwrap=bwrap,
        hidden=(config.resolved_state_dir(),),
    )

    async def chat(messages: list[dict[str, Any]], on_token: TokenCallback) -> Reply:
        body = {"model": model, "messages": messages, "tools": TOOL_SCHEMAS, "stream": stream}
        return await chat_turn(
            http, url, body, http_timeout=http_timeout, idle_s=cfg.idle_timeout_s, on_token=on_token
        )

    limit = max_iterations_for(tier_of(task), task.metadata, cfg.agentic_max_iterations)
    log.info(
        "agentic_loop_started", task_id=task.task_id, model=model, max_iterations=limit, jailed=bool(bwrap)
    )
    messages = conversation(build_prompt(task).messages())
    res = await run_loop(chat, messages, tools, progress, max_iterations=limit, model=model)
    fields = {
        "termination_reason": res.reason,
        "iterations_used": res.iterations,
        "files_written": res.files_written,
    }
    if res.turns_cut:
        fields["turns_cut_at_length"] = res.turns_cut
    if res.ok:
        return Outcome(
            ok=True,
            output=res.output,
            model_used=model,
            tokens_in=res.tokens_in,
            tokens_out=res.tokens_out,
            fields=fields,
        )
    if res.reason == ERROR:
        error = f"agentic turn {res.iterations}: {res.error}"
        reason = res.error_reason or "ollama_error"
    else:
        error = f"agentic loop stopped without a final answer: {res.reason} after {res.iterations} turns"
        if res.files_written:
            error += f" (files written: {', '.join(res.files_written)})"
        reason = f"agentic_{res.reason}"
    return Outcome(
        ok=False,
        output=res.output,
        error=error,
        reason=reason,
        transient=res.transient,
        model_used=model,
        tokens_in=res.tokens_in,
        tokens_out=res.tokens_out,
        fields=fields,
    )
