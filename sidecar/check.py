"""`sidecar check`: is this host ready to run the sidecar with this config?

Checks, in order: the config parses and validates; the state dir is (or can
be) a writable directory; the state database there, if any, is SQLite (read
only, so a running sidecar is not disturbed); the hub answers on TCP,
completes a WebSocket handshake, and accepts our identify with the configured token (then we close
cleanly with code 1000); Ollama answers `GET /api/version` (when configured);
the `claude` binary runs `--version`. Prints one table row per check.

Exit status: 0 when the config, state dir, state db and hub checks pass, 1 when one of
them fails (Ollama and Claude are warnings: a sidecar may not need them), 2
for an unreadable or invalid config.

Identify has a side effect on a real hub: it restarts that agent's session, so
a sidecar running with the same agent_id loses its connection (and the hub
reclaims its task). `--no-identify` stops after the WebSocket handshake.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TextIO
from urllib.parse import urlparse

import attrs
import httpx
import trio
import trio_websocket

from . import procs
from .config import ENV_OVERRIDES, Config, ConfigError, load_config
from .log import register_secret
from .messages import FrameError, decode_frame, encode_frame, identify_frame
from .storefaults import StoreError, inspect
from .toolcheck import missing_tools

OK, FAIL, WARN, SKIP = "ok", "FAIL", "warn", "skip"
# Marks the processes `sidecar check` starts (swept like a task's).
CHECK_MARKER = "sc-check"
_COLOUR = {OK: "\x1b[32m", FAIL: "\x1b[31;1m", WARN: "\x1b[33m", SKIP: "\x1b[2m"}


@attrs.frozen
class Row:
    name: str
    status: str
    detail: str
    fatal: bool = False  # a failure here makes the exit status non-zero


def check_state_dir(path: Path) -> Row:
    """Writable if it exists and we can create a file in it, or its nearest existing parent is writable."""
    target = path
    while not target.exists():
        if target.parent == target:
            return Row("state dir", FAIL, f"{path}: no existing parent", True)
        target = target.parent
    if not target.is_dir():
        return Row("state dir", FAIL, f"{target} exists and is not a directory", True)
    try:
        with tempfile.NamedTemporaryFile(dir=target, prefix=".sidecar-check-"):
            pass
    except OSError as exc:
        return Row("state dir", FAIL, f"{target} is not writable: {exc.strerror}", True)
    if target == path:
        return Row("state dir", OK, f"{path} (writable)", True)
    return Row("state dir", OK, f"{path} (will be created; {target} is writable)", True)


def check_state_db(path: Path) -> Row:
    """The state database, read-only: SQLite (or not there yet), and what it holds."""
    if not path.exists():
        return Row("state db", OK, f"{path} (none yet: created on first run)", True)
    try:
        held, results = inspect(path)
    except StoreError as exc:
        return Row("state db", FAIL, str(exc), True)
    return Row("state db", OK, f"{path} ({held} tasks in flight, {results} results unsent)", True)


def _hostport(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname or "", u.port or (443 if u.scheme == "wss" else 80)


async def check_hub(cfg: Config, *, identify: bool = True, timeout_s: float = 10.0) -> list[Row]:
    host, port = _hostport(cfg.hub_url)
    rows: list[Row] = []
    started = trio.current_time()
    try:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(host, port)
            await stream.aclose()
    except (OSError, trio.TooSlowError) as exc:
        why = "timed out" if isinstance(exc, trio.TooSlowError) else (exc.strerror or str(exc))
        return [Row("hub tcp", FAIL, f"{host}:{port}: {why}", True)]
    rows.append(Row("hub tcp", OK, f"{host}:{port} ({_ms(started)} ms)", True))

    started = trio.current_time()
    try:
        async with trio_websocket.open_websocket_url(
            cfg.hub_url, connect_timeout=timeout_s, disconnect_timeout=2
        ) as ws:
            rows.append(Row("hub websocket", OK, f"{cfg.hub_url} ({_ms(started)} ms)", True))
            if not identify:
                rows.append(Row("hub identify", SKIP, "--no-identify", False))
                return rows
            rows.append(await _identify(ws, cfg, timeout_s))
    except trio_websocket.HandshakeError as exc:
        rows.append(Row("hub websocket", FAIL, f"{cfg.hub_url}: handshake failed: {exc}"[:200], True))
    except trio_websocket.ConnectionClosed as exc:
        reason = exc.reason
        text = "closed by the hub"
        if reason is not None:
            text += f": code {reason.code} {reason.reason or ''}".rstrip()
        rows.append(Row("hub identify", FAIL, text, True))
    except (OSError, trio.TooSlowError) as exc:
        rows.append(Row("hub websocket", FAIL, f"{cfg.hub_url}: {type(exc).__name__}: {exc}"[:200], True))
    return rows


async def _identify(ws: trio_websocket.WebSocketConnection, cfg: Config, timeout_s: float) -> Row:
    started = trio.current_time()
    frame = identify_frame(cfg.agent_id, cfg.token, cfg.display_name, cfg.capabilities, cfg.ollama_url)
    await ws.send_message(encode_frame(frame))
    try:
        with trio.fail_after(timeout_s):
            while True:
                try:
                    reply = decode_frame(await ws.get_message())
                except FrameError:
                    continue
                if reply["type"] == "identified":
                    return Row("hub identify", OK, f"agent {cfg.agent_id} accepted ({_ms(started)} ms)", True)
                if reply["type"] == "error":
                    return Row("hub identify", FAIL, f"refused: {str(reply.get('error'))[:200]}", True)
                if reply["type"] == "rate_limited":
                    retry = reply.get("retry_after_ms")
                    return Row("hub identify", FAIL, f"rate limited, retry after {retry} ms", True)
    except trio.TooSlowError:
        return Row("hub identify", FAIL, f"no answer within {timeout_s:g} s", True)


async def check_ollama(cfg: Config, timeout_s: float = 5.0) -> Row:
    if not cfg.ollama_url:
        return Row("ollama", SKIP, "ollama_url not configured (tasks may still name an endpoint)")
    base = (cfg.ollama_url if "://" in cfg.ollama_url else "http://" + cfg.ollama_url).rstrip("/")
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as http:
            resp = await http.get(f"{base}/api/version")
            resp.raise_for_status()
            version = resp.json().get("version", "?")
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return Row("ollama", WARN, f"{base}: {type(exc).__name__}: {exc}"[:200])
    return Row("ollama", OK, f"{base} version {version}")


async def check_claude(cfg: Config, timeout_s: float = 15.0) -> Row:
    exe = shutil.which(cfg.claude.binary)
    if exe is None:
        return Row("claude", WARN, f"{cfg.claude.binary!r} not found on PATH (Claude tasks will fail)")
    env = procs.child_env(os.environ, CHECK_MARKER, secrets=[cfg.token])
    try:
        proc = await procs.capture(
            [exe, "--version"], cwd=Path.cwd(), env=env, marker=CHECK_MARKER, timeout_s=timeout_s, grace_s=1.0
        )
    except OSError as exc:
        return Row("claude", WARN, f"{exe} --version: {type(exc).__name__}: {exc}"[:200])
    if proc.timed_out:
        return Row("claude", WARN, f"{exe} --version: no answer within {timeout_s:g} s")
    first = (proc.stdout.strip().splitlines() or [""])[0]
    if proc.returncode != 0:
        return Row("claude", WARN, f"{exe} --version exited {proc.returncode}")
    return Row("claude", OK, f"{exe} {first}"[:200])


def check_repo_tools(cfg: Config) -> list[Row]:
    """With a `repo_dir`, a row each for `git` and `gh` (the branch-and-PR workflow)."""
    if not cfg.repo_dir:
        return []
    missing = dict(missing_tools(cfg))
    rows = []
    for tool in ("git", "gh"):
        if tool in missing:
            rows.append(Row(tool, WARN, f"{tool!r} not found on PATH ({missing[tool]})"))
        else:
            rows.append(Row(tool, OK, str(shutil.which(tool))))
    return rows


def _ms(since: float) -> int:
    return round((trio.current_time() - since) * 1000)


def render(rows: list[Row], out: TextIO, colour: bool) -> None:
    width = max(len(r.name) for r in rows)
    out.write(f"{'CHECK':{width}}  STATUS  DETAIL\n")
    for r in rows:
        status = f"{r.status:6}"
        if colour:
            status = f"{_COLOUR.get(r.status, '')}{status}\x1b[0m"
        out.write(f"{r.name:{width}}  {status}  {r.detail}\n")
    out.flush()


async def run_check(
    config_path: str | None, out: TextIO, *, identify: bool = True, timeout_s: float = 10.0
) -> int:
    colour = out.isatty()
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        render([Row("config", FAIL, str(exc), True)], out, colour)
        return 2
    register_secret(cfg.token)
    source = config_path or "(environment only)"
    env_used = sorted(k for k in ENV_OVERRIDES if os.environ.get(k))
    detail = f"{source}: agent {cfg.agent_id}, hub {cfg.hub_url}"
    if env_used:
        detail += f" (from env: {', '.join(env_used)})"
    state_dir = cfg.resolved_state_dir()
    rows = [Row("config", OK, detail, True), check_state_dir(state_dir)]
    rows.append(await trio.to_thread.run_sync(check_state_db, state_dir / "sidecar.db"))
    rows += await check_hub(cfg, identify=identify, timeout_s=timeout_s)
    rows.append(await check_ollama(cfg))
    rows.append(await check_claude(cfg))
    rows += await trio.to_thread.run_sync(check_repo_tools, cfg)
    render(rows, out, colour)
    failed = [r.name for r in rows if r.fatal and r.status == FAIL]
    out.write(("\nnot ready: " + ", ".join(failed) if failed else "\nready") + "\n")
    return 1 if failed else 0
