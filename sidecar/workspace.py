"""Where a task works: per-repo workspaces and per-task git worktrees.

- A task whose `repo` names a repository URL works in a clone of it under
  `<state_dir>/workspaces/<slug of the URL>`: cloned on first use, fetched and
  reset to `origin/main` on later uses. A failed clone fails the task; a failed
  update only warns, and the stale tree is used.
- With `capacity` > 1, two tasks must never share a working tree: each
  direct-execution task gets its own `git worktree` under
  `<state_dir>/worktrees/`, removed when the task ends.

The URL is always an argument after `--`, never shell text, and only the
`file`, `git`, `http(s)` and `ssh` transports are allowed (git's `ext::` runs
commands). Clone and update of one repository are serialized in this process.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from .gitflow import BASE_REF, Tools, fetch_origin
from .log import get_logger

log = get_logger(__name__)

ALLOWED_PROTOCOLS = "file:git:http:https:ssh"
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://\S+|[\w.-]+@[\w.-]+:\S+)$", re.I)
# Removing a worktree at task end: bounded, since it runs shielded.
CLEANUP_TIMEOUT_S = 30.0


class WorkspaceError(Exception):
    """A workspace could not be set up; the message is the reason."""


def is_repo_url(repo: str | None) -> bool:
    """True for `scheme://…` and scp-like `user@host:path`; a bare name is not a URL."""
    return bool(repo) and repo is not None and not repo.startswith("-") and bool(_URL.match(repo.strip()))


def workspace_slug(url: str) -> str:
    """A directory name for a repository URL: readable, plus a short hash against collisions."""
    readable = re.sub(r"[^a-z0-9]+", "-", url.lower().split("://", 1)[-1]).strip("-")[:60].rstrip("-")
    digest = hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{readable or 'repo'}-{digest}"


def task_dir_name(task_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id)[:80].lstrip(".") or "task"
    return f"{safe}-{hashlib.sha256(task_id.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


class RepoLocks:
    """One lock per repository directory: fetch, clone and `worktree add` never overlap."""

    def __init__(self) -> None:
        self._locks: dict[str, trio.Lock] = {}

    @asynccontextmanager
    async def hold(self, path: Path) -> AsyncIterator[None]:
        lock = self._locks.setdefault(str(path), trio.Lock())
        async with lock:
            yield


@attrs.frozen
class Workspace:
    path: Path
    warning: str | None = None


async def ensure_workspace(tools: Tools, root: Path, url: str, locks: RepoLocks) -> Workspace:
    """The up-to-date clone of `url` under `root`; raises WorkspaceError if there is none."""
    url = url.strip()
    if not is_repo_url(url):
        raise WorkspaceError(f"not a repository URL: {url!r}")
    path = root / workspace_slug(url)
    env = {"GIT_ALLOW_PROTOCOL": ALLOWED_PROTOCOLS}
    async with locks.hold(path):
        if await trio.Path(path / ".git").exists():
            problem = await fetch_origin(tools, path)
            if problem is None:
                reset = await tools.git(path, "reset", "--hard", BASE_REF)
                if reset.ok:
                    cleaned = await tools.git(path, "clean", "-ffd")
                    problem = None if cleaned.ok else f"git clean failed: {cleaned.why()}"
                else:
                    problem = f"git reset --hard {BASE_REF} failed: {reset.why()}"
            if problem is not None:
                log.warning("workspace_update_failed", repo=url, path=str(path), problem=problem)
                return Workspace(path, f"workspace update failed, using the stale tree: {problem}")
            log.info("workspace_updated", repo=url, path=str(path))
            return Workspace(path)
        await trio.Path(root).mkdir(parents=True, exist_ok=True)
        # Clone beside the final place and rename: a clone cut short leaves no
        # half-made workspace behind that a later task would take as real.
        partial = root / f".{path.name}.partial"
        await remove_tree(partial)
        cloned = await tools.git(root, "clone", "--", url, str(partial), env=env)
        if not cloned.ok:
            await remove_tree(partial)
            raise WorkspaceError(cloned.why())
        await remove_tree(path)
        await trio.Path(partial).rename(path)
        log.info("workspace_cloned", repo=url, path=str(path))
        return Workspace(path)


@attrs.frozen
class Worktree:
    """A task's own worktree of `repo` at `path`; `branch` None when detached."""

    repo: Path
    path: Path
    branch: str | None
    warning: str | None = None


async def add_worktree(
    tools: Tools, repo: Path, path: Path, branch: str | None, locks: RepoLocks
) -> Worktree:
    """A new worktree at `path` with `branch` fresh from origin/main (raises WorkspaceError).

    `branch` None (the branch workflow is off): a detached worktree of `repo`'s
    HEAD, only to keep the task apart from the others.
    """
    async with locks.hold(repo):
        await _drop_worktree(tools, repo, path)
        await trio.Path(path.parent).mkdir(parents=True, exist_ok=True)
        if branch is None:
            head = await tools.git(repo, "worktree", "add", "--detach", str(path), "HEAD")
            if not head.ok:
                raise WorkspaceError(f"could not add a worktree: {head.why()}")
            return Worktree(repo, path, None)
        problem = await fetch_origin(tools, repo)
        if problem is None:
            added = await tools.git(repo, "worktree", "add", "-B", branch, str(path), BASE_REF)
            if added.ok:
                log.info("worktree_added", repo=str(repo), path=str(path), branch=branch)
                return Worktree(repo, path, branch)
            problem = f"could not add a worktree on {branch}: {added.why()}"
        # No fresh origin/main or the branch is taken: a detached tree of what
        # there is still keeps this task apart from the others, without a PR.
        start = BASE_REF if (await tools.git(repo, "rev-parse", "--verify", "-q", BASE_REF)).ok else "HEAD"
        detached = await tools.git(repo, "worktree", "add", "--detach", str(path), start)
        if not detached.ok:
            raise WorkspaceError(f"could not add a worktree: {detached.why()}")
        log.warning("worktree_detached", repo=str(repo), path=str(path), problem=problem)
        return Worktree(repo, path, None, f"{problem}: branch workflow skipped")


async def remove_worktree(tools: Tools, tree: Worktree, locks: RepoLocks) -> None:
    """Remove a task's worktree (shielded and bounded: it runs as the task ends)."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT_S) as scope:
        async with locks.hold(tree.repo):
            await _drop_worktree(tools, tree.repo, tree.path)
    if scope.cancelled_caught:
        log.warning("worktree_remove_timed_out", path=str(tree.path))


async def _drop_worktree(tools: Tools, repo: Path, path: Path) -> None:
    if await trio.Path(path).exists():
        removed = await tools.git(repo, "worktree", "remove", "--force", str(path))
        if not removed.ok:
            log.warning("worktree_remove_failed", path=str(path), problem=removed.why())
            await remove_tree(path)
    await tools.git(repo, "worktree", "prune")


async def remove_tree(path: Path) -> None:
    """Delete a directory tree (in a worker thread: it may be large)."""
    if await trio.Path(path).exists():
        await trio.to_thread.run_sync(lambda: shutil.rmtree(path, ignore_errors=True))
