"""Cloning the hub's default repository: argv git, time-limited, no prompts, no odd transports."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

import trio

from .. import procs

# Transports git may use for the hub's URL: not `ext::` (runs a command) nor `fd::`.
ALLOWED_PROTOCOLS = "file:git:http:https:ssh"


def remove_tree(path: Path) -> None:
    """Remove an unfinished clone (blocking: run it in a thread)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


async def clone(url: str, dest: Path, timeout_s: float, secret: str | None = None) -> str | None:
    """`git clone -- URL DEST`; None on success, else why it failed."""
    if not url or url.startswith("-") or "\n" in url or "\0" in url:
        return f"refusing the repository URL {url!r}"
    marker = "sidecar-fleet-" + secrets.token_hex(6)
    env = procs.child_env(os.environ, marker, secrets=[secret] if secret else [])
    env["GIT_TERMINAL_PROMPT"] = "0"  # a missing credential fails at once instead of waiting on a prompt
    env["GIT_ALLOW_PROTOCOL"] = ALLOWED_PROTOCOLS
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    tail: list[str] = []

    async def keep(line: str) -> None:
        tail.append(line)
        del tail[:-20]

    argv = ["git", "clone", "--quiet", "--", url, str(dest)]
    try:
        with trio.move_on_after(timeout_s) as scope:
            res = await procs.run_child(
                argv, cwd=dest.parent, env=env, marker=marker, on_stdout=keep, on_stderr=keep
            )
    except OSError as exc:
        return f"cannot run git: {exc}"
    if scope.cancelled_caught:
        return f"timed out after {timeout_s:g} s"
    if res.returncode != 0:
        said = " / ".join(x.strip() for x in tail if x.strip())[:500]
        return procs.describe_returncode(res.returncode) + (f": {said}" if said else "")
    return None
