"""What the tools may touch: paths inside one directory, and a small environment.

Path containment is checked on real paths: a path that leaves the working
directory lexically is `PATH_OUTSIDE_WORKSPACE`; one that stays inside but
whose existing part resolves (through a symlink) outside is
`SYMLINK_OUTSIDE_WORKSPACE`. Either way nothing is read or written.

`run_command` is not contained by these checks: a program can open any path
the sidecar's user can. Its fences are the working directory as cwd, an
allow-listed environment (never the hub token or SIDECAR_* variables), a time
limit and the process helper's kill of its whole tree; and, where a `bwrap`
binary exists and the config asks for it, a bubblewrap jail (read-only root,
writable workspace, private /tmp, no network). See docs/agentic.md.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from .. import procs

# The variables a command gets from the sidecar's own environment, before config additions.
BASE_ENV_PASS = ("PATH", "HOME", "LANG")


class ToolError(Exception):
    """A refused or failed tool call: `code` for the model (and tests), `message` for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Workspace:
    """The directory the tools work in; every path is resolved inside it.

    `reserved` paths inside it (the sidecar's state dir, when it lies in the
    repository) are refused with PATH_RESERVED and left out of walks.
    """

    def __init__(self, root: Path, reserved: Iterable[Path] = ()) -> None:
        self.root = Path(os.path.realpath(root))
        real = (Path(os.path.realpath(p)) for p in reserved)
        self.reserved = tuple(p for p in real if p != self.root and _inside(p, self.root))

    def is_reserved(self, real: Path) -> bool:
        return any(_inside(real, p) for p in self.reserved)

    def relative(self, path: Path) -> str:
        """`path` as shown to the model: relative to the root, "." for the root."""
        rel = os.path.relpath(path, self.root)
        return "." if rel == "." else rel

    def resolve(self, raw: str) -> Path:
        """The real path for `raw` (relative to the root, or absolute inside it).

        Raises ToolError PATH_OUTSIDE_WORKSPACE when the path leaves the root
        by its text (`..`, an absolute path elsewhere), SYMLINK_OUTSIDE_WORKSPACE
        when a symlink on the way (or the file itself) leads outside. A path
        that does not exist yet resolves through its existing parents.
        """
        if not isinstance(raw, str) or not raw.strip() or "\0" in raw:
            raise ToolError("INVALID_PATH", f"not a usable path: {raw!r}")
        given = Path(raw.strip())
        joined = given if given.is_absolute() else self.root / given
        lexical = Path(os.path.normpath(joined))
        if not _inside(lexical, self.root):
            raise ToolError("PATH_OUTSIDE_WORKSPACE", f"{raw!r} is outside the workspace")
        real = Path(os.path.realpath(lexical))
        if not _inside(real, self.root):
            raise ToolError("SYMLINK_OUTSIDE_WORKSPACE", f"{raw!r} leads outside the workspace by a symlink")
        if self.is_reserved(real):
            raise ToolError("PATH_RESERVED", f"{raw!r} is the sidecar's own state directory")
        return real


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def command_env(
    base: Mapping[str, str],
    marker: str,
    *,
    passed: Iterable[str] = (),
    added: Mapping[str, str] | None = None,
    secrets: Iterable[str] = (),
) -> dict[str, str]:
    """An allow-listed environment for `run_command`.

    Only PATH, HOME, LANG and the `passed` names are taken from `base`, then
    `added` is set; `procs.child_env` then drops every SIDECAR_* variable and
    anything holding a secret (the hub token), whatever the config said, and
    adds the task's marker.
    """
    names = [*BASE_ENV_PASS, *passed]
    env = {name: base[name] for name in names if name in base}
    env.update(added or {})
    env.setdefault("PATH", os.defpath)
    return procs.child_env(env, marker, secrets=secrets)


def find_bwrap() -> str | None:
    """The bubblewrap binary, if the host has one."""
    return shutil.which("bwrap")


def bwrap_argv(bwrap: str, workdir: Path, argv: list[str], hide: Iterable[Path] = ()) -> list[str]:
    """`argv` inside bubblewrap: read-only /, writable `workdir`, fresh /tmp, /dev
    and /proc, no network, own PID namespace, dies with the sidecar.

    Each `hide` path (the state dir) is covered: a directory by an empty tmpfs,
    a file by /dev/null. One that holds the workspace is covered before the
    workspace is bound, so the workspace stays visible inside it.
    """
    wd = str(workdir)
    before: list[str] = []
    after: list[str] = []
    for path in hide:
        if not path.exists():
            continue
        cover = ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)]
        holds_workdir = _inside(Path(os.path.realpath(workdir)), Path(os.path.realpath(path)))
        (before if holds_workdir else after).extend(cover)
    return [
        bwrap,
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        *before,
        "--bind", wd, wd,
        *after,
        "--chdir", wd,
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--",
        *argv,
    ]  # fmt: skip
