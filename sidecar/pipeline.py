"""One task from start to result: prepare → execute → verify → correct → deliver.

1. **Where it works**: a `repo` URL gets its workspace (`workspace.py`); with
   `capacity` > 1 a direct-execution task gets its own worktree; else it works
   in `repo_dir` (the wake path always keeps `repo_dir`, where the woken agent
   works).
2. **Branch** (`git_workflow`, a git checkout): `<agent>/<slug>` fresh from
   `origin/main` before the task runs; problems become `git_warning`.
3. **Execute** through the dispatcher (its retries included).
4. **Verify** the task's `verification_steps` (`verify.py`).
5. **Corrective retries** for LLM targets: up to `max_verification_retries`
   re-runs with a prompt naming what failed, each verified again; tokens and
   cost are summed over the attempts.
6. **Deliver**: after a success whose verification passed (or was skipped or
   had nothing to check), push and open the pull request (`gitflow.py`).

All of it runs inside the caller's cancel scope, so the task's one time limit
bounds every step; the worktree is removed however the task ends.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from . import gitflow, procs, verify, workspace
from .config import Config
from .dispatcher import DispatchResult, UnknownTargetError, _failure, target_of
from .log import get_logger
from .messages import Task, truncate
from .progress import ProgressSender
from .taskrun import TaskRun

log = get_logger(__name__)

Execute = Callable[[TaskRun], Awaitable[DispatchResult]]

LLM_KINDS = frozenset({"ollama", "claude"})
DIRECT_KINDS = frozenset({"shell", "ollama", "claude"})
# Verification outcomes after which the work is delivered (a PR opened).
DELIVERABLE = frozenset({verify.PASS, verify.AUTO_PASS, verify.SKIP})
# Outcomes a corrective retry may fix.
CORRECTABLE = frozenset({verify.FAIL, verify.ERROR})
FAILED_OUTPUT_CHARS = 500
PREVIOUS_OUTPUT_CHARS = 1000
# Kept free before the task's deadline when verification is bounded by it.
DEADLINE_RESERVE_S = 1.0
_SUMMED = ("tokens_in", "tokens_out", "estimated_cost_usd", "execution_ms", "attempts")


def corrective_prompt(task: Task, report: dict[str, Any], previous_output: str) -> str:
    """The prompt of a corrective retry: what failed (with output), what passed, the task, the last answer."""
    failed = [c for c in report["checks"] if c["status"] != verify.PASS]
    passed = [c for c in report["checks"] if c["status"] == verify.PASS]

    def name(check: dict[str, Any]) -> str:
        target = f" {check['target']}" if check.get("target") else ""
        desc = f" ({check['description']})" if check.get("description") else ""
        return f"[{check['type']}]{target}{desc}"

    lines = [
        f"Your previous attempt at this task did not pass verification ({report['status']}).",
        "",
        "Failed checks:",
    ]
    for check in failed:
        lines.append(f"- {name(check)}: {check['status']}")
        output = truncate(str(check.get("output") or "").strip(), FAILED_OUTPUT_CHARS)
        if output:
            lines += ["  Output:", *("    " + line for line in output.splitlines())]
    if passed:
        lines += ["", "Passing checks (keep them passing):", *(f"- {name(c)}" for c in passed)]
    lines += [
        "",
        "The original task:",
        task.description,
        "",
        "Your previous output:",
        truncate(previous_output, PREVIOUS_OUTPUT_CHARS),
        "",
        "Fix the problems above so that every check passes, and answer as for the original task.",
    ]
    return "\n".join(lines)


def verification_bounds(requested_ms: int, left_s: float | None, grace_s: float) -> tuple[int, float]:
    """The checks' bound (ms) and the kill grace of a check it cuts short, for a task
    with `left_s` seconds to its own limit (None: no limit).

    The bound is `verification_timeout_ms`, shortened so that the checks end before
    the task's limit: a verification cut short by its own bound still completes the
    task (status `timeout`, the work's result kept); one cut by the task's limit
    would fail it. The reserve (`grace_s` + 1 s) leaves time to kill the running
    check and store the result. With less than twice the reserve left (a limit of
    a few seconds), the checks get half of what is left and the reserve the other
    half, its grace shortened in proportion: a whole reserve would leave the checks
    nothing (found from outside: a 5 s task's report had `timeout_ms` 1, so no
    command check could ever pass).
    """
    if left_s is None:
        return requested_ms, grace_s
    left_s = max(0.0, left_s)
    reserve_s = grace_s + DEADLINE_RESERVE_S
    if left_s >= 2 * reserve_s:
        return min(requested_ms, int((left_s - reserve_s) * 1000)), grace_s
    return max(1, min(requested_ms, int(left_s / 2 * 1000))), grace_s * left_s / 2 / reserve_s


def _inside_git_tree(path: Path) -> bool:
    """Whether `path` or a parent holds `.git` (blocking: run it in a thread)."""
    for where in (path, *path.parents):
        if (where / ".git").exists():
            return True
    return False


@attrs.define
class _Place:
    """Where one task works, and what the branch workflow made of it."""

    cwd: Path
    git_repo: Path | None = None  # the checkout the branch lives in, when the workflow is on
    branch: str | None = None
    tree: workspace.Worktree | None = None
    warnings: list[str] = attrs.field(factory=list)


class Pipeline:
    """Runs a task through every step; `run` has the dispatcher's signature."""

    def __init__(self, config: Config, execute: Execute, state_dir: Path | None = None) -> None:
        self.config = config
        self.execute = execute
        self.state_dir = state_dir if state_dir is not None else config.resolved_state_dir()
        self.locks = workspace.RepoLocks()
        self._not_git_logged: set[str] = set()
        # The sidecar's own files, never a task's work (they may lie inside repo_dir).
        files = (config.log_file, config.results_dir, config.config_file)
        own = [self.state_dir, *(Path(p) for p in files if p)]
        self.own_paths: tuple[Path, ...] = tuple(own)

    async def sweep_leftovers(self) -> None:
        """At start-up: remove the worktrees a killed sidecar left (no task runs yet)."""
        root = self.state_dir / "worktrees"
        if not await trio.Path(root).is_dir():
            return
        tools = self._tools(procs.agent_marker_prefix(self.config.agent_id) + "sweep")
        with trio.move_on_after(workspace.CLEANUP_TIMEOUT_S):
            for path in await trio.Path(root).iterdir():
                await workspace.remove_tree(Path(path))
                log.info("stale_worktree_removed", path=str(path))
            repos = [Path(self.config.repo_dir)] if self.config.repo_dir else []
            ws_root = trio.Path(self.state_dir / "workspaces")
            if await ws_root.is_dir():
                repos += [Path(p) for p in await ws_root.iterdir()]
            for repo in repos:
                if await trio.Path(repo / ".git").exists():
                    await tools.git(repo, "worktree", "prune")

    def _tools(self, marker: str) -> gitflow.Tools:
        env = procs.child_env(os.environ, marker, secrets=[self.config.token])
        return gitflow.Tools(env, marker, grace_s=self.config.kill_grace_s)

    async def run(self, run: TaskRun) -> DispatchResult:
        task, progress = run.task, run.progress
        try:
            kind = target_of(task)
        except UnknownTargetError:
            return await self.execute(run)  # fails at once, with the dispatcher's message
        tools = self._tools(run.marker)
        place: _Place | None = None
        tidied = False
        try:
            try:
                place = await self._place(task, kind, tools, progress, run.workdir)
            except workspace.WorkspaceError as exc:
                where = task.repo or self.config.repo_dir
                log.warning("workspace_setup_failed", task_id=task.task_id, repo=where, problem=str(exc))
                return _failure(
                    f"Workspace setup failed for {where}: {exc}", "workspace_setup_failed", executor=kind
                )
            done = await self._work(run.with_workdir(place.cwd), kind, place, tools)
            note = await self._tidy(task, place, tools)
            tidied = True
            if note is not None and done.ok and done.result is not None:
                warning = "; ".join(w for w in (done.result.get("git_warning"), note) if w)
                done = attrs.evolve(done, result={**done.result, "git_warning": truncate(warning, 2000)})
            return done
        finally:
            if place is not None and place.tree is not None:
                await workspace.remove_worktree(tools, place.tree, self.locks)
            elif place is not None and not tidied:
                # The task ended otherwise (a failure raised, a cancel, a time-out).
                with trio.CancelScope(shield=True), trio.move_on_after(workspace.CLEANUP_TIMEOUT_S):
                    await self._tidy(task, place, tools)

    async def _tidy(self, task: Task, place: _Place, tools: gitflow.Tools) -> str | None:
        """A task that worked on its branch in the checkout itself (not in a worktree)
        leaves it clean for the next one: what it left uncommitted is stashed."""
        if place.tree is not None or place.branch is None or place.git_repo is None:
            return None
        async with self.locks.hold(place.git_repo):
            return await gitflow.stash_leftovers(
                tools, place.git_repo, task.task_id, place.branch, self.own_paths
            )

    async def _place(
        self, task: Task, kind: str, tools: gitflow.Tools, progress: ProgressSender, base: Path
    ) -> _Place:
        """Where the task works (`base`: `repo_dir` or the state dir), and its branch."""
        cfg = self.config
        warnings: list[str] = []
        has_repo_dir = cfg.repo_dir is not None
        if task.repo and workspace.is_repo_url(task.repo):
            await progress.emit("status", f"preparing the workspace for {task.repo}…")
            ws = await workspace.ensure_workspace(tools, self.state_dir / "workspaces", task.repo, self.locks)
            base, has_repo_dir = ws.path, True
            if ws.warning:
                warnings.append(ws.warning)
        # Two direct tasks at once never share a tree: each gets a worktree.
        isolate = cfg.capacity > 1 and kind in DIRECT_KINDS
        if not has_repo_dir or not (cfg.git_workflow or isolate):
            return _Place(base, warnings=warnings)
        # A plain directory costs no git call (one thread hop to look for `.git`).
        if not await trio.to_thread.run_sync(_inside_git_tree, base):
            if str(base) not in self._not_git_logged:
                self._not_git_logged.add(str(base))
                log.warning("repo_dir_not_a_git_checkout", path=str(base), action="branch workflow skipped")
            return _Place(base, warnings=warnings)
        problem = await gitflow.checkout_problem(tools, base)
        if problem is not None:
            # A checkout git cannot use (git missing, a broken repository): say so.
            warnings.append(f"{problem}: branch workflow skipped")
            return _Place(base, warnings=warnings)
        branch = None
        if cfg.git_workflow:
            branch = gitflow.branch_name(cfg.agent_id, task.description, task.task_id)
        if isolate:
            path = self.state_dir / "worktrees" / workspace.task_dir_name(task.task_id)
            tree = await workspace.add_worktree(tools, base, path, branch, self.locks)
            if tree.warning:
                warnings.append(tree.warning)
            if tree.branch:
                await progress.emit("status", f"working on branch {tree.branch} in a worktree of its own")
            return _Place(path, path if tree.branch else None, tree.branch, tree, warnings)
        assert branch is not None
        async with self.locks.hold(base):
            prepared = await gitflow.prepare_branch(tools, base, branch, self.own_paths)
        if prepared.warning:
            warnings.append(prepared.warning)
        if prepared.branch:
            await progress.emit("status", f"working on branch {prepared.branch}")
        return _Place(base, base if prepared.branch else None, prepared.branch, None, warnings)

    async def _work(self, run: TaskRun, kind: str, place: _Place, tools: gitflow.Tools) -> DispatchResult:
        task, progress = run.task, run.progress
        first = await self.execute(run)
        if not first.ok or first.result is None:
            return first
        results = [first]
        history = [await self._verify(run, place, tools, 1)]
        retries = task.max_verification_retries if kind in LLM_KINDS else 0
        while history[-1]["status"] in CORRECTABLE and len(history) <= retries:
            n = len(history)
            report = history[-1]
            await progress.emit(
                "status",
                f"verification {report['status']} ({report['summary']['passed']}/{report['summary']['total']}"
                f" passed): corrective retry {n}/{retries}…",
            )
            previous = str((results[-1].result or {}).get("output") or "")
            corrective = attrs.evolve(task, description=corrective_prompt(task, report, previous))
            again = await self.execute(attrs.evolve(run, task=corrective))
            if not again.ok or again.result is None:
                # The earlier answer stands, verified as it was; the spend still counts.
                await progress.emit("status", f"corrective retry {n} failed: {again.error}")
                results.append(again)
                break
            results.append(again)
            history.append(await self._verify(run, place, tools, n + 1))
        return await self._finish(task, place, tools, progress, results, history)

    async def _verify(
        self, run: TaskRun, place: _Place, tools: gitflow.Tools, run_number: int
    ) -> dict[str, Any]:
        task = run.task
        left_s = None if math.isinf(run.deadline) else run.deadline - trio.current_time()
        bound_ms, grace_s = verification_bounds(
            task.verification_timeout_ms, left_s, self.config.kill_grace_s
        )
        return await verify.run_verification(
            task.task_id,
            task.verification_steps,
            cwd=place.cwd,
            marker=tools.marker,
            env=tools.env,
            timeout_ms=bound_ms,
            emit=run.progress.emit,
            run_number=run_number,
            skip=task.skip_verification,
            grace_s=grace_s,
            own=self.own_paths,
        )

    async def _finish(
        self,
        task: Task,
        place: _Place,
        tools: gitflow.Tools,
        progress: ProgressSender,
        results: list[DispatchResult],
        history: list[dict[str, Any]],
    ) -> DispatchResult:
        good = [r for r in results if r.ok and r.result is not None]
        last = good[-1]
        assert last.result is not None
        result = dict(last.result)
        if len(results) > 1:
            for key in _SUMMED:
                values = [(r.result or {}).get(key) for r in good]
                numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if numbers:
                    result[key] = sum(numbers)
            eq = [(r.result or {}).get("equivalent_claude_cost_usd") for r in good]
            if any(isinstance(v, (int, float)) for v in eq):
                result["equivalent_claude_cost_usd"] = sum(v for v in eq if isinstance(v, (int, float)))
        report = history[-1]
        result["verification_status"] = report["status"]
        result["verification_attempts"] = len(history)
        warnings = list(place.warnings)
        if place.branch is not None and place.git_repo is not None:
            if report["status"] in DELIVERABLE:
                await progress.emit("status", f"pushing {place.branch} and opening the pull request…")
                pr = await gitflow.deliver(
                    tools,
                    place.cwd,
                    place.branch,
                    gitflow.PrInfo(
                        task_id=task.task_id,
                        agent_id=self.config.agent_id,
                        description=task.description,
                        priority=task.priority,
                        hub_api_url=self.config.hub_api_url,
                        reviewer=self.config.reviewer or None,
                    ),
                    self.state_dir / "tmp" / f"pr-{workspace.task_dir_name(task.task_id)}.md",
                )
                if pr.url:
                    result["pr_url"] = pr.url
                if pr.warning:
                    warnings.append(pr.warning)
            else:
                warnings.append(f"verification {report['status']}: branch not pushed, no pull request opened")
        if warnings:
            result["git_warning"] = truncate("; ".join(warnings), 2000)
        return attrs.evolve(
            last,
            result=result,
            tokens_used=sum(r.tokens_used for r in results),
            attempts=sum(r.attempts for r in results),
            verification_report=report,
            verification_history=history,
        )
