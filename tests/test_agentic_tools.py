"""The agentic tools and their sandbox: containment (symlinks included), limits,
coercion, and `run_command`'s environment, time limit and cancellation."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio

from sidecar import procs
from sidecar.agentic.files import MAX_ENTRIES
from sidecar.agentic.parse import ArgumentError, ToolCall, coerce_arguments, parse_calls
from sidecar.agentic.sandbox import Workspace, bwrap_argv, command_env, find_bwrap
from sidecar.agentic.searcher import MAX_FILE_BYTES
from sidecar.agentic.tools import SCHEMAS_BY_NAME, ToolContext, ToolResult, run_tool
from tests.fakes.proc_helpers import wait_marked

TOKEN = "hub-token-0123456789"


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "inside.txt").write_text("inside\n")
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "secret.txt").write_text("top secret\n")
    return out


def ctx_for(
    root: Path, *, deadline: float = math.inf, env: dict[str, str] | None = None, **kw: Any
) -> ToolContext:
    marker = procs.task_marker("agent-t", f"tools-{root}")
    return ToolContext(
        workspace=Workspace(root),
        marker=marker,
        deadline=deadline,
        env=env if env is not None else command_env(os.environ, marker, secrets=[TOKEN]),
        grace_s=1.0,
        **kw,
    )


async def tool(ctx: ToolContext, name: str, **args: Any) -> ToolResult:
    return await run_tool(ctx, ToolCall(name, args))


# -- containment --------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["../outside/secret.txt", "sub/../../outside/secret.txt", "/etc/passwd", "/"],
)
async def test_paths_leaving_the_workspace_are_refused(ws: Path, outside: Path, path: str) -> None:
    ctx = ctx_for(ws)
    for name, args in [
        ("read_file", {"path": path}),
        ("write_file", {"path": path, "content": "pwned"}),
        ("list_directory", {"path": path}),
        ("search_files", {"pattern": "secret", "path": path}),
    ]:
        r = await tool(ctx, name, **args)
        assert (r.success, r.code) == (False, "PATH_OUTSIDE_WORKSPACE"), (name, r)
        assert r.envelope()["error"]["code"] == "PATH_OUTSIDE_WORKSPACE"
    assert (outside / "secret.txt").read_text() == "top secret\n"
    assert not (ws.parent / "secret.txt").exists()


async def test_symlinks_out_of_the_workspace_are_refused(ws: Path, outside: Path) -> None:
    (ws / "dirlink").symlink_to(outside)
    (ws / "filelink").symlink_to(outside / "secret.txt")
    (ws / "dangling").symlink_to(outside / "new.txt")
    ctx = ctx_for(ws)
    cases = [
        ("read_file", {"path": "filelink"}),
        ("read_file", {"path": "dirlink/secret.txt"}),
        ("write_file", {"path": "filelink", "content": "pwned"}),
        ("write_file", {"path": "dirlink/secret.txt", "content": "pwned"}),
        ("write_file", {"path": "dirlink/sub/new.txt", "content": "pwned"}),  # parents: no mkdir outside
        ("write_file", {"path": "dangling", "content": "pwned"}),
        ("list_directory", {"path": "dirlink"}),
        ("search_files", {"pattern": "secret", "path": "dirlink"}),
    ]
    for name, args in cases:
        r = await tool(ctx, name, **args)
        assert (r.success, r.code) == (False, "SYMLINK_OUTSIDE_WORKSPACE"), (name, args, r)
    assert (outside / "secret.txt").read_text() == "top secret\n"
    assert os.listdir(outside) == ["secret.txt"]


async def test_walks_do_not_follow_symlinks_out(ws: Path, outside: Path) -> None:
    (ws / "dirlink").symlink_to(outside)
    (ws / "filelink").symlink_to(outside / "secret.txt")
    (ws / "ok-link").symlink_to(ws / "inside.txt")
    ctx = ctx_for(ws)
    found = await tool(ctx, "search_files", pattern="secret|inside")
    assert found.success
    assert found.output["matches"] == ["inside.txt:1: inside", "ok-link:1: inside"]
    listed = await tool(ctx, "list_directory", depth=3)
    assert listed.output["entries"] == ["dirlink@", "filelink@", "inside.txt", "ok-link@"]


async def test_symlink_inside_the_workspace_is_fine(ws: Path) -> None:
    (ws / "sub").mkdir()
    (ws / "sub" / "real.txt").write_text("real\n")
    (ws / "alias").symlink_to(ws / "sub")
    r = await tool(ctx_for(ws), "read_file", path="alias/real.txt")
    assert r.success and r.output == "real\n"
    w = await tool(ctx_for(ws), "write_file", path=str(ws / "abs.txt"), content="absolute inside")
    assert w.success and (ws / "abs.txt").read_text() == "absolute inside"


# -- limits -------------------------------------------------------------------------


async def test_read_file_limits_binary_and_line_ranges(ws: Path) -> None:
    ctx = ctx_for(ws)
    (ws / "big.txt").write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    (ws / "blob.bin").write_bytes(b"\x7fELF\x00\x01\x02")
    (ws / "latin1.txt").write_bytes(b"caf\xe9\n")
    (ws / "lines.txt").write_text("".join(f"line {i}\n" for i in range(1, 11)))
    assert (await tool(ctx, "read_file", path="big.txt")).code == "FILE_TOO_LARGE"
    assert (await tool(ctx, "read_file", path="blob.bin")).code == "BINARY_FILE"
    assert (await tool(ctx, "read_file", path="latin1.txt")).code == "BINARY_FILE"
    assert (await tool(ctx, "read_file", path="nope.txt")).code == "FILE_NOT_FOUND"
    assert (await tool(ctx, "read_file", path=".")).code == "IS_A_DIRECTORY"
    r = await tool(ctx, "read_file", path="lines.txt", start_line="3", end_line=4)  # "3": coerced
    assert r.output == "line 3\nline 4\n"
    assert (await tool(ctx, "read_file", path="lines.txt", start_line=9)).output == "line 9\nline 10\n"
    assert (
        await tool(ctx, "read_file", path="lines.txt", start_line=5, end_line=2)
    ).code == "INVALID_ARGUMENTS"


async def test_write_file_creates_parents_and_caps_size(ws: Path) -> None:
    ctx = ctx_for(ws)
    r = await tool(ctx, "write_file", path="a/b/c/d.txt", content="deep")
    assert r.success and (ws / "a/b/c/d.txt").read_text() == "deep"
    big = await tool(ctx, "write_file", path="big.txt", content="x" * (MAX_FILE_BYTES + 1))
    assert big.code == "CONTENT_TOO_LARGE" and not (ws / "big.txt").exists()
    assert (await tool(ctx, "write_file", path="a", content="x")).code == "IS_A_DIRECTORY"


async def test_list_directory_caps_entries_and_depth(ws: Path) -> None:
    for i in range(MAX_ENTRIES + 20):
        (ws / f"f{i:04}").touch()
    deep = ws / "d1/d2/d3/d4/d5/d6/d7"
    deep.mkdir(parents=True)
    ctx = ctx_for(ws)
    r = await tool(ctx, "list_directory")
    assert len(r.output["entries"]) == MAX_ENTRIES and r.output["truncated"] is True
    r = await tool(ctx, "list_directory", path="d1", depth=99)
    assert r.output["entries"] == [
        "d1/d2/",
        "d1/d2/d3/",
        "d1/d2/d3/d4/",
        "d1/d2/d3/d4/d5/",
        "d1/d2/d3/d4/d5/d6/",
    ]
    assert (await tool(ctx, "list_directory", path="inside.txt")).code == "NOT_A_DIRECTORY"


async def test_search_skips_build_dirs_binaries_big_files_and_cuts_lines(ws: Path) -> None:
    for d in (".git", "node_modules", "__pycache__", "build"):
        (ws / d).mkdir()
        (ws / d / "x.txt").write_text("needle\n")
    (ws / "bin.dat").write_bytes(b"needle\x00")
    (ws / "big.txt").write_text("needle\n" + "y" * MAX_FILE_BYTES)
    (ws / "long.txt").write_text("needle" + "z" * 1000 + "\nNEEDLE upper\n")
    ctx = ctx_for(ws)
    r = await tool(ctx, "search_files", pattern="needle")
    assert [m[:18] for m in r.output["matches"]] == ["long.txt:1: needle"]
    assert len(r.output["matches"][0]) == len("long.txt:1: ") + 500 + 1
    r = await tool(ctx, "search_files", pattern="needle", ignore_case="true")  # boolean from a string
    assert len(r.output["matches"]) == 2
    assert (await tool(ctx, "search_files", pattern="(")).code == "INVALID_REGEX"


# -- coercion -------------------------------------------------------------------------


def test_coercion_follows_the_schema_only() -> None:
    schema = SCHEMAS_BY_NAME["search_files"]
    assert coerce_arguments(schema, {"pattern": "x", "ignore_case": "FALSE"}) == {
        "pattern": "x",
        "ignore_case": False,
    }
    assert coerce_arguments(schema, {"pattern": "true"}) == {"pattern": "true"}  # a string stays a string
    assert coerce_arguments(SCHEMAS_BY_NAME["read_file"], {"path": "12", "start_line": " 12 "}) == {
        "path": "12",
        "start_line": 12,
    }
    write = SCHEMAS_BY_NAME["write_file"]
    assert coerce_arguments(write, {"path": "p", "content": '{"a": 1}'}) == {
        "path": "p",
        "content": '{"a": 1}',
    }
    for bad in (
        {"path": "p", "content": {"a": 1}},  # an object is not made into text
        {"path": "p"},
        {"path": "p", "content": "", "mode": "w"},
    ):
        with pytest.raises(ArgumentError):
            coerce_arguments(write, bad)
    with pytest.raises(ArgumentError):
        coerce_arguments(SCHEMAS_BY_NAME["read_file"], {"path": "p", "start_line": "3.5"})


def test_parse_layers_in_order() -> None:
    native = [{"function": {"name": "read_file", "arguments": '{"path": "a"}'}}]
    assert parse_calls(native, '{"name": "write_file", "arguments": {}}') == [
        ToolCall("read_file", {"path": "a"}, "native")
    ]
    assert parse_calls([], 'x {"name": "read_file", "arguments": {"path": "}"}} y') == [
        ToolCall("read_file", {"path": "}"}, "json")
    ]
    assert parse_calls(None, '<tool_call>{"name": "read_file", "parameters": {"path": "b"}}</tool_call>') == [
        ToolCall("read_file", {"path": "b"}, "tag")
    ]
    assert parse_calls(None, '<think>{"name": "x", "arguments": {}}</think>no calls {"a": 1}') == []
    assert parse_calls(None, '<think>unclosed {"name": "x", "arguments": {}}') == []


# -- run_command --------------------------------------------------------------------


async def test_run_command_env_is_allow_listed_without_the_token(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDECAR_TOKEN", TOKEN)
    monkeypatch.setenv("SIDECAR_AGENT_ID", "agent-t")
    monkeypatch.setenv("AUTH_HEADER", f"Bearer {TOKEN}")
    monkeypatch.setenv("SOME_OTHER", "not passed")
    monkeypatch.setenv("PASSED_ON", "yes")
    monkeypatch.setenv("LANG", "C.UTF-8")
    marker = procs.task_marker("agent-t", "env")
    env = command_env(
        os.environ,
        marker,
        passed=["PASSED_ON", "AUTH_HEADER", "SIDECAR_TOKEN"],
        added={"EXTRA": "1"},
        secrets=[TOKEN],
    )
    ctx = ctx_for(ws, env=env)
    r = await tool(ctx, "run_command", command="env")
    assert r.success and r.output["exit_code"] == 0
    seen = dict(line.split("=", 1) for line in r.output["output"].splitlines() if "=" in line)
    assert TOKEN not in r.output["output"]
    assert not [k for k in seen if k.startswith("SIDECAR_") and k != procs.MARKER_VAR]
    assert seen[procs.MARKER_VAR] == ctx.marker  # the task's marker, as run_child sets it
    assert (
        seen["PATH"] == os.environ["PATH"]
        and seen["LANG"] == "C.UTF-8"
        and seen["HOME"] == os.environ["HOME"]
    )
    assert seen["PASSED_ON"] == "yes" and seen["EXTRA"] == "1"
    assert "SOME_OTHER" not in seen and "AUTH_HEADER" not in seen


async def test_run_command_runs_in_the_workspace_without_a_shell(ws: Path) -> None:
    ctx = ctx_for(ws)
    r = await tool(ctx, "run_command", command="pwd")
    assert r.output["output"].strip() == str(ctx.workspace.root)
    r = await tool(ctx, "run_command", command="echo a && touch pwned")
    assert r.output["output"].strip() == "a && touch pwned" and not (ws / "pwned").exists()
    r = await tool(ctx, "run_command", command="sh -c 'exit 3'")
    assert r.success and r.output["exit_code"] == 3 and r.summary() == "ok: exit code 3"
    assert (await tool(ctx, "run_command", command="no-such-program-xyz")).code == "COMMAND_NOT_FOUND"
    assert (await tool(ctx, "run_command", command="echo 'unclosed")).code == "INVALID_COMMAND"


async def test_run_command_output_is_capped(ws: Path) -> None:
    r = await tool(ctx_for(ws), "run_command", command="sh -c 'yes 0123456789 | head -c 2000000'")
    assert r.success and r.output["truncated"] is True
    assert len(r.output["output"]) < 40_000 and "bytes omitted" in r.output["output"]


async def test_run_command_time_limit_default_and_task_deadline(
    ws: Path, autojump_clock: trio.abc.Clock
) -> None:
    ctx = ctx_for(ws, command_timeout_s=30.0)
    t0 = trio.current_time()
    r = await tool(ctx, "run_command", command="sleep 1000")
    assert r.code == "COMMAND_TIMEOUT" and "30 s" in (r.message or "")
    assert 30 <= trio.current_time() - t0 < 40
    # Asked for more than the task has left: bounded by the task's deadline.
    ctx = ctx_for(ws, deadline=trio.current_time() + 5, command_timeout_s=30.0)
    r = await tool(ctx, "run_command", command="sleep 1000", timeout_s=600)
    assert r.code == "COMMAND_TIMEOUT" and "5 s" in (r.message or "")
    assert procs.find_marked(ctx.marker) == []
    late = ctx_for(ws, deadline=trio.current_time() - 1)
    assert (await tool(late, "run_command", command="true")).code == "NO_TIME_LEFT"


async def test_cancel_mid_run_command_leaves_no_survivors(ws: Path) -> None:
    """A cancelled task kills the command's whole tree at once: the shell, a
    background child, and one that left the group with setsid."""
    fifo = ws / "started"
    os.mkfifo(fifo)
    ctx = ctx_for(ws)
    script = "sleep 600 & setsid sleep 600 & echo $$ $! > started; wait"
    pids: list[int] = []

    def read_pids() -> None:
        with open(fifo) as f:  # blocks until the command has written
            pids.extend(int(p) for p in f.read().split())

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_tool, ctx, ToolCall("run_command", {"command": f"sh -c '{script}'"}))
            await trio.to_thread.run_sync(read_pids)
            assert pids and all(psutil.pid_exists(p) for p in pids)
            marked = await wait_marked(ctx.marker, pids, at_least=3)
            assert set(pids) <= set(marked) and len(marked) >= 3  # sh, sleep, setsid sleep
            t0 = trio.current_time()
            nursery.cancel_scope.cancel()
    assert trio.current_time() - t0 < 1.0  # SIGTERM ends it at once, not after the grace
    assert procs.find_marked(ctx.marker) == []
    for pid in marked:
        assert not _alive(pid), pid


def _exists(path: str | Path) -> bool:
    return os.path.exists(path)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def test_bwrap_argv_binds_only_the_workspace_writable(tmp_path: Path) -> None:
    argv = bwrap_argv("/usr/bin/bwrap", tmp_path, ["make", "test"])
    assert argv[0] == "/usr/bin/bwrap" and argv[-3:] == ["--", "make", "test"]
    pairs = list(itertools.pairwise(argv))
    assert (
        ("--ro-bind", "/") in pairs
        and ("--bind", str(tmp_path)) in pairs
        and ("--chdir", str(tmp_path)) in pairs
    )
    assert "--unshare-all" in argv and "--die-with-parent" in argv


# -- bubblewrap (where the host has it) ----------------------------------------------

needs_bwrap = pytest.mark.skipif(find_bwrap() is None, reason="no bwrap binary on this host")


@needs_bwrap
async def test_bwrap_jail_contains_writes_tmp_network_and_the_state_dir(
    tmp_path: Path, outside: Path
) -> None:
    state = tmp_path / "state"
    ws = state / "agentic" / "t-1"  # the scratch workspace lives inside the hidden state dir
    ws.mkdir(parents=True)
    (state / "sidecar.db").write_text("private")
    ctx = ctx_for(ws, bwrap=find_bwrap(), hidden=(state,))

    async def sh(script: str) -> dict[str, Any]:
        r = await tool(ctx, "run_command", command=f"sh -c '{script}'")
        assert r.success, r
        out: dict[str, Any] = r.output
        return out

    assert (await sh("pwd; echo made > inside.txt"))["exit_code"] == 0
    assert (ws / "inside.txt").read_text() == "made\n"
    denied = await sh(f"echo pwned > {outside}/secret.txt")  # /tmp is the jail's own
    assert denied["exit_code"] != 0
    assert (outside / "secret.txt").read_text() == "top secret\n"
    # A system directory of the read-only root (the checkout itself may live under
    # /tmp, which the jail replaces with its own).
    probe = Path("/usr") / f"jail-probe-{os.getpid()}.txt"
    denied = await sh(f"echo pwned > {probe}")
    assert denied["exit_code"] != 0 and "Read-only file system" in denied["output"]
    assert not _exists(probe)
    await sh("echo x > /tmp/jailed-tmp-file")
    assert not _exists("/tmp/jailed-tmp-file")
    hidden = await sh(f"cat {state}/sidecar.db")
    assert hidden["exit_code"] != 0 and "private" not in hidden["output"]
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    net = await sh(f'python3 -c "import socket; socket.create_connection((\\"127.0.0.1\\", {port}), 2)"')
    listener.close()
    assert net["exit_code"] != 0 and "ConnectionRefused" in net["output"]


@needs_bwrap
async def test_bwrap_cancel_leaves_no_survivors(ws: Path) -> None:
    fifo = ws / "started"
    os.mkfifo(fifo)
    ctx = ctx_for(ws, bwrap=find_bwrap())
    script = "sleep 600 & echo go > started; wait"

    def wait_started() -> None:
        with open(fifo) as f:
            f.read()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_tool, ctx, ToolCall("run_command", {"command": f"sh -c '{script}'"}))
            await trio.to_thread.run_sync(wait_started)
            marked = await wait_marked(ctx.marker, [], at_least=3)
            assert len(marked) >= 3  # bwrap, its child, sh, sleep
            nursery.cancel_scope.cancel()
    assert procs.find_marked(ctx.marker) == []
    # The PID namespace's init may still be in its exit (reaping the namespace,
    # empty cmdline) for a moment after the sweep: bounded wait for it to go.
    procs_left = [p for p in (_proc(pid) for pid in marked) if p is not None]
    _gone, alive = await trio.to_thread.run_sync(lambda: psutil.wait_procs(procs_left, timeout=5))
    assert not alive, [(p.pid, p.status(), p.cmdline()) for p in alive]


def _proc(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


async def test_a_command_leaving_a_background_process_returns_and_leaves_nothing(ws: Path) -> None:
    ctx = ctx_for(ws)
    with trio.fail_after(5):
        r = await tool(ctx, "run_command", command="sh -c 'sleep 600 & echo started'")
    assert r.success and r.output["output"] == "started\n"
    assert procs.find_marked(ctx.marker) == []


@pytest.mark.parametrize(
    ("ollama", "field"),
    [
        ({"agentic": "sometimes"}, "ollama.agentic"),
        ({"agentic_sandbox": "docker"}, "ollama.agentic_sandbox"),
        ({"agentic_max_iterations": {"huge": 3}}, "ollama.agentic_max_iterations.huge"),
        ({"agentic_max_iterations": {"standard": 0}}, "ollama.agentic_max_iterations.standard"),
        ({"agentic_env": {"SIDECAR_TOKEN": "x"}}, "ollama.agentic_env"),
        ({"agentic_command_timeout_s": 0}, "ollama.agentic_command_timeout_s"),
    ],
)
def test_agentic_config_errors_name_the_field(make_config: Any, ollama: dict[str, Any], field: str) -> None:
    from sidecar.config import ConfigError

    with pytest.raises(ConfigError) as info:
        make_config(ollama=ollama)
    assert info.value.field == field


async def test_a_state_dir_inside_the_workspace_is_off_limits(ws: Path) -> None:
    state = ws / "state"
    (state / "logs").mkdir(parents=True)
    (state / "sidecar.db").write_text("needle private")
    (ws / "code.txt").write_text("needle public\n")
    ctx = ToolContext(
        workspace=Workspace(ws, reserved=[state]),
        marker="m",
        deadline=math.inf,
        env={},
    )
    for name, args in [
        ("read_file", {"path": "state/sidecar.db"}),
        ("write_file", {"path": "state/logs/x.log", "content": "x"}),
        ("list_directory", {"path": "state"}),
        ("search_files", {"pattern": "needle", "path": "state"}),
    ]:
        r = await tool(ctx, name, **args)
        assert r.code == "PATH_RESERVED", (name, r)
    assert (await tool(ctx, "search_files", pattern="needle")).output["matches"] == [
        "code.txt:1: needle public"
    ]
    assert (await tool(ctx, "list_directory", depth=3)).output["entries"] == ["code.txt", "inside.txt"]
    # A workspace inside the state dir (the scratch case) is not reserved itself.
    inner = state / "agentic" / "t"
    inner.mkdir(parents=True)
    assert Workspace(inner, reserved=[state]).reserved == ()


async def test_a_backtracking_search_is_killed_at_its_time_limit(
    ws: Path, autojump_clock: trio.abc.Clock
) -> None:
    (ws / "evil.txt").write_text("a" * 64 + "!\n")
    ctx = ctx_for(ws, command_timeout_s=10.0)
    t0 = trio.current_time()
    r = await tool(ctx, "search_files", pattern="^(a+)+$")
    assert r.code == "SEARCH_TIMEOUT"
    assert 10 <= trio.current_time() - t0 < 20
    assert procs.find_marked(ctx.marker) == []


async def test_an_unforeseen_tool_error_goes_back_to_the_model(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sidecar.agentic.tools as tools_mod

    def broken(*_: Any) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tools_mod, "read_text", broken)
    r = await tool(ctx_for(ws), "read_file", path="inside.txt")
    assert (r.success, r.code, r.message) == (False, "TOOL_FAILED", "RuntimeError: disk on fire")
