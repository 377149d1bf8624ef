"""The five tools the model may call, their schemas, and the result envelope.

Every call answers `{success, tool, output, error: {code, message} | null}`.
File tools resolve every path through `Workspace` first; `run_command` goes
through `procs.run_child` (own process group, the task's marker, SIGTERM then
SIGKILL, reaped) with an allow-listed environment and a time limit.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from .. import procs
from ..log import get_logger
from ..output import OutputCapture
from . import searcher
from .files import list_tree, read_text, write_text
from .parse import ArgumentError, ToolCall, coerce_arguments
from .sandbox import ToolError, Workspace, bwrap_argv

log = get_logger(__name__)

COMMAND_OUTPUT_CAP = 32 * 1024  # bytes of a command's output the model gets back (head + tail)
# How long a command's pipes are read after it exited or was killed: a background
# process still holding them (`sleep 99 &`) must not hold up the turn or a cancel.
COMMAND_DRAIN_S = 0.25
SEARCHER = searcher.__file__  # run as a script: `python -I searcher.py`
SEARCH_OUTPUT_CAP = 4 * 1024 * 1024


def _fn(name: str, description: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": props, "required": required},
        },
    }


def _p(kind: str, description: str) -> dict[str, str]:
    return {"type": kind, "description": description}


TOOL_SCHEMAS: list[dict[str, Any]] = [
    _fn(
        "read_file",
        "Read a text file of the workspace (at most 1 MiB), optionally a range of lines.",
        {
            "path": _p("string", "Path relative to the workspace root."),
            "start_line": _p("integer", "First line to return, from 1."),
            "end_line": _p("integer", "Last line to return (inclusive)."),
        },
        ["path"],
    ),
    _fn(
        "write_file",
        "Write a text file in the workspace, replacing it; parent directories are created.",
        {
            "path": _p("string", "Path relative to the workspace root."),
            "content": _p("string", "The whole new content of the file."),
        },
        ["path", "content"],
    ),
    _fn(
        "list_directory",
        "List a directory of the workspace (directories end with '/').",
        {
            "path": _p("string", "Directory relative to the workspace root (default '.')."),
            "depth": _p("integer", "How many levels deep, 1 to 5 (default 1)."),
        },
        [],
    ),
    _fn(
        "search_files",
        "Search the workspace's text files for a regular expression; answers path:line: text.",
        {
            "pattern": _p("string", "A Python regular expression."),
            "path": _p("string", "Directory or file to search (default '.')."),
            "ignore_case": _p("boolean", "Match without regard to case."),
        },
        ["pattern"],
    ),
    _fn(
        "run_command",
        "Run a program in the workspace and get its exit code and output. The command is "
        "split into words like a shell would, but no shell runs it: for pipes or '&&' run "
        "sh -c '…' explicitly.",
        {
            "command": _p("string", "The command line, e.g. 'python -m pytest -q'."),
            "timeout_s": _p("integer", "Time limit in seconds (default 30)."),
        },
        ["command"],
    ),
]
SCHEMAS_BY_NAME: dict[str, dict[str, Any]] = {
    s["function"]["name"]: s["function"]["parameters"] for s in TOOL_SCHEMAS
}
WRITE_TOOLS = frozenset({"write_file"})


@attrs.frozen
class ToolContext:
    """What the tools need of the task: where, with which marker, until when."""

    workspace: Workspace
    marker: str
    deadline: float  # Trio time the task must end by (math.inf: none)
    env: dict[str, str]
    command_timeout_s: float = 30.0
    grace_s: float = 5.0
    bwrap: str | None = None  # path of the bwrap binary when commands run jailed
    hidden: tuple[Path, ...] = ()  # paths bwrap covers (the state dir)


@attrs.frozen
class ToolResult:
    tool: str
    success: bool
    output: Any = None
    code: str | None = None
    message: str | None = None

    def envelope(self) -> dict[str, Any]:
        error = None if self.success else {"code": self.code, "message": self.message}
        return {"success": self.success, "tool": self.tool, "output": self.output, "error": error}

    def summary(self, limit: int = 100) -> str:
        if self.success:
            text = "ok: " + _short(self.output)
        else:
            text = f"error {self.code}: {self.message}"
        return _clip(text, limit)


def _short(output: Any) -> str:
    if isinstance(output, dict) and "exit_code" in output:
        return f"exit code {output['exit_code']}"
    if isinstance(output, str):
        return output.replace("\n", " ")
    return json.dumps(output, ensure_ascii=False, default=str)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _long(value: Any) -> bool:
    return isinstance(value, str) and len(value) > 80


def args_summary(call: ToolCall, limit: int = 200) -> str:
    """The call's arguments, short: long strings (a file's content) give their length."""
    shown = {k: (f"<{len(v)} chars>" if _long(v) else v) for k, v in call.arguments.items()}
    return _clip(json.dumps(shown, ensure_ascii=False, default=str), limit)


async def run_tool(ctx: ToolContext, call: ToolCall) -> ToolResult:
    """Run one call; every refusal or failure becomes an envelope, never an exception.

    trio.Cancelled propagates (a cancelled task stops at once).
    """
    impl = _TOOLS.get(call.name)
    if impl is None:
        return ToolResult(call.name, False, None, "UNKNOWN_TOOL", f"no tool named {call.name!r}; known: "
                          + ", ".join(_TOOLS))  # fmt: skip
    try:
        args = coerce_arguments(SCHEMAS_BY_NAME[call.name], call.arguments)
        output = await impl(ctx, args)
    except ArgumentError as exc:
        return ToolResult(call.name, False, None, "INVALID_ARGUMENTS", str(exc))
    except ToolError as exc:
        return ToolResult(call.name, False, None, exc.code, exc.message)
    except OSError as exc:
        return ToolResult(call.name, False, None, "IO_ERROR", f"{exc.strerror or exc}")
    except Exception as exc:
        # A bug of ours, or input nobody foresaw: the model hears of it, the task goes on.
        log.error("agentic_tool_crashed", tool=call.name, exc_info=True)
        return ToolResult(call.name, False, None, "TOOL_FAILED", f"{type(exc).__name__}: {exc}")
    return ToolResult(call.name, True, output)


async def _read_file(ctx: ToolContext, args: dict[str, Any]) -> Any:
    path = ctx.workspace.resolve(args["path"])
    start, end = args.get("start_line"), args.get("end_line")
    return await trio.to_thread.run_sync(read_text, path, start, end)


async def _write_file(ctx: ToolContext, args: dict[str, Any]) -> Any:
    path = ctx.workspace.resolve(args["path"])
    n = await trio.to_thread.run_sync(write_text, path, args["content"])
    return f"wrote {n} bytes to {ctx.workspace.relative(path)}"


async def _list_directory(ctx: ToolContext, args: dict[str, Any]) -> Any:
    path = ctx.workspace.resolve(args.get("path") or ".")
    depth = args.get("depth", 1)
    return await trio.to_thread.run_sync(list_tree, ctx.workspace, path, depth, abandon_on_cancel=True)


async def _search_files(ctx: ToolContext, args: dict[str, Any]) -> Any:
    path = ctx.workspace.resolve(args.get("path") or ".")
    try:
        re.compile(args["pattern"], re.IGNORECASE if args.get("ignore_case") else 0)
    except re.error as exc:
        raise ToolError("INVALID_REGEX", f"{args['pattern']!r}: {exc}") from None
    if not await trio.to_thread.run_sync(path.exists):
        raise ToolError("FILE_NOT_FOUND", "no such file or directory")
    limit = _time_limit(ctx, None)
    request = {
        "root": str(ctx.workspace.root),
        "path": str(path),
        "pattern": args["pattern"],
        "ignore_case": bool(args.get("ignore_case")),
        "reserved": [str(p) for p in ctx.workspace.reserved],
    }
    got = await procs.capture(
        [sys.executable, "-I", SEARCHER],
        cwd=ctx.workspace.root,
        env=ctx.env,
        marker=ctx.marker,
        timeout_s=limit,
        cap_bytes=SEARCH_OUTPUT_CAP,
        stdin=json.dumps(request).encode(),
        grace_s=ctx.grace_s,
    )
    if got.timed_out:
        raise ToolError(
            "SEARCH_TIMEOUT", f"the search took longer than {limit:g} s (a regex that backtracks?)"
        )
    try:
        if got.returncode != 0:
            raise ValueError(got.stderr.strip()[-500:] or procs.describe_returncode(got.returncode or 0))
        return json.loads(got.stdout)
    except ValueError as exc:
        raise ToolError("SEARCH_FAILED", str(exc)) from None


def _time_limit(ctx: ToolContext, wanted: Any) -> float:
    """A child's time limit: `wanted` seconds, else the default, never past the task's deadline."""
    left = ctx.deadline - trio.current_time()
    if left <= 0:
        raise ToolError("NO_TIME_LEFT", "the task's time limit is reached")
    return min(float(wanted) if wanted and wanted > 0 else ctx.command_timeout_s, left)


async def _run_command(ctx: ToolContext, args: dict[str, Any]) -> Any:
    try:
        argv = shlex.split(args["command"])
    except ValueError as exc:
        raise ToolError("INVALID_COMMAND", f"cannot split the command: {exc}") from None
    if not argv:
        raise ToolError("INVALID_COMMAND", "empty command")
    limit = _time_limit(ctx, args.get("timeout_s"))
    root = ctx.workspace.root
    if ctx.bwrap is not None:
        argv = bwrap_argv(ctx.bwrap, root, argv, ctx.hidden)
    out = OutputCapture(COMMAND_OUTPUT_CAP, None)

    async def collect(block: str) -> None:
        out.write(block)

    with trio.move_on_after(limit):
        try:
            res = await procs.run_child(
                argv,
                cwd=root,
                env=ctx.env,
                marker=ctx.marker,
                on_stdout=collect,
                on_stderr=collect,
                grace_s=ctx.grace_s,
                drain_grace_s=COMMAND_DRAIN_S,
                batch_lines=True,
            )
        except FileNotFoundError:
            raise ToolError("COMMAND_NOT_FOUND", f"no such program: {argv[0]!r}") from None
        except PermissionError:
            raise ToolError("COMMAND_NOT_FOUND", f"not executable: {argv[0]!r}") from None
        return {"exit_code": res.returncode, "output": out.text(), "truncated": out.truncated}
    raise ToolError("COMMAND_TIMEOUT", f"killed after {limit:g} s; output so far: {_clip(out.text(), 2000)}")


_TOOLS: dict[str, Callable[[ToolContext, dict[str, Any]], Awaitable[Any]]] = {
    "read_file": _read_file,
    "write_file": _write_file,
    "list_directory": _list_directory,
    "search_files": _search_files,
    "run_command": _run_command,
}
