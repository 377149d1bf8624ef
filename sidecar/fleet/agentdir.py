"""An agent's directory, as `sidecar join` makes it and `sidecar leave` removes it.

    DIR/.sidecar-join        join's marker (JSON: agent_id); leave removes only a DIR holding it
    DIR/.join-progress.json  which steps are done, so a rerun resumes (no secret in it)
    DIR/sidecar.env          SIDECAR_TOKEN=…, mode 0600 (systemd's EnvironmentFile)
    DIR/sidecar.toml         the config (no token)
    DIR/repo/                the hub's default repository, if it has one
    DIR/state/               the sidecar's state dir

Every file is written to a temporary name and renamed, so an interrupted join
never leaves half a file.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

MARKER = ".sidecar-join"
PROGRESS = ".join-progress.json"
ENV_FILE = "sidecar.env"
CONFIG_FILE = "sidecar.toml"
NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


class DirError(Exception):
    """The directory cannot be used (not ours, unreadable, …)."""


def check_name(name: str) -> str | None:
    """None if `name` is a valid agent name, else what is wrong with it."""
    if not NAME_RE.fullmatch(name):
        return f"agent name {name!r} may hold only letters, digits, '.', '_' and '-'"
    if name in (".", ".."):
        return f"agent name {name!r} is not allowed"
    if len(name) > 128:
        return "agent name is longer than the hub's limit of 128 characters"
    return None


def default_base() -> Path:
    """Where agents' directories go by default: `$XDG_DATA_HOME/sidecar/agents`."""
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "sidecar" / "agents"


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # an old tmp file keeps its mode through O_CREAT
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's, with ASCII output)."""
    return json.dumps(value, ensure_ascii=True)


class AgentDir:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def env_file(self) -> Path:
        return self.path / ENV_FILE

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def repo(self) -> Path:
        return self.path / "repo"

    def marker_agent(self) -> str | None:
        """The agent id in join's marker; None without a (regular, readable) marker."""
        try:
            if self.path.is_symlink() or self.marker.is_symlink() or not self.marker.is_file():
                return None
            data = json.loads(self.marker.read_text("utf-8"))
        except (OSError, ValueError):
            return None
        agent = data.get("agent_id") if isinstance(data, dict) else None
        return agent if isinstance(agent, str) else None

    def claim(self, agent_id: str) -> None:
        """Create the directory (owner-only) with join's marker; refuse one join did not make."""
        if self.path.is_symlink():
            raise DirError(f"{self.path} is a symbolic link: give the real directory")
        if self.path.exists():
            if not self.path.is_dir():
                raise DirError(f"{self.path} exists and is not a directory")
            owner = self.marker_agent()
            if owner is None and any(self.path.iterdir()):
                raise DirError(f"{self.path} exists, is not empty and was not made by sidecar join")
            if owner is not None and owner != agent_id:
                raise DirError(f"{self.path} belongs to agent {owner!r}, not {agent_id!r}")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.marker_agent() is None:
            _write_atomic(self.marker, json.dumps({"agent_id": agent_id, "made_by": "sidecar join"}).encode())

    def release(self) -> None:
        """Undo a `claim` that came to nothing: the marker goes, and the directory if empty."""
        self.marker.unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass

    def load_progress(self) -> dict[str, Any]:
        try:
            data = json.loads((self.path / PROGRESS).read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise DirError(f"{self.path / PROGRESS} is unreadable ({exc}): remove it to start over") from None
        return data if isinstance(data, dict) else {}

    def save_progress(self, progress: dict[str, Any]) -> None:
        _write_atomic(self.path / PROGRESS, json.dumps(progress, indent=2, sort_keys=True).encode())

    def write_token(self, token: str) -> None:
        """The token into the env file, readable by its owner only."""
        if "\n" in token or "\0" in token:
            raise DirError("the hub's token holds a newline or NUL")
        _write_atomic(self.env_file, f"SIDECAR_TOKEN={token}\n".encode(), mode=0o600)

    def read_token(self) -> str | None:
        try:
            text = self.env_file.read_text("utf-8")
        except OSError:
            return None
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "SIDECAR_TOKEN":
                return value.strip()
        return None

    def write_config(self, settings: dict[str, str]) -> None:
        """DIR/sidecar.toml from flat string settings (never the token)."""
        assert "token" not in settings, "the token goes in the env file"
        lines = ["# Written by `sidecar join`. The token is in sidecar.env (SIDECAR_TOKEN).\n"]
        lines += [f"{key} = {toml_str(value)}\n" for key, value in settings.items()]
        _write_atomic(self.config_file, "".join(lines).encode())

    def config_settings(self) -> dict[str, Any]:
        """The written config's keys (for leave), or {} if there is none."""
        try:
            return tomllib.loads(self.config_file.read_text("utf-8"))
        except (OSError, ValueError):
            return {}
