"""The whole run of a task: workspace, branch, execution, verification, corrective retries, PR.

Real parts: the real dispatcher and shell / Ollama executors, real git with a
bare `origin` in tmp_path, the test Ollama server; only GitHub's `gh` is a
stand-in (tests/fakes/gh_standin.py).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing

from sidecar.config import Config
from sidecar.cost import CostModel
from sidecar.dispatcher import Dispatcher, DispatchResult
from sidecar.executors import ExecContext, Executor
from sidecar.executors.ollama import OllamaExecutor
from sidecar.executors.shell import ShellExecutor
from sidecar.messages import parse_task
from sidecar.pipeline import Pipeline, verification_bounds
from tests.fakes.ollama_server import Script, open_ollama_server
from tests.fakes.proc_helpers import RecordingProgress, task_run
from tests.gitrepos import GhLog, commit_command, git, install_gh, make_origin

SHELL = {"target_type": "sidecar"}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def gh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> GhLog:
    return install_gh(monkeypatch, tmp_path)


@pytest.fixture
def origin(tmp_path: Path) -> tuple[Path, Path]:
    return make_origin(tmp_path / "git")


class Run:
    """A pipeline with the real dispatcher, shell and Ollama executors, as the daemon builds it."""

    def __init__(self, config: Config, http: httpx.AsyncClient) -> None:
        self.ctx = ExecContext(config=config, http=http, state_dir=config.resolved_state_dir())
        executors: dict[str, Executor] = {
            "shell": ShellExecutor(self.ctx),
            "ollama": OllamaExecutor(self.ctx),
        }
        self.pipeline = Pipeline(config, Dispatcher(executors, CostModel(config)).run)

    async def sweep_leftovers(self) -> None:
        await self.pipeline.sweep_leftovers()


def pipeline(config: Config, http: httpx.AsyncClient) -> Run:
    return Run(config, http)


def task(task_id: str = "t-1", **fields: Any) -> Any:
    frame: dict[str, Any] = {"type": "task_assign", "task_id": task_id, "routing_decision": SHELL}
    frame.update(fields)
    return parse_task(frame)


def shell(command: str, **fields: Any) -> Any:
    meta = {"shell_command": command, **fields.pop("metadata", {})}
    return task(metadata=meta, **fields)


async def run(p: Run, t: Any) -> tuple[DispatchResult, RecordingProgress]:
    progress = RecordingProgress(t.task_id)
    return await p.pipeline.run(task_run(p.ctx, t, progress)), progress


async def test_verified_shell_task_is_pushed_and_gets_a_pr(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], gh: GhLog
) -> None:
    bare, checkout = origin
    cfg = make_config(
        repo_dir=str(checkout), reviewer="", hub_api_url="http://hub:4000", agent_id="acc-agent"
    )
    t = shell(
        commit_command(),
        description="Add the feature file",
        metadata={"priority": "high"},
        verification_steps=[{"type": "file_exists", "target": "feature.txt", "description": "made"}],
    )
    res, progress = await run(pipeline(cfg, http), t)
    assert res.ok and res.result is not None
    assert res.result["pr_url"] == "https://github.com/acme/widgets/pull/1"
    assert "git_warning" not in res.result
    assert res.result["verification_status"] == "pass" and res.result["verification_attempts"] == 1
    assert res.verification_report is not None and res.verification_report["status"] == "pass"
    assert res.verification_history == [res.verification_report]
    assert git(bare, "log", "--format=%s", "-1", "acc/add-the-feature-file").strip() == "add feature.txt"
    pr = gh.argvs()[-1]
    assert "--label" in pr and "priority:high" in pr and not any(a.startswith("--reviewer") for a in pr)
    texts = progress.texts("status")
    assert "working on branch acc/add-the-feature-file" in texts
    assert any(t.startswith("verification 1/1 pass") for t in texts)


async def test_failed_verification_is_still_a_success_without_pr(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], gh: GhLog
) -> None:
    _bare, checkout = origin
    cfg = make_config(repo_dir=str(checkout))
    t = shell(
        commit_command(), description="Do it", verification_steps=[{"type": "file_exists", "target": "nope"}]
    )
    res, _ = await run(pipeline(cfg, http), t)
    assert res.ok and res.result is not None
    assert res.result["verification_status"] == "fail"
    assert "pr_url" not in res.result and "no pull request opened" in res.result["git_warning"]
    assert gh.calls() == []


async def test_dirty_tree_still_runs_the_task_with_a_warning(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], gh: GhLog
) -> None:
    _bare, checkout = origin
    (checkout / "scratch.txt").write_text("uncommitted")
    res, _ = await run(
        pipeline(make_config(repo_dir=str(checkout)), http), shell("echo ran", description="x")
    )
    assert res.ok and res.result is not None and res.result["output"] == "ran\n"
    assert "not clean" in res.result["git_warning"] and "pr_url" not in res.result
    assert git(checkout, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"


async def test_no_commits_no_pr(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], gh: GhLog
) -> None:
    _bare, checkout = origin
    res, _ = await run(pipeline(make_config(repo_dir=str(checkout)), http), shell("true", description="noop"))
    assert res.ok and res.result is not None
    assert "no commits ahead of origin/main" in res.result["git_warning"]
    assert gh.calls() == []


async def test_plain_directory_and_switched_off_workflow(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], tmp_path: Path, gh: GhLog
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    res, _ = await run(pipeline(make_config(repo_dir=str(plain)), http), shell("pwd", description="x"))
    assert res.ok and res.result is not None and res.result["output"].strip() == str(plain)
    assert "git_warning" not in res.result and res.result["verification_status"] == "auto_pass"
    _bare, checkout = origin
    off = make_config(repo_dir=str(checkout), git_workflow=False)
    res, _ = await run(pipeline(off, http), shell(commit_command(), description="x"))
    assert res.ok and git(checkout, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"
    assert gh.calls() == []


async def test_failed_execution_is_returned_as_is(
    make_config: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    t = shell("exit 3", verification_steps=[{"type": "command_succeeds", "target": "true"}])
    res, progress = await run(pipeline(make_config(), http), t)
    assert not res.ok and res.verification_report is None
    assert not any(t.startswith("verification") for t in progress.texts("status"))


async def test_two_tasks_at_capacity_2_work_in_separate_worktrees(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], gh: GhLog, tmp_path: Path
) -> None:
    bare, checkout = origin
    cfg = make_config(repo_dir=str(checkout), capacity=2)
    p = pipeline(cfg, http)
    rdv = tmp_path / "rdv"
    rdv.mkdir()
    results: dict[str, DispatchResult] = {}

    def command(name: str) -> str:
        # Both tasks are in their trees at once: each waits for the other to arrive.
        wait = f"while [ ! -e {rdv}/a ] || [ ! -e {rdv}/b ]; do sleep 0.01; done"
        return f"pwd; touch {rdv}/{name}; {wait}; " + commit_command(f"{name}.txt", name)

    async def one(name: str) -> None:
        results[name] = (await run(p, shell(command(name), description=f"Task {name}", task_id=name)))[0]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "a")
            nursery.start_soon(one, "b")
    cwds = {n: Path(r.result["output"].splitlines()[0]) for n, r in results.items() if r.result}
    assert set(cwds) == {"a", "b"} and cwds["a"] != cwds["b"]
    state = Path(cfg.resolved_state_dir())
    assert all(c.parent == state / "worktrees" for c in cwds.values())
    for name, r in results.items():
        assert r.result is not None and r.result["pr_url"].startswith("https://github.com/")
        files = git(bare, "ls-tree", "--name-only", f"agent/task-{name}").split()
        assert f"{name}.txt" in files and ({"a", "b"} - {name}).pop() + ".txt" not in files
    # The worktrees are gone when the tasks end, and repo_dir never moved.
    assert not any(c.exists() for c in cwds.values())
    assert git(checkout, "worktree", "list").count("\n") == 1
    assert git(checkout, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"


async def test_repo_url_gets_a_workspace_cloned_then_updated(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], gh: GhLog
) -> None:
    bare, checkout = origin
    url = bare.as_uri()
    cfg = make_config()
    p = pipeline(cfg, http)
    res, _ = await run(p, shell("pwd; ls", repo=url, description="Look"))
    assert res.ok and res.result is not None
    ws = Path(res.result["output"].splitlines()[0])
    assert ws.parent == Path(cfg.resolved_state_dir()) / "workspaces"
    assert "README.md" in res.result["output"]
    # Upstream moves on, and the last task left a stray file: the next use fetches and resets.
    (checkout / "second.txt").write_text("2")
    git(checkout, "add", "second.txt")
    git(checkout, "commit", "-q", "-m", "second")
    git(checkout, "push", "-q", "origin", "main")
    (ws / "stray.txt").write_text("left over")
    res, _ = await run(p, shell("ls", repo=url, description="Look again", task_id="t-2"))
    assert res.ok and res.result is not None
    listing = res.result["output"].split()
    assert "second.txt" in listing and "stray.txt" not in listing
    # A commit made in the workspace is delivered from it.
    res, _ = await run(p, shell(commit_command(), repo=url, description="Add the feature", task_id="t-3"))
    assert res.ok and res.result is not None and res.result["pr_url"].endswith("/pull/1")


async def test_workspace_clone_failure_fails_the_task(
    make_config: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    url = (tmp_path / "missing.git").as_uri()
    res, _ = await run(pipeline(make_config(), http), shell("echo never", repo=url))
    assert not res.ok and res.reason == "workspace_setup_failed"
    assert res.error is not None and res.error.startswith(f"Workspace setup failed for {url}: ")
    assert not any((Path(make_config().resolved_state_dir()) / "workspaces").glob("*"))


async def test_workspace_update_failure_uses_the_stale_tree(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], tmp_path: Path
) -> None:
    bare, _checkout = origin
    url = bare.as_uri()
    p = pipeline(make_config(), http)
    assert (await run(p, shell("true", repo=url)))[0].ok
    bare.rename(tmp_path / "moved.git")
    res, _ = await run(p, shell("cat README.md", repo=url, task_id="t-2"))
    assert res.ok and res.result is not None and res.result["output"] == "# widgets\n"
    assert "workspace update failed, using the stale tree" in res.result["git_warning"]


async def test_hostile_repo_values_are_never_run(
    make_config: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    cfg = make_config()
    await trio.Path(cfg.resolved_state_dir()).mkdir(parents=True)
    hostile = (
        f"ext::sh -c touch% {canary}",
        f"--upload-pack=touch {canary}",
        f"file:///x; touch {canary}",
        f"file:///x/$(touch {canary})",
        f"ssh://-oProxyCommand=touch%20{canary}/x",
    )
    for repo in hostile:
        res, _ = await run(pipeline(cfg, http), shell("true", repo=repo))
        assert not canary.exists()
        assert res.ok or (res.error is not None and "Workspace setup failed" in res.error)


async def test_ollama_corrective_retries_sum_tokens(
    make_config: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # The check fails the first time and passes the second (its own counter).
    counter = tmp_path / "runs"
    check = (
        f"{shlex.quote(sys.executable)} -c \"import pathlib,sys; p=pathlib.Path('{counter}'); "
        "n=int(p.read_text()) if p.exists() else 0; p.write_text(str(n+1)); "
        "print('2 tests failed: test_add, test_sub' if n == 0 else 'all tests passed'); "
        'sys.exit(1 if n == 0 else 0)"'
    )
    async with open_ollama_server() as srv:
        srv.queue = [Script(reply="a wrong answer"), Script(reply="the right answer")]
        cfg = make_config(repo_dir=str(work), ollama_url=srv.url)
        t = task(
            description="Write the add function",
            routing_decision={"target_type": "ollama", "selected_model": "qwen3:8b"},
            verification_steps=[
                {"type": "test_passes", "target": check, "description": "unit tests"},
                {"type": "file_exists", "target": str(work)},
            ],
            max_verification_retries=2,
        )
        res, progress = await run(pipeline(cfg, http), t)
        chats = srv.chat_requests
    assert res.ok and res.result is not None
    assert res.result["output"] == "the right answer"
    assert res.result["verification_status"] == "pass" and res.result["verification_attempts"] == 2
    assert [r["status"] for r in res.verification_history or []] == ["fail", "pass"]
    assert [r["run_number"] for r in res.verification_history or []] == [1, 2]
    assert len(chats) == 2
    corrective = chats[1].json["messages"][-1]["content"]
    for needle in (
        "2 tests failed: test_add, test_sub",
        "unit tests",
        "Write the add function",
        "a wrong answer",
    ):
        assert needle in corrective
    assert "Passing checks" in corrective and "[file_exists]" in corrective
    assert "Write the add function" == chats[0].json["messages"][-1]["content"]
    # Tokens are the sum of both attempts.
    per_attempt = [len(r.json["messages"][-1]["content"].split()) for r in chats]
    assert res.result["tokens_in"] >= sum(per_attempt)
    assert res.tokens_used == res.result["tokens_in"] + res.result["tokens_out"]
    assert res.result["tokens_out"] == len("a wrong answer".split()) + len("the right answer".split())
    assert any("corrective retry 1/2" in t for t in progress.texts("status"))


async def test_no_corrective_retry_for_shell_tasks(
    make_config: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    runs = tmp_path / "runs"
    t = shell(
        f"echo x >> {runs}",
        verification_steps=[{"type": "command_succeeds", "target": "false"}],
        max_verification_retries=3,
    )
    res, _ = await run(pipeline(make_config(repo_dir=str(tmp_path)), http), t)
    assert res.ok and res.result is not None and res.result["verification_attempts"] == 1
    assert runs.read_text() == "x\n"


async def test_worktrees_left_by_a_killed_sidecar_are_swept_at_start(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path]
) -> None:
    _bare, checkout = origin
    cfg = make_config(repo_dir=str(checkout), capacity=2)
    left = Path(cfg.resolved_state_dir()) / "worktrees" / "dead-task"
    git(checkout, "worktree", "add", "-q", "-b", "agent/dead", str(left), "origin/main")
    assert git(checkout, "worktree", "list").count("\n") == 2
    await pipeline(cfg, http).sweep_leftovers()
    assert not left.exists()
    assert git(checkout, "worktree", "list").count("\n") == 1


async def test_missing_git_is_a_warning_and_the_task_still_runs(
    make_config: Any,
    http: httpx.AsyncClient,
    origin: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _bare, checkout = origin
    empty = tmp_path / "nobin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    res, _ = await run(
        pipeline(make_config(repo_dir=str(checkout)), http), shell("echo ran", description="x")
    )
    assert res.ok and res.result is not None and res.result["output"] == "ran\n"
    assert res.result["git_warning"] == "git not found on PATH: branch workflow skipped"


async def test_worktrees_keep_tasks_apart_with_the_workflow_off(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], gh: GhLog
) -> None:
    _bare, checkout = origin
    cfg = make_config(repo_dir=str(checkout), capacity=2, git_workflow=False)
    res, _ = await run(pipeline(cfg, http), shell("pwd; git status --short --branch", description="x"))
    assert res.ok and res.result is not None, res
    lines = res.result["output"].splitlines()
    assert Path(lines[0]).parent == Path(cfg.resolved_state_dir()) / "worktrees", res.result
    assert "no branch" in lines[1], res.result
    assert "git_warning" not in res.result and "pr_url" not in res.result, res.result
    assert not await trio.Path(lines[0]).exists() and gh.calls() == []


async def test_verification_ends_before_the_tasks_own_limit(
    make_config: Any, http: httpx.AsyncClient, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    p = pipeline(make_config(repo_dir=str(tmp_path), kill_grace_s=0.5), http)
    t = shell("echo done", verification_steps=[{"type": "command_succeeds", "target": "sleep 1000"}])
    progress = RecordingProgress(t.task_id)
    t0 = trio.current_time()
    run_ = attrs.evolve(task_run(p.ctx, t, progress), deadline=t0 + 10)
    res = await p.pipeline.run(run_)
    # The work's result stands, with a timed-out report, before the task's deadline.
    assert res.ok and res.result is not None and res.result["output"] == "done\n"
    assert res.result["verification_status"] == "timeout"
    assert res.verification_report is not None and 8000 <= res.verification_report["timeout_ms"] <= 8500
    assert trio.current_time() - t0 < 10


async def test_a_short_task_limit_still_leaves_its_checks_time(
    make_config: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """A limit under twice the reserve (kill grace 5 s + 1 s) splits what is left
    between the checks and a shortened reserve. Found from outside: a 5 s task got a
    1 ms verification bound, so its `true` check was killed and nothing was delivered.
    (Real time: the check is a real process that ends in milliseconds, well within.)"""
    p = pipeline(make_config(repo_dir=str(tmp_path), kill_grace_s=5.0), http)
    t = shell("echo quick", verification_steps=[{"type": "command_succeeds", "target": "true"}])
    t0 = trio.current_time()
    res = await p.pipeline.run(
        attrs.evolve(task_run(p.ctx, t, RecordingProgress(t.task_id)), deadline=t0 + 5)
    )
    assert res.ok and res.result is not None and res.result["verification_status"] == "pass"
    assert res.verification_report is not None and 2000 <= res.verification_report["timeout_ms"] <= 2500


@pytest.mark.parametrize("left_s", [0.0, 0.5, 3.0, 5.0, 11.9, 12.0, 60.0, 3600.0])
def test_verification_and_its_kill_fit_in_what_is_left(left_s: float) -> None:
    """Bound + kill grace + the 1 s margin (shortened alike) never pass the task's limit,
    and the checks get at least half of what is left, up to what the task asked for."""
    bound_ms, grace_s = verification_bounds(120_000, left_s, 5.0)
    assert bound_ms / 1000 + grace_s * (1 + 1 / 5.0) <= left_s + 0.001 or bound_ms == 1
    assert bound_ms >= min(120_000, int(left_s / 2 * 1000)) and bound_ms >= 1
    assert 0 <= grace_s <= 5.0
    if left_s >= 12.0:
        assert (bound_ms, grace_s) == (min(120_000, int((left_s - 6.0) * 1000)), 5.0)
    assert verification_bounds(120_000, None, 5.0) == (120_000, 5.0)
    assert verification_bounds(800, left_s, 5.0)[0] <= 800


async def test_what_a_task_leaves_uncommitted_is_stashed_and_the_next_starts_clean(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], gh: GhLog
) -> None:
    """Found from outside: a task that left an untracked file made every later task
    skip its branch (the tree was dirty) and commit onto the earlier task's branch.
    What a task leaves is kept in a named stash; the next task gets its own branch."""
    bare, checkout = origin
    p = pipeline(make_config(repo_dir=str(checkout), agent_id="acc-agent"), http)
    first, _ = await run(p, shell("echo junk > junk.txt && echo more >> README.md", description="Leave junk"))
    assert first.ok and first.result is not None
    warning = first.result["git_warning"]
    assert "no commits ahead" in warning and "left 2 uncommitted paths" in warning
    assert "trio-sidecar: left by task t-1 on acc/leave-junk" in git(checkout, "stash", "list")
    assert git(checkout, "status", "--porcelain").strip() == ""

    second, _ = await run(p, shell(commit_command(), description="Real work"))
    assert second.ok and second.result is not None
    assert "git_warning" not in second.result and second.result["pr_url"]
    assert git(bare, "log", "--format=%s", "-1", "acc/real-work").strip() == "add feature.txt"
    assert "junk.txt" not in git(bare, "ls-tree", "--name-only", "acc/real-work")
    # The stash holds exactly what the first task left.
    assert git(checkout, "stash", "show", "--include-untracked", "--name-only", "stash@{0}").split() == [
        "README.md",
        "junk.txt",
    ]


async def test_the_sidecars_own_files_inside_the_checkout_do_not_make_it_dirty(
    make_config: Any, http: httpx.AsyncClient, origin: tuple[Path, Path], gh: GhLog
) -> None:
    """The original's onboarding puts config.json in `<repo_dir>/sidecar/`, so the
    state dir and the log file land inside the checkout (found from outside: every
    task then skipped its branch). They are not the task's work: not dirt, not
    stashed, and `git_clean` leaves them out."""
    _bare, checkout = origin
    own = checkout / "sidecar"
    cfg = make_config(repo_dir=str(checkout), state_dir=str(own / "state"), log_file=str(own / "sidecar.log"))
    cfg = attrs.evolve(cfg, config_file=str(own / "config.json"))  # as load_config sets it
    (own / "state").mkdir(parents=True)
    (own / "config.json").write_text("{}")  # untracked, not ignored (a re-probe found it)
    (own / "state" / "store.db").write_text("x")
    (own / "sidecar.log").write_text("log\n")
    t = shell(commit_command(), description="Own files", verification_steps=[{"type": "git_clean"}])
    res, _ = await run(pipeline(cfg, http), t)
    assert res.ok and res.result is not None
    assert "git_warning" not in res.result and res.result["pr_url"]
    assert res.result["verification_status"] == "pass"
    assert git(checkout, "stash", "list").strip() == ""
    assert (own / "sidecar.log").exists() and (own / "state" / "store.db").exists()
    assert (own / "config.json").exists()
