"""The branch-and-PR workflow: a branch per task before it runs, a pull request after.

Before the task (`prepare_branch`): the tree must be clean, `git fetch origin`,
then `<agent>/<slug>` is checked out fresh from `origin/main` (an old local
branch of that name is reset). Any failure is a warning the result carries
(`git_warning`); the task still runs, as in the original.

After a success whose verification did not fail (`deliver`): if the branch
has commits ahead of `origin/main` it is pushed (`--force-with-lease`), the
labels `agent:<agent>` and `priority:<p>` are made, and `gh pr create` opens
the pull request, whose URL becomes `pr_url`.

Every `git` and `gh` call is an argv list (no shell, so nothing in a task's
description can inject a command), runs through `procs.capture` with the
task's marker (a cancel kills it), and has a time limit: 60 s for git, 120 s
for gh, which runs with `GH_PROMPT_DISABLED=1`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import trio

from .log import get_logger
from .procs import capture, describe_returncode

log = get_logger(__name__)

GIT_TIMEOUT_S = 60.0
GH_TIMEOUT_S = 120.0
BASE_BRANCH = "main"
BASE_REF = "origin/main"
_TAIL = 400


def agent_prefix(agent_id: str) -> str:
    """The agent id up to its first `-`, at most 8 characters (a safe fallback if empty)."""
    head = re.sub(r"[^a-z0-9_]", "", agent_id.split("-", 1)[0].lower())[:8]
    return head or "agent"


def slugify(text: str, limit: int = 40) -> str:
    """Lowercase; drop all but a-z, 0-9, whitespace and `-`; whitespace runs to `-`; trim; cut."""
    slug = re.sub(r"[^a-z0-9\s-]", "", text.lower())
    slug = re.sub(r"\s+", "-", slug)
    slug = re.sub(r"-+", "-", slug).strip("-")
    return slug[:limit].rstrip("-")


def branch_name(agent_id: str, description: str, task_id: str = "") -> str:
    """`<agent>/<slug>`: e.g. agent `acc-agent`, "Add the feature file" → `acc/add-the-feature-file`.

    A description with nothing left to slug (all punctuation or non-Latin
    script) falls back on the task id, then on `task`.
    """
    slug = slugify(description) or slugify(task_id) or "task"
    return f"{agent_prefix(agent_id)}/{slug}"


def pr_title(description: str, task_id: str) -> str:
    """The description on one line; over 60 characters, its first 57 and "..."."""
    title = " ".join(description.split()) or f"Task {task_id}"
    return title if len(title) <= 60 else title[:57] + "..."


@attrs.frozen
class Cmd:
    """How one git/gh call went. `problem` is set when it did not run to an exit code."""

    returncode: int | None
    stdout: str
    stderr: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def why(self) -> str:
        """A short reason for a failure, for a log line or `git_warning`."""
        if self.problem is not None:
            return self.problem
        detail = (self.stderr.strip() or self.stdout.strip())[-_TAIL:]
        code = describe_returncode(self.returncode if self.returncode is not None else -1)
        return f"{code}: {detail}" if detail else code


class Tools:
    """Runs `git` and `gh` for one task: its marker, its environment, the time limits."""

    def __init__(self, env: Mapping[str, str], marker: str, *, grace_s: float = 5.0) -> None:
        self.env = dict(env)
        # Never wait for a human: no credential or editor prompt may hang a task.
        self.env.update({"GIT_TERMINAL_PROMPT": "0", "GIT_EDITOR": "true", "GH_PROMPT_DISABLED": "1"})
        self.marker = marker
        self.grace_s = grace_s

    async def git(self, cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> Cmd:
        return await self.run(["git", *args], cwd, GIT_TIMEOUT_S, env)

    async def gh(self, cwd: Path, *args: str) -> Cmd:
        return await self.run(["gh", *args], cwd, GH_TIMEOUT_S, None)

    async def run(
        self, argv: list[str], cwd: Path, timeout_s: float, extra_env: Mapping[str, str] | None
    ) -> Cmd:
        env = {**self.env, **(extra_env or {})}
        try:
            res = await capture(
                argv, cwd=cwd, env=env, marker=self.marker, timeout_s=timeout_s, grace_s=self.grace_s
            )
        except FileNotFoundError:
            here = await trio.Path(cwd).is_dir()
            return Cmd(None, "", "", f"{argv[0]} not found on PATH" if here else f"directory {cwd} not found")
        except OSError as exc:
            return Cmd(None, "", "", f"could not start {argv[0]}: {exc}")
        what = " ".join(argv[:3])
        if res.timed_out:
            log.warning("git_tool_timed_out", argv=what, timeout_s=timeout_s)
            return Cmd(None, res.stdout, res.stderr, f"`{what}` timed out after {timeout_s:g} s")
        log.debug("git_tool", argv=what, returncode=res.returncode)
        return Cmd(res.returncode, res.stdout, res.stderr)


async def checkout_problem(tools: Tools, path: Path) -> str | None:
    """None if `path` is inside a git work tree, else why not (git missing included)."""
    if not await trio.Path(path).is_dir():
        return f"{path} is not a directory"
    res = await tools.git(path, "rev-parse", "--is-inside-work-tree")
    if res.ok and res.stdout.strip() == "true":
        return None
    return res.problem or f"{path} is not a git checkout"


async def is_checkout(tools: Tools, path: Path) -> bool:
    """True if `path` is inside a git work tree."""
    return await checkout_problem(tools, path) is None


@attrs.frozen
class Prepared:
    """The branch the task works on (None: the workflow is off for it) and why not."""

    branch: str | None
    warning: str | None = None


async def fetch_origin(tools: Tools, repo: Path) -> str | None:
    """`git fetch origin`; None on success, else the reason (no remote included)."""
    remote = await tools.git(repo, "remote", "get-url", "origin")
    if not remote.ok:
        return f"no git remote 'origin' in {repo}"
    fetched = await tools.git(repo, "fetch", "--prune", "origin")
    if not fetched.ok:
        return f"git fetch origin failed: {fetched.why()}"
    return None


def own_excludes(where: Path, own: Sequence[Path]) -> list[str]:
    """Pathspecs for `git status` in `where` that leave out the sidecar's own files.

    The original's onboarding puts config.json in `<repo_dir>/sidecar/`, so the
    state dir next to it, the log file and the results dir may be inside the
    checkout: found from outside, they made every tree dirty, so every task
    skipped the branch workflow. Only paths strictly inside `where` count; none
    gives no pathspec (the whole tree, as before).
    """
    base = where.resolve()
    rels: list[str] = []
    for path in own:
        try:
            rel = path.resolve().relative_to(base)
        except ValueError:
            continue
        if rel.parts:
            rels.append(f":(exclude){rel.as_posix()}")
    return ["--", ":/", *rels] if rels else []


async def changed_paths(tools: Tools, where: Path, own: Sequence[Path] = ()) -> Cmd | list[str]:
    """`git status --porcelain` lines in `where`, the sidecar's own files left out;
    the failed command if it failed."""
    status = await tools.git(where, "status", "--porcelain", *own_excludes(where, own))
    if not status.ok:
        return status
    return [line for line in status.stdout.splitlines() if line.strip()]


async def stash_leftovers(
    tools: Tools, repo: Path, task_id: str, branch: str, own: Sequence[Path] = ()
) -> str | None:
    """After a task worked on `branch` in `repo` itself: what it left uncommitted
    goes into a stash named after it, so that the next task starts from a clean
    tree and nothing is lost. None when nothing was left; else what was done.

    Found from outside: a task that left one untracked file made every later
    task skip its branch (the tree was dirty) and commit onto that task's branch.
    The stash commit gets an identity of its own if git has none configured.
    """
    found = await changed_paths(tools, repo, own)
    if isinstance(found, Cmd):
        return f"git status after the task failed: {found.why()}"
    if not found:
        return None
    message = f"trio-sidecar: left by task {task_id} on {branch}"
    ident = ["-c", "user.name=trio-sidecar", "-c", "user.email=trio-sidecar@localhost"]
    has_ident = (await tools.git(repo, "var", "GIT_COMMITTER_IDENT")).ok
    argv = [*([] if has_ident else ident), "stash", "push", "--include-untracked", "-m", message]
    excludes = own_excludes(repo, own)
    stashed = await tools.git(repo, *argv, *excludes)
    if not stashed.ok:
        log.warning("git_stash_failed", repo=str(repo), task_id=task_id, problem=stashed.why())
        return f"the task left {len(found)} uncommitted paths in {repo}; git stash failed: {stashed.why()}"
    log.info("git_leftovers_stashed", repo=str(repo), task_id=task_id, paths=len(found))
    return f"the task left {len(found)} uncommitted paths in {repo}: kept in git stash as {message!r}"


async def prepare_branch(tools: Tools, repo: Path, branch: str, own: Sequence[Path] = ()) -> Prepared:
    """Before the task: clean tree (the sidecar's own files aside), fetch, `branch`
    fresh from origin/main, checked out."""
    changed = await changed_paths(tools, repo, own)
    if isinstance(changed, Cmd):
        return _skip(repo, f"git status failed: {changed.why()}")
    if changed:
        return _skip(repo, f"working tree {repo} is not clean ({len(changed)} changed paths)")
    problem = await fetch_origin(tools, repo)
    if problem is not None:
        return _skip(repo, problem)
    # -B resets a local branch left by an earlier task of the same name.
    checkout = await tools.git(repo, "checkout", "--no-track", "-B", branch, BASE_REF)
    if not checkout.ok:
        return _skip(repo, f"could not check out {branch} from {BASE_REF}: {checkout.why()}")
    log.info("git_branch_prepared", repo=str(repo), branch=branch)
    return Prepared(branch)


def _skip(repo: Path, problem: str) -> Prepared:
    warning = f"{problem}: branch workflow skipped"
    log.warning("git_prepare_failed", repo=str(repo), problem=problem)
    return Prepared(None, warning)


@attrs.frozen
class PullRequest:
    """What delivery gave: the PR's URL, or why there is none (or what went wrong)."""

    url: str | None
    warning: str | None = None


@attrs.frozen
class PrInfo:
    """What the pull request says about its task."""

    task_id: str
    agent_id: str
    description: str
    priority: str
    hub_api_url: str | None
    reviewer: str | None


def pr_body(info: PrInfo, diffstat: str) -> str:
    lines = [
        "## Task",
        "",
        f"- Task: `{info.task_id}`",
        f"- Agent: `{info.agent_id}`",
        f"- Priority: {info.priority}",
    ]
    if info.hub_api_url:
        lines.append(f"- On the hub: {info.hub_api_url.rstrip('/')}/api/tasks/{info.task_id}")
    lines += ["", "## Description", "", info.description.strip() or "(none)", "", "## Changes", ""]
    lines += ["```", diffstat.rstrip() or "(no diff)", "```", "", "Opened by trio-sidecar."]
    return "\n".join(lines) + "\n"


async def deliver(tools: Tools, cwd: Path, branch: str, info: PrInfo, body_path: Path) -> PullRequest:
    """After a verified success: push `branch` and open its pull request."""
    ahead = await tools.git(cwd, "rev-list", "--count", f"{BASE_REF}..HEAD")
    if not ahead.ok:
        return PullRequest(None, f"could not count commits ahead of {BASE_REF}: {ahead.why()}")
    if int(ahead.stdout.strip() or "0") == 0:
        return PullRequest(None, f"no commits ahead of {BASE_REF} on {branch}: no pull request opened")
    pushed = await tools.git(cwd, "push", "--force-with-lease", "--set-upstream", "origin", branch)
    if not pushed.ok:
        log.warning("git_push_failed", branch=branch, problem=pushed.why())
        return PullRequest(None, f"git push of {branch} failed: {pushed.why()}")
    notes: list[str] = []
    labels = [f"agent:{agent_prefix(info.agent_id)}", f"priority:{info.priority}"]
    for label in labels:
        made = await tools.gh(cwd, "label", "create", label, "--force")
        if not made.ok:
            notes.append(f"gh label create {label} failed: {made.why()}")
            if made.problem is not None:  # gh missing or hung: the PR would fail the same way
                return PullRequest(None, f"{made.problem}: {branch} pushed, no pull request opened")
    diffstat = await tools.git(cwd, "diff", "--stat", f"{BASE_REF}...HEAD")
    title = pr_title(info.description, info.task_id)
    # `--flag=value`: a title that starts with "-" stays a value.
    argv = ["pr", "create", "--base", BASE_BRANCH, "--head", branch, f"--title={title}"]
    argv += ["--body-file", str(body_path)]
    for label in labels:
        argv += ["--label", label]
    if info.reviewer:
        argv += [f"--reviewer={info.reviewer}"]
    try:
        await trio.Path(body_path).parent.mkdir(parents=True, exist_ok=True)
        await trio.Path(body_path).write_text(pr_body(info, diffstat.stdout if diffstat.ok else ""))
        created = await tools.gh(cwd, *argv)
    finally:
        with trio.CancelScope(shield=True):
            await trio.Path(body_path).unlink(missing_ok=True)
    if not created.ok:
        notes.append(f"gh pr create failed: {created.why()}")
        log.warning("gh_pr_create_failed", branch=branch, problem=created.why())
        return PullRequest(None, "; ".join(notes))
    urls = [w for w in created.stdout.split() if w.startswith(("https://", "http://"))]
    url = urls[-1] if urls else created.stdout.strip()[-_TAIL:] or None
    log.info("pull_request_opened", branch=branch, url=url)
    return PullRequest(url, "; ".join(notes) or None)
