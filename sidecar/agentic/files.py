"""The file tools' blocking bodies (run in a worker thread), with their limits.

Paths given here were already resolved inside the workspace. Walks never
follow symlinks, and a symlinked file whose real path is outside is skipped,
so a search or listing cannot wander out of the workspace either.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .sandbox import ToolError, Workspace

MAX_FILE_BYTES = 1024 * 1024  # read_file, search_files, write_file
MAX_ENTRIES = 500  # list_directory
MAX_DEPTH = 5  # list_directory
MAX_MATCHES = 200  # search_files
MAX_LINE_CHARS = 500  # search_files
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


def _is_binary(head: bytes) -> bool:
    return b"\0" in head[:_SNIFF]


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
    if _is_binary(data):
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


def _files(ws: Workspace, path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        dirnames[:] = sorted(
            d for d in dirnames if d not in SKIP_DIRS and not ws.is_reserved(Path(dirpath) / d)
        )
        for name in sorted(filenames):
            out.append(Path(dirpath) / name)
    return out


def search_tree(ws: Workspace, path: Path, regex: re.Pattern[str]) -> dict[str, object]:
    """`path:line: text` for each matching line, skipping binaries and big files."""
    if not path.exists():
        raise ToolError("FILE_NOT_FOUND", "no such file or directory")
    matches: list[str] = []
    skipped = 0
    for file in _files(ws, path):
        try:
            real = Path(os.path.realpath(file))
            if real != ws.root and ws.root not in real.parents:
                skipped += 1  # a symlink out of the workspace
                continue
            if not real.is_file() or real.stat().st_size > MAX_FILE_BYTES:
                skipped += 1
                continue
            data = real.read_bytes()
        except OSError:
            skipped += 1
            continue
        if _is_binary(data):
            skipped += 1
            continue
        text = data.decode("utf-8", "replace")
        for n, line in enumerate(text.splitlines(), 1):
            if regex.search(line):
                if len(line) > MAX_LINE_CHARS:
                    line = line[:MAX_LINE_CHARS] + "…"
                matches.append(f"{ws.relative(file)}:{n}: {line}")
                if len(matches) >= MAX_MATCHES:
                    return {"matches": matches, "truncated": True, "files_skipped": skipped}
    return {"matches": matches, "truncated": False, "files_skipped": skipped}
