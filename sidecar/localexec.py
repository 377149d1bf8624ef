"""`sidecar exec`: run one task here, without a hub, through the real dispatcher.

The task goes through the same `Dispatcher` and executors as a hub task
(retries, pricing, process-group kill, output cap); only the hub is missing.
Progress is shown live (`view.LiveView`) or, with `--json`, printed as JSON
lines: `{"event": "progress", ...}` per event, then one `{"event": "result", ...}`.

Exit codes: 0 success, 1 failure, 124 time-out (as timeout(1)), 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import attrs
import trio

from . import procs
from .config import Config, config_from_mapping, load_config
from .cost import CostModel
from .dispatcher import Dispatcher, DispatchResult, target_of
from .executors import ExecContext, make_state_subdirs
from .executors.registry import REGISTRY, build_executors
from .messages import ProgressEvent, parse_task
from .progress import ProgressSender, open_progress
from .sharedhttp import SharedHTTP
from .taskrun import run_and_sweep
from .timelimits import time_limit_ms
from .view import LiveView

EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 124, 130
TICK_S = 0.1


@attrs.frozen
class ExecRequest:
    kind: str  # "shell" | "ollama" | "claude"
    command: str | None = None
    prompt: str = ""
    model: str | None = None
    ollama_url: str | None = None
    timeout_s: float | None = None
    config_path: str | None = None
    state_dir: str | None = None


def build_task_frame(req: ExecRequest, task_id: str, timeout_ms: int) -> dict[str, Any]:
    """The `task_assign` a hub would have sent for this request."""
    metadata: dict[str, Any] = {"timeout_ms": timeout_ms}
    if req.kind == "shell":
        metadata["shell_command"] = req.command
        decision: dict[str, Any] = {"target_type": "sidecar", "effective_tier": "trivial"}
    elif req.kind == "ollama":
        decision = {"target_type": "ollama", "selected_model": req.model, "selected_endpoint": req.ollama_url}
    else:
        decision = {"target_type": "claude", "selected_endpoint": "claude_api", "selected_model": req.model}
    return {
        "type": "task_assign",
        "task_id": task_id,
        "description": req.prompt,
        "metadata": metadata,
        "generation": 0,
        "routing_decision": decision,
    }


def exec_config(req: ExecRequest, scratch: Path) -> Config:
    """The config file's settings if given; the task runs in the current directory."""
    if req.config_path:
        cfg = load_config(req.config_path)
    else:
        cfg = config_from_mapping(
            {"agent_id": "local-exec", "token": "local-exec", "hub_url": "ws://127.0.0.1:9/ws"},
            base_dir=scratch,
        )
    changes: dict[str, Any] = {}
    if req.state_dir:
        changes["state_dir"] = str(Path(req.state_dir).resolve())
    elif not req.config_path:
        changes["state_dir"] = str(scratch / "state")
    if not cfg.repo_dir:
        changes["repo_dir"] = os.getcwd()
    if req.ollama_url:
        changes["ollama_url"] = req.ollama_url
    return attrs.evolve(cfg, **changes)


class _JsonOut:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, obj: dict[str, Any]) -> None:
        self.out.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self.out.flush()


def _summary(kind: str, res: DispatchResult | None, outcome: str, elapsed_s: float, timeout_s: float) -> str:
    if outcome == "timeout":
        return f"timed out after {timeout_s:g} s"
    if outcome == "interrupted":
        return f"interrupted after {elapsed_s:.1f} s"
    assert res is not None
    if not res.ok:
        return f"failed ({res.reason}) after {elapsed_s:.1f} s, {res.attempts} attempt(s): {res.error}"
    r = res.result or {}
    parts = [f"success in {elapsed_s:.1f} s"]
    if r.get("exit_code") is not None:
        parts.append(f"exit {r['exit_code']}")
    if r.get("attempts", 1) != 1:
        parts.append(f"{r['attempts']} attempts")
    model = r.get("model_used")
    if model and model != "none":
        parts.append(f"model {model}")
        parts.append(f"tokens {r.get('tokens_in', 0)} in / {r.get('tokens_out', 0)} out")
    cost = r.get("estimated_cost_usd")
    if isinstance(cost, (int, float)) and kind != "shell":
        text = f"cost ${cost:.4f}"
        eq = r.get("equivalent_claude_cost_usd")
        if isinstance(eq, (int, float)):
            text += f" (as Claude: ${eq:.4f})"
        parts.append(text)
    if r.get("output_truncated"):
        parts.append("output truncated")
    return " · ".join(parts)


