"""Which of the binaries a task may need are missing here.

A missing `claude`, `git` or `gh` fails (or weakens) a task only when one
arrives; a warning at start-up says so while someone is still watching, and
`sidecar check` shows the same as rows.
"""

from __future__ import annotations

from .config import Config
from .executors.claude import resolve_binary


def missing_tools(cfg: Config) -> list[tuple[str, str]]:
    """(tool, what goes wrong without it) for each one PATH lacks. Blocking
    (a few `stat`s): call it from a thread."""
    needed = [(cfg.claude.binary, "Claude tasks will fail")]
    if cfg.repo_dir:
        needed.append(("git", "the branch workflow is skipped and git_clean checks fail"))
        needed.append(("gh", "task branches are pushed but no pull request is opened"))
    return [(tool, effect) for tool, effect in needed if resolve_binary(tool, None) is None]
