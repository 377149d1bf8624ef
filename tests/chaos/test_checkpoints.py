"""Cancellation at every checkpoint, per executor, through the real supervisor path.

A Trio instrument counts the steps (each run between two schedule points) of
one task's own Trio task tree, from `task_assign` on: the supervisor's task
main, the dispatcher, the executor, its process helper and drain tasks. Run
N cancels the task's scope right after its N-th step, for N = 1, 2, … until a
run finishes before step N. After each run: the task's processes are all
gone (found by their marker), the outbox holds exactly one terminal result
for it (none when the hub itself cancelled it), no Trio task and no file
descriptor is left over.

The cancel reason alternates: `shutdown` (a `task_failed` must be stored) and
`hub_cancel` (nothing may be stored).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from sidecar.app import Sidecar
from sidecar.config import config_from_mapping
from sidecar.decisions import HUB_CANCEL, SHUTDOWN
from sidecar.store import Store
from sidecar.supervisor import Held
from tests.fakes.ollama_server import OllamaServer, open_ollama_server
from tests.harness import feed

from .procscan import marked_processes

HERE = Path(__file__).resolve().parent
WAKE_AGENT = HERE.parent / "fakes" / "proc_wake_agent.py"
COVERED: dict[str, int] = {}


class StepCanceller(trio.abc.Instrument):
    """Counts steps of tasks under `root`; cancels `held` after step `cancel_at`."""

    def __init__(self, cancel_at: int | None) -> None:
        self.cancel_at = cancel_at
        self.steps = 0
        self.root: trio.lowlevel.Task | None = None
        self.held: Held | None = None
        self.reason = SHUTDOWN
        self.cancel_fn: Any = None
        self.fired = False

    def _under_root(self, task: trio.lowlevel.Task) -> bool:
        t: trio.lowlevel.Task | None = task
        while t is not None:
            if t is self.root or "_task_main" in t.name:
                return True
            nursery = t.parent_nursery
            t = nursery.parent_task if nursery is not None else None
        return False

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.root is None or not self._under_root(task):
            return
        self.steps += 1
        if self.cancel_at is not None and self.steps == self.cancel_at and not self.fired:
            self.fired = True
            self.cancel_fn()


def _fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def _all_tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        if task.name.startswith("tests.fakes"):
            return 0  # the fake Ollama server's connection tasks are not the sidecar's
        return 1 + sum(count(c) for n in task.child_nurseries for c in n.child_tasks)

    return count(trio.lowlevel.current_root_task())  # type: ignore[arg-type]


def _frame(kind: str, tid: str, ollama: OllamaServer) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "task_assign", "task_id": tid, "generation": 1, "metadata": {}}
    if kind == "shell":
        frame["routing_decision"] = {"target_type": "sidecar"}
        frame["metadata"] = {"shell_command": "echo one; sleep 0.01; echo two >&2"}
    elif kind == "ollama":
        frame["description"] = "say hi"
        frame["routing_decision"] = {
            "target_type": "ollama",
            "selected_endpoint": f"127.0.0.1:{ollama.port}",
            "selected_model": "qwen3:8b",
        }
    elif kind == "claude":
        frame["description"] = "do it chaos-claude=ok"
        frame["routing_decision"] = {"target_type": "claude", "selected_endpoint": "claude_api"}
    else:
        frame["description"] = "success"
        frame["routing_decision"] = None
    return frame


@asynccontextmanager
async def _sidecar(tmp: Path, n: int, ollama: OllamaServer) -> AsyncIterator[Sidecar]:
    claude = tmp / "claude"
    if not claude.exists():
        claude.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "claude_chaos.py"} "$@"\n')
        claude.chmod(0o755)
    results = tmp / "results"
    results.mkdir(exist_ok=True)
    (tmp / "repo").mkdir(exist_ok=True)
    config = config_from_mapping(
        {
            "agent_id": f"cp{os.getpid()}",
            "token": "cp-token",
            "hub_url": "ws://127.0.0.1:9/ws",
            "state_dir": str(tmp / "state"),
            "backoff_initial_s": 60.0,
            "kill_grace_s": 0.3,
            "repo_dir": str(tmp / "repo"),
            "results_dir": str(results),
            "wake_command": f'{sys.executable} {WAKE_AGENT} {results} "${{TASK_DESCRIPTION}}" "${{TASK_ID}}"',
            "ollama_url": ollama.url,
            "claude": {"binary": str(claude)},
        },
        base_dir=tmp,
    )
    store = await Store.open(tmp / "state" / f"cp{n}.db", durable=False)
    try:
        async with httpx.AsyncClient() as http:
            sc = Sidecar(config, store, http)
            async with trio.open_nursery() as nursery:
                await nursery.start(sc.run)
                yield sc
                sc.stopped.set()
    finally:
        await store.close()


async def _run_once(tmp: Path, kind: str, n: int, cancel_at: int | None, ollama: OllamaServer) -> int:
    """One lifecycle, cancelled after step `cancel_at`; returns the steps counted."""
    inst = StepCanceller(cancel_at)
    inst.reason = SHUTDOWN if n % 2 == 0 else HUB_CANCEL
    tid = f"{kind}-{n}"
    async with _sidecar(tmp, n, ollama) as sc:
        await trio.sleep(0.01)
        tasks_before = _all_tasks()
        fds_before = _fds()
        trio.lowlevel.add_instrument(inst)
        try:
            inst.root = trio.lowlevel.current_task()
            sup = sc.supervisor

            def cancel() -> None:
                held = sup.held.get(tid)
                if held is not None:
                    sup._cancel(held, inst.reason)

            inst.cancel_fn = cancel
            # Count from the assign: the frame handler runs in this task.
            await feed(sc, _frame(kind, tid, ollama))
            held = sup.held.get(tid)
            if held is not None:
                with trio.fail_after(30):
                    await held.done.wait()
        finally:
            trio.lowlevel.remove_instrument(inst)
        # Invariants after the task ended.
        assert tid not in sup.held, "task still held after done"
        from sidecar.procs import task_marker

        left = marked_processes(task_marker(sc.config.agent_id, tid))
        assert not left, f"{kind} step {cancel_at}: processes alive {left}"
        results = [i for i in await sc.store.outbox() if i.task_id == tid]
        terminal = [i for i in results if i.frame["type"] in ("task_complete", "task_failed")]
        if inst.fired and inst.reason == HUB_CANCEL:
            assert len(terminal) <= 1, f"{kind} step {cancel_at}: {len(terminal)} results"
            # Only a run that ended before the cancel landed may have a result.
            if terminal:
                assert terminal[0].frame["type"] == "task_complete"
        else:
            assert len(terminal) == 1, f"{kind} step {cancel_at}: {len(terminal)} results"
        await trio.sleep(0.05)  # let the batcher retire the task
        assert _all_tasks() <= tasks_before, f"{kind} step {cancel_at}: trio tasks leaked"
        # No gc.collect() here: every fd must be closed explicitly, not by the
        # garbage collector breaking a cycle (it was, for the pipes, before 'procs: own pipes').
        leaked = _fds() - fds_before
        if kind == "ollama":
            # httpx keeps one keep-alive connection to the (in-process) server: the
            # pool's, reused by the next task, not the task's.
            leaked = {fd for fd in leaked if not fd.startswith("socket:")}
        assert not leaked, f"{kind} step {cancel_at}: fds leaked {leaked}"
    return inst.steps


@pytest.mark.parametrize("kind", ["shell", "ollama", "claude", "wake"])
async def test_cancel_at_every_checkpoint(kind: str, tmp_path: Path) -> None:
    async with open_ollama_server() as ollama:
        total = await _run_once(tmp_path, kind, 0, None, ollama)
        assert total > 3
        n = 1
        while n <= total:
            await _run_once(tmp_path, kind, n, n, ollama)
            n += 1
        COVERED[kind] = total
        print(f"checkpoint sweep {kind}: {total} cancellation points")


class _HandlerCanceller(trio.abc.Instrument):
    """Cancels `scope` after the `cancel_at`-th step of one task (the frame handler's)."""

    def __init__(self, task: trio.lowlevel.Task, scope: trio.CancelScope, cancel_at: int) -> None:
        self.task, self.scope, self.cancel_at, self.steps = task, scope, cancel_at, 0

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1
            if self.steps == self.cancel_at:
                self.scope.cancel()


async def test_assign_handler_cancelled_at_every_checkpoint_never_strands_a_task(tmp_path: Path) -> None:
    """The frame handler runs inside the link's session scope, which a dropped
    socket cancels. Found by the chaos soak: a checkpoint between storing a task
    and holding it left the task in the store, never run and never finished.
    Cancelled after each of its steps in turn, the handler must leave the task
    either held (it will run and end) or not stored at all."""
    async with open_ollama_server() as ollama:
        n, completed = 0, False
        while not completed:
            n += 1
            tid = f"h-{n}"
            async with _sidecar(tmp_path, 1000 + n, ollama) as sc:
                frame = _frame("shell", tid, ollama)
                with trio.CancelScope() as scope:
                    inst = _HandlerCanceller(trio.lowlevel.current_task(), scope, n)
                    trio.lowlevel.add_instrument(inst)
                    try:
                        await feed(sc, frame)
                    finally:
                        trio.lowlevel.remove_instrument(inst)
                completed = not scope.cancelled_caught
                stored = await sc.store.get_task(tid)
                held = sc.supervisor.held.get(tid)
                assert (stored is not None) == (held is not None), f"step {n}: stored {stored}, held {held}"
                if held is not None:
                    with trio.fail_after(30):
                        await held.done.wait()
            assert n < 200
        print(f"assign handler: {n} cancellation points")