async def run_exec(
    req: ExecRequest, out: TextIO, *, json_lines: bool = False, tty: bool | None = None
) -> int:
    """Run one task; returns the exit code."""
    procs.become_subreaper()  # the task's orphans stay below us (see proctree)
    with tempfile.TemporaryDirectory(prefix="sidecar-exec-") as tmp:
        config = exec_config(req, Path(tmp))
        state_dir = config.resolved_state_dir()
        make_state_subdirs(state_dir)
        task_id = f"exec-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        # Without --timeout, the daemon's default for this kind of task (timeout_ms 0: none given).
        unbounded = parse_task(build_task_frame(req, task_id, 0))
        default_ms = time_limit_ms(unbounded, target_of(unbounded), config)
        timeout_s = req.timeout_s if req.timeout_s is not None else default_ms / 1000
        task = parse_task(build_task_frame(req, task_id, max(1, round(timeout_s * 1000))))
        kind = target_of(task)
        marker = procs.task_marker(config.agent_id, task_id)
        jout = _JsonOut(out) if json_lines else None
        view = None if jout else LiveView(out, tty=tty)
        label = REGISTRY[kind].label.lower() + (f" {req.model}" if req.model else "")
        if view is not None:
            view.add(task_id, label)
        send, receive = open_progress()

        shown = trio.Event()

        async def show(receive: trio.MemoryReceiveChannel[ProgressEvent]) -> None:
            async with receive:
                async for ev in receive:
                    if jout is not None:
                        jout.write(
                            {
                                "event": "progress",
                                "task_id": ev.task_id,
                                "event_type": ev.event_type,
                                "text": ev.text,
                                "tokens_so_far": ev.tokens_so_far,
                                "model": ev.model,
                                "timestamp": ev.timestamp,
                            }
                        )
                    elif view is not None:
                        view.event(
                            task_id, ev.event_type, ev.text, tokens_so_far=ev.tokens_so_far, model=ev.model
                        )
            shown.set()

        async def ticker() -> None:
            while True:
                await trio.sleep(TICK_S)
                if view is not None:
                    view.tick()

        result: DispatchResult | None = None
        interrupted = False
        started = trio.current_time()
        async with SharedHTTP() as http:  # httpx only if the task is Ollama's
            ctx = ExecContext(config=config, http=http, state_dir=state_dir)
            dispatcher = Dispatcher(build_executors(ctx), CostModel(config))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(show, receive)
                if view is not None and view.tty:
                    nursery.start_soon(ticker)
                with trio.CancelScope(deadline=started + timeout_s) as scope:

                    async def on_sigint() -> None:
                        nonlocal interrupted
                        with trio.open_signal_receiver(signal.SIGINT) as signals:
                            async for _ in signals:
                                interrupted = True
                                scope.cancel()
                                return

                    nursery.start_soon(on_sigint)
                    async with send:
                        run = ctx.new_run(
                            task, ProgressSender(send, task_id), marker, deadline=scope.deadline
                        )
                        result = await run_and_sweep(dispatcher.run, run)
                # `show` drains what is left once `send` is closed; then stop the helpers.
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await shown.wait()
                nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - started
        if result is not None:
            outcome = "success" if result.ok else "failure"
            code = EXIT_OK if result.ok else EXIT_FAILED
        elif interrupted:
            outcome, code = "interrupted", EXIT_INTERRUPTED
        else:
            outcome, code = "timeout", EXIT_TIMEOUT
        summary = _summary(kind, result, outcome, elapsed, timeout_s)
        if jout is not None:
            jout.write(
                {
                    "event": "result",
                    "task_id": task_id,
                    "executor": kind,
                    "outcome": outcome,
                    "exit_code": code,
                    "ok": outcome == "success",
                    "result": None if result is None else result.result,
                    "error": None if result is None else result.error,
                    "reason": outcome if result is None else result.reason,
                    "attempts": None if result is None else result.attempts,
                    "elapsed_s": round(elapsed, 3),
                }
            )
        elif view is not None:
            view.finish(task_id, outcome == "success", summary)
            view.close()
        return code
