"""`search_files`' body, run as a child process (`python -I searcher.py`).

A regex from the model can backtrack for ever, and Python's `re` cannot be
interrupted; in a thread it would outlive its task. As a child of
`procs.run_child` it has a time limit and dies with the task. Standard
library only, so the child starts without importing the sidecar.

stdin: `{"root", "path", "pattern", "ignore_case", "reserved"}` (real paths,
already checked inside the workspace); stdout: `{"matches", "truncated",
"files_skipped"}`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

MAX_FILE_BYTES = 1024 * 1024  # read_file, search_files, write_file
MAX_MATCHES = 200
MAX_LINE_CHARS = 500
# Directories a search does not enter (a listing shows them, without their contents).
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "node_modules",
        "__pycache__",
        ".venv",
        "venv",
        ".tox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        "dist",
        "build",
        "target",
        ".next",
        ".gradle",
    }
)
_SNIFF = 8192


def is_binary(head: bytes) -> bool:
    return b"\0" in head[:_SNIFF]


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _files(path: Path, reserved: list[Path]) -> list[Path]:
    if path.is_file():
        return [path]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in SKIP_DIRS and not any(_inside(Path(dirpath) / d, r) for r in reserved)
        )
        out.extend(Path(dirpath) / name for name in sorted(filenames))
    return out


def search(root: Path, path: Path, regex: re.Pattern[str], reserved: list[Path]) -> dict[str, Any]:
    """`path:line: text` for each matching line, skipping binaries, big files and links out."""
    matches: list[str] = []
    skipped = 0
    for file in _files(path, reserved):
        try:
            real = Path(os.path.realpath(file))
            if not _inside(real, root) or any(_inside(real, r) for r in reserved):
                skipped += 1  # a symlink out of the workspace (or into the state dir)
                continue
            if not real.is_file() or real.stat().st_size > MAX_FILE_BYTES:
                skipped += 1
                continue
            data = real.read_bytes()
        except OSError:
            skipped += 1
            continue
        if is_binary(data):
            skipped += 1
            continue
        rel = os.path.relpath(file, root)
        for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            if regex.search(line):
                if len(line) > MAX_LINE_CHARS:
                    line = line[:MAX_LINE_CHARS] + "…"
                matches.append(f"{rel}:{n}: {line}")
                if len(matches) >= MAX_MATCHES:
                    return {"matches": matches, "truncated": True, "files_skipped": skipped}
    return {"matches": matches, "truncated": False, "files_skipped": skipped}


def main() -> None:
    req = json.loads(sys.stdin.read())
    regex = re.compile(req["pattern"], re.IGNORECASE if req.get("ignore_case") else 0)
    out = search(Path(req["root"]), Path(req["path"]), regex, [Path(p) for p in req.get("reserved", [])])
    sys.stdout.write(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
