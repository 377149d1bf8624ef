"""The file tools' blocking bodies (run in a worker thread), with their limits
(search runs in a child: `searcher.py`).

Paths given here were already resolved inside the workspace. Walks never
follow symlinks, and a symlinked file whose real path is outside is skipped,
so a search or listing cannot wander out of the workspace either.
"""

from __future__ import annotations

import os
from pathlib import Path

from .sandbox import ToolError, Workspace
from .searcher import MAX_FILE_BYTES, SKIP_DIRS, is_binary

MAX_ENTRIES = 500  # list_directory
MAX_DEPTH = 5  # list_directory


def read_text(path: Path, start: int | None, end: int | None) -> str:
    """The file's text, or lines `start`..`end` of it (1-based, inclusive)."""
    if path.is_dir():
        raise ToolError("IS_A_DIRECTORY", "is a directory: use list_directory")
    if not path.exists():
        raise ToolError("FILE_NOT_FOUND", "no such file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ToolError("FILE_TOO_LARGE", f"{size} bytes; read_file reads at most {MAX_FILE_BYTES}")
    data = path.read_bytes()
    if is_binary(data):
        raise ToolError("BINARY_FILE", "binary file, not read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError("BINARY_FILE", "not UTF-8 text, not read") from None
    if start is None and end is None:
        return text
    lines = text.splitlines(keepends=True)
    first = max(1, start or 1)
    last = len(lines) if end is None else end
    if last < first:
        raise ToolError("INVALID_ARGUMENTS", f"end_line {last} is before start_line {first}")
    return "".join(lines[first - 1 : last])


def write_text(path: Path, content: str) -> int:
    """Write `content` (UTF-8) to `path`, creating its parents; returns the bytes written."""
    data = content.encode("utf-8", "surrogatepass")
    if len(data) > MAX_FILE_BYTES:
        raise ToolError("CONTENT_TOO_LARGE", f"{len(data)} bytes; write_file writes at most {MAX_FILE_BYTES}")
    if path.is_dir():
        raise ToolError("IS_A_DIRECTORY", "is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def list_tree(ws: Workspace, path: Path, depth: int) -> dict[str, object]:
    """Entries under `path`, `depth` levels deep (1..5), at most MAX_ENTRIES."""
    if not path.is_dir():
        raise ToolError("NOT_A_DIRECTORY", "not a directory" if path.exists() else "no such directory")
    depth = max(1, min(MAX_DEPTH, depth))
    entries: list[str] = []
    truncated = False

    def walk(d: Path, level: int) -> None:
        nonlocal truncated
        try:
            items = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return
        for item in items:
            if len(entries) >= MAX_ENTRIES:
                truncated = True
                return
            rel = ws.relative(Path(item.path))
            if ws.is_reserved(Path(item.path)):
                continue
            if item.is_symlink():
                entries.append(rel + "@")
            elif item.is_dir(follow_symlinks=False):
                entries.append(rel + "/")
                if level < depth and item.name not in SKIP_DIRS:
                    walk(Path(item.path), level + 1)
            else:
                entries.append(rel)

    walk(path, 1)
    return {"entries": entries, "truncated": truncated}
