"""Real git repositories for the delivery tests: a bare `origin` in tmp_path and its clones.

Built with the real `git` (synchronously, in fixtures, before the event loop
runs). `install_gh` puts the `gh` stand-in (tests/fakes/gh_standin.py) first
on PATH.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

GH_STANDIN = Path(__file__).resolve().parent / "fakes" / "gh_standin.py"
IDENTITY = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **IDENTITY}
    done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return done.stdout


def make_origin(root: Path) -> tuple[Path, Path]:
    """A bare `origin.git` with one commit on main, and a clone of it (`checkout`)."""
    root.mkdir(parents=True, exist_ok=True)
    bare = root / "origin.git"
    git(root, "init", "-q", "--bare", "--initial-branch=main", str(bare))
    checkout = root / "checkout"
    git(root, "clone", "-q", str(bare), str(checkout))
    configure(checkout)
    git(checkout, "checkout", "-q", "-b", "main")
    (checkout / "README.md").write_text("# widgets\n")
    git(checkout, "add", "README.md")
    git(checkout, "commit", "-q", "-m", "init")
    git(checkout, "push", "-q", "-u", "origin", "main")
    return bare, checkout


def configure(checkout: Path) -> None:
    for key, value in (("user.name", "Test"), ("user.email", "test@example.com")):
        git(checkout, "config", key, value)


def refuse_pushes(bare: Path) -> None:
    """Make the remote refuse every push (a pre-receive hook that exits 1)."""
    hook = bare / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'push refused by policy' >&2\nexit 1\n")
    hook.chmod(0o755)


def commit_command(name: str = "feature.txt", text: str = "new feature") -> str:
    """A shell command that commits one file with the test identity (the task's work)."""
    ident = " ".join(f"{k}={shlex.quote(v)}" for k, v in IDENTITY.items())
    return (
        f"printf %s {shlex.quote(text)} > {shlex.quote(name)} && git add {shlex.quote(name)} && "
        f"env {ident} git commit -q -m {shlex.quote('add ' + name)}"
    )


class GhLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def calls(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def argvs(self) -> list[list[str]]:
        return [c["argv"] for c in self.calls()]


def install_gh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> GhLog:
    """Put the `gh` stand-in first on PATH; returns its call log."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    gh = bindir / "gh"
    gh.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(GH_STANDIN))} "$@"\n')
    gh.chmod(0o755)
    log = tmp_path / "gh-calls.jsonl"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("GH_STANDIN_LOG", str(log))
    return GhLog(log)
