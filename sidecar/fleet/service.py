"""The agent's systemd unit: rendered from `deploy/sidecar.service`, installed, removed.

One unit per agent, `sidecar-NAME.service`, so several agents can share a host.
As root it is a system unit (`/etc/systemd/system`, `User=` the invoking user);
otherwise a user unit (`~/.config/systemd/user`, `systemctl --user`). Every
`systemctl` call is an argv list run through `procs.run_child` with a time limit.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import sys
from pathlib import Path

import attrs
import trio

from .. import procs

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "sidecar.service"
SYSTEMCTL_TIMEOUT_S = 60.0
# Sandboxing a user manager cannot always set up (it needs user namespaces).
_SYSTEM_ONLY = ("User=", "Group=", "PrivateTmp=", "ProtectSystem=")


@attrs.frozen
class Unit:
    name: str  # sidecar-NAME.service
    path: Path
    user_mode: bool

    def systemctl(self, *args: str) -> list[str]:
        exe = shutil.which("systemctl") or "systemctl"
        return [exe, *(["--user"] if self.user_mode else []), *args]


def unit_for(agent_id: str, unit_dir: Path | None = None) -> Unit:
    user_mode = os.geteuid() != 0
    if unit_dir is None:
        if user_mode:
            config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
            unit_dir = Path(config) / "systemd" / "user"
        else:
            unit_dir = Path("/etc/systemd/system")
    name = f"sidecar-{agent_id}.service"
    return Unit(name, unit_dir / name, user_mode)


def systemd_present() -> bool:
    return shutil.which("systemctl") is not None


def sidecar_argv(config: Path) -> list[str]:
    """How the service starts this very installation of the sidecar."""
    script = Path(sys.executable).parent / "sidecar"
    head = [str(script)] if script.is_file() else [sys.executable, "-m", "sidecar"]
    return [*head, "--log-format", "json", "run", "--config", str(config)]


def _quote(arg: str) -> str:
    """One ExecStart word: `%` and `$` escaped, quoted when it holds space or quotes."""
    if "\n" in arg:
        raise ValueError(f"a newline in a unit's command line: {arg!r}")
    text = arg.replace("%", "%%").replace("$", "$$")
    if any(c in text for c in " \t\"'\\;"):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def _path_value(path: Path) -> str:
    text = str(path)
    if "\n" in text:
        raise ValueError(f"a newline in a path: {text!r}")
    return text.replace("%", "%%")


def render(template: str, unit: Unit, agent_id: str, agent_dir: Path, argv: list[str]) -> str:
    """The unit for this agent: the template's settings with this host's paths filled in."""
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    out = [
        f"# Installed by `sidecar join` for agent {agent_id}, from deploy/sidecar.service.\n",
        "# Remove with `sidecar leave --name " + agent_id + "`.\n",
    ]
    for line in template.splitlines():
        key = line.split("=", 1)[0] + "=" if "=" in line else None
        if line.startswith("#") or key in ("StateDirectory=", "StateDirectoryMode="):
            continue
        if unit.user_mode and key in _SYSTEM_ONLY:
            continue
        if key == "User=":
            line = f"User={user}"
        elif key == "Group=":
            line = f"Group={group}"
        elif key == "Description=":
            line = f"{line} [agent {agent_id}]"
        elif key == "WorkingDirectory=":
            line = f"WorkingDirectory={_path_value(agent_dir)}"
        elif key == "EnvironmentFile=":
            line = f"EnvironmentFile={_path_value(agent_dir / 'sidecar.env')}"
        elif key == "ExecStart=":
            line = "ExecStart=" + " ".join(_quote(a) for a in argv)
        elif key == "WantedBy=" and unit.user_mode:
            line = "WantedBy=default.target"
        out.append(line + "\n")
    return "".join(out)


async def run_systemctl(argv: list[str], secret: str | None = None) -> tuple[bool, str]:
    """Run one systemctl command (bounded); (ok, what it said or why it failed)."""
    marker = "sidecar-fleet-" + secrets.token_hex(6)
    env = procs.child_env(os.environ, marker, secrets=[secret] if secret else [])
    lines: list[str] = []

    async def keep(line: str) -> None:
        if len(lines) < 50:
            lines.append(line)

    try:
        with trio.move_on_after(SYSTEMCTL_TIMEOUT_S) as scope:
            res = await procs.run_child(
                argv, cwd=Path("/"), env=env, marker=marker, on_stdout=keep, on_stderr=keep
            )
    except OSError as exc:
        return False, f"cannot run {argv[0]}: {exc}"
    said = " / ".join(x.strip() for x in lines if x.strip())[:500]
    if scope.cancelled_caught:
        return False, f"timed out after {SYSTEMCTL_TIMEOUT_S:g} s"
    if res.returncode != 0:
        return False, procs.describe_returncode(res.returncode) + (f": {said}" if said else "")
    return True, said
