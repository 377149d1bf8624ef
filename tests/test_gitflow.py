"""The branch-and-PR workflow against real git: a bare `origin` in tmp_path, `gh` stood in."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar import gitflow, procs
from sidecar.gitflow import PrInfo, Tools, branch_name, pr_title
from tests.gitrepos import GhLog, git, install_gh, make_origin, refuse_pushes

MARKER = "sc-gitflow-test"


@pytest.mark.parametrize(
    ("agent", "description", "branch"),
    [
        ("acc-agent", "Add the feature file", "acc/add-the-feature-file"),
        ("gpu-box-1", "Fix login bug", "gpu/fix-login-bug"),
        ("myagent-abc-def", "Add feature", "myagent/add-feature"),
        ("verylongagentname", "x", "verylong/x"),
        ("acc", "  Fix:   the (nasty) bug!!  ", "acc/fix-the-nasty-bug"),
        ("acc", "Ünïcödé façade — naïve café", "acc/ncd-faade-nave-caf"),
        ("acc", "tabs\tand\nnewlines", "acc/tabs-and-newlines"),
        ("acc", "a -- b --- c", "acc/a-b-c"),
        (
            "acc",
            "Implement the whole new authentication subsystem for the API",
            "acc/implement-the-whole-new-authentication-s",
        ),
        ("acc", "abcd " * 9, "acc/" + "-".join(["abcd"] * 8)),
        ("acc", "修复登录错误", "acc/t-42"),
        ("acc", "!!!", "acc/t-42"),
        ("Acc-x", "UPPER case", "acc/upper-case"),
    ],
)
def test_branch_name_table(agent: str, description: str, branch: str) -> None:
    assert branch_name(agent, description, "t-42") == branch
    assert len(branch.split("/", 1)[1]) <= 40


def test_pr_title_is_cut_at_60() -> None:
    assert pr_title("short", "t") == "short"
    assert pr_title("x" * 60, "t") == "x" * 60
    assert pr_title("y" * 61, "t") == "y" * 57 + "..."
    assert pr_title("", "t-1") == "Task t-1"


def tools() -> Tools:
    return Tools(procs.child_env(os.environ, MARKER), MARKER, grace_s=0.5)


def info(**kw: object) -> PrInfo:
    data: dict[str, object] = {
        "task_id": "t-1",
        "agent_id": "acc-agent",
        "description": "Add the feature file",
        "priority": "urgent",
        "hub_api_url": "http://hub:4000",
        "reviewer": None,
    }
    data.update(kw)
    return PrInfo(**data)  # type: ignore[arg-type]


async def test_prepare_checks_out_a_fresh_branch_from_origin_main(tmp_path: Path) -> None:
    bare, checkout = make_origin(tmp_path)
    # An old local branch of the same name, with a commit of its own, is replaced.
    git(checkout, "checkout", "-q", "-b", "acc/add-the-feature-file")
    (checkout / "old.txt").write_text("old")
    git(checkout, "add", "old.txt")
    git(checkout, "commit", "-q", "-m", "old work")
    git(checkout, "checkout", "-q", "main")
    # origin/main moved on since the last fetch: the branch starts from the new tip.
    other = tmp_path / "other"
    git(tmp_path, "clone", "-q", str(bare), str(other))
    (other / "new.txt").write_text("new")
    git(other, "add", "new.txt")
    git(other, "-c", "user.name=o", "-c", "user.email=o@x", "commit", "-q", "-m", "upstream")
    git(other, "push", "-q", "origin", "main")

    prepared = await gitflow.prepare_branch(tools(), checkout, "acc/add-the-feature-file")
    assert prepared == gitflow.Prepared("acc/add-the-feature-file", None)
    assert git(checkout, "rev-parse", "--abbrev-ref", "HEAD").strip() == "acc/add-the-feature-file"
    assert git(checkout, "rev-parse", "HEAD") == git(other, "rev-parse", "HEAD")
    assert not (checkout / "old.txt").exists() and (checkout / "new.txt").exists()


async def test_dirty_tree_is_a_warning_and_nothing_moves(tmp_path: Path) -> None:
    _bare, checkout = make_origin(tmp_path)
    (checkout / "README.md").write_text("local edit\n")
    prepared = await gitflow.prepare_branch(tools(), checkout, "acc/x")
    assert prepared.branch is None
    assert prepared.warning is not None and "not clean" in prepared.warning and "skipped" in prepared.warning
    assert git(checkout, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"
    assert (checkout / "README.md").read_text() == "local edit\n"


async def test_no_remote_is_a_warning(tmp_path: Path) -> None:
    repo = tmp_path / "solo"
    repo.mkdir()
    git(repo, "init", "-q", "--initial-branch=main")
    prepared = await gitflow.prepare_branch(tools(), repo, "acc/x")
    assert prepared.branch is None and prepared.warning is not None
    assert "no git remote 'origin'" in prepared.warning


async def test_fetch_failure_is_a_warning(tmp_path: Path) -> None:
    bare, checkout = make_origin(tmp_path)
    bare.rename(tmp_path / "gone.git")
    prepared = await gitflow.prepare_branch(tools(), checkout, "acc/x")
    assert prepared.branch is None and prepared.warning is not None
    assert "git fetch origin failed" in prepared.warning


async def test_not_a_checkout(tmp_path: Path) -> None:
    assert not await gitflow.is_checkout(tools(), tmp_path)
    _bare, checkout = make_origin(tmp_path / "g")
    assert await gitflow.is_checkout(tools(), checkout)


async def _branch_with_commit(tmp_path: Path) -> tuple[Path, Path]:
    bare, checkout = make_origin(tmp_path)
    assert (await gitflow.prepare_branch(tools(), checkout, "acc/add-the-feature-file")).branch
    (checkout / "feature.txt").write_text("feature\n")
    git(checkout, "add", "feature.txt")
    git(checkout, "commit", "-q", "-m", "add feature")
    return bare, checkout


async def test_deliver_pushes_and_opens_the_pr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gh = install_gh(monkeypatch, tmp_path)
    bare, checkout = await _branch_with_commit(tmp_path)
    body = tmp_path / "state" / "tmp" / "pr.md"
    pr = await gitflow.deliver(tools(), checkout, "acc/add-the-feature-file", info(reviewer="alice"), body)
    assert pr == gitflow.PullRequest("https://github.com/acme/widgets/pull/1", None)
    # The branch reached the remote with its commit.
    assert git(bare, "rev-parse", "acc/add-the-feature-file") == git(checkout, "rev-parse", "HEAD")
    calls = gh.calls()
    assert [c["argv"] for c in calls[:2]] == [
        ["label", "create", "agent:acc", "--force"],
        ["label", "create", "priority:urgent", "--force"],
    ]
    argv = calls[2]["argv"]
    assert argv == [
        "pr", "create", "--base", "main", "--head", "acc/add-the-feature-file",
        "--title=Add the feature file", "--body-file", argv[8],
        "--label", "agent:acc", "--label", "priority:urgent", "--reviewer=alice",
    ]  # fmt: skip
    assert all(c["prompt_disabled"] == "1" and c["cwd"] == str(checkout) for c in calls)
    text = calls[2]["body"]
    for needle in ("`t-1`", "`acc-agent`", "urgent", "http://hub:4000/api/tasks/t-1", "Add the feature file"):
        assert needle in text
    assert "feature.txt | 1 +" in text  # git diff --stat against origin/main
    assert not body.exists()  # the body file is removed


async def test_no_reviewer_flag_when_reviewer_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gh = install_gh(monkeypatch, tmp_path)
    _bare, checkout = await _branch_with_commit(tmp_path)
    await gitflow.deliver(
        tools(), checkout, "acc/add-the-feature-file", info(reviewer=None), tmp_path / "b.md"
    )
    assert not any(a.startswith("--reviewer") for a in gh.argvs()[-1])


async def test_no_commits_means_no_pr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gh = install_gh(monkeypatch, tmp_path)
    bare, checkout = make_origin(tmp_path)
    assert (await gitflow.prepare_branch(tools(), checkout, "acc/x")).branch
    pr = await gitflow.deliver(tools(), checkout, "acc/x", info(), tmp_path / "b.md")
    assert pr.url is None and pr.warning is not None and "no commits ahead of origin/main" in pr.warning
    assert gh.calls() == []
    with pytest.raises(subprocess.CalledProcessError):
        git(bare, "rev-parse", "--verify", "acc/x")


async def test_push_refused_by_the_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gh = install_gh(monkeypatch, tmp_path)
    bare, checkout = await _branch_with_commit(tmp_path)
    refuse_pushes(bare)
    pr = await gitflow.deliver(tools(), checkout, "acc/add-the-feature-file", info(), tmp_path / "b.md")
    assert pr.url is None and pr.warning is not None
    assert (
        "git push of acc/add-the-feature-file failed" in pr.warning and "push refused by policy" in pr.warning
    )
    assert gh.calls() == []


async def test_pr_refused_by_github(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_gh(monkeypatch, tmp_path)
    monkeypatch.setenv("GH_STANDIN_FAIL", "pr")
    _bare, checkout = await _branch_with_commit(tmp_path)
    pr = await gitflow.deliver(tools(), checkout, "acc/add-the-feature-file", info(), tmp_path / "b.md")
    assert pr.url is None and pr.warning is not None
    assert "gh pr create failed" in pr.warning and "GraphQL" in pr.warning


async def test_missing_gh_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _bare, checkout = await _branch_with_commit(tmp_path)
    real_git = shutil.which("git")
    assert real_git is not None
    empty = tmp_path / "nobin"
    empty.mkdir()
    (empty / "git").symlink_to(real_git)
    monkeypatch.setenv("PATH", str(empty))
    pr = await gitflow.deliver(tools(), checkout, "acc/add-the-feature-file", info(), tmp_path / "b.md")
    # Found from outside: the warning named only the label step.
    assert pr.warning == "gh not found on PATH: acc/add-the-feature-file pushed, no pull request opened"


def test_gh_log_reads_nothing_before_any_call(tmp_path: Path) -> None:
    assert GhLog(tmp_path / "none.jsonl").calls() == []
