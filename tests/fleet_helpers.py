"""Helpers for the fleet tests: the `sidecar` CLI as a process, a bare git remote, a stand-in systemctl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio


def cli_env(home: Path, path_prefix: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "XDG_"))}
    env["HOME"] = str(home)
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


async def sidecar_cli(
    *args: str,
    env: dict[str, str],
    cwd: Path,
    timeout: float = 90,  # noqa: ASYNC109
) -> subprocess.CompletedProcess[str]:
    """Run `python -m sidecar ARGS`; stdout and stderr as text."""
    with trio.fail_after(timeout):
        proc = await trio.run_process(
            [sys.executable, "-m", "sidecar", *args],
            cwd=cwd,
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


async def git(*args: str, cwd: Path) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }
    await trio.run_process(["git", *args], cwd=cwd, env=env, capture_stdout=True, capture_stderr=True)


async def make_remote(path: Path, work: Path) -> None:
    """A bare repository at `path` holding one commit with README.md."""
    path.parent.mkdir(parents=True, exist_ok=True)
    await git("init", "-q", "--bare", str(path), cwd=path.parent)
    await git("init", "-q", str(work), cwd=path.parent)
    (work / "README.md").write_text("fleet repo\n")
    await git("add", "README.md", cwd=work)
    await git("commit", "-q", "-m", "first", cwd=work)
    await git("push", "-q", str(path), "HEAD:refs/heads/main", cwd=work)
    await git("symbolic-ref", "HEAD", "refs/heads/main", cwd=path)


def write_systemctl_standin(bin_dir: Path, log: Path, exit_code: int = 0) -> None:
    """`systemctl` that records its argv and environment as JSON lines in `log`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "systemctl"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}) + '\\n')\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(0o755)


def systemctl_calls(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


_SYSTEMD_STANDIN = """
import json, os, shlex, signal, subprocess, sys, time
from pathlib import Path

args = [a for a in sys.argv[1:] if a != "--user"]
with open({log!r}, "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
units, run = Path({units!r}), Path({run!r})
run.mkdir(parents=True, exist_ok=True)
if args[:2] == ["enable", "--now"]:
    name = args[2]
    settings = {{}}
    for line in (units / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings[key] = value
    # As systemd: a clean environment plus the EnvironmentFile, in WorkingDirectory.
    env = {{"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}}
    for line in Path(settings["EnvironmentFile"].lstrip("-")).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key] = value
    argv = [a.replace("%%", "%").replace("$$", "$") for a in shlex.split(settings["ExecStart"])]
    log_file = open(run / (name + ".log"), "ab")
    proc = subprocess.Popen(argv, cwd=settings["WorkingDirectory"], env=env, stdin=subprocess.DEVNULL,
                            stdout=log_file, stderr=log_file, start_new_session=True)
    (run / (name + ".pid")).write_text(str(proc.pid))
elif args[:2] == ["disable", "--now"]:
    pid_file = run / (args[2] + ".pid")
    if pid_file.exists():
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)  # KillMode=mixed: the main process only
        for _ in range(600):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        pid_file.unlink()
"""


def write_systemd_standin(bin_dir: Path, log: Path, units: Path, run: Path) -> None:
    """`systemctl` that also runs the unit: `enable --now` starts its ExecStart (clean env plus
    EnvironmentFile, in WorkingDirectory, a session of its own), `disable --now` SIGTERMs it and
    waits. Argv and environment of each call are recorded in `log`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "systemctl"
    body = _SYSTEMD_STANDIN.format(log=str(log), units=str(units), run=str(run))
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(0o755)


def standin_service_pids(run: Path) -> list[int]:
    return [int(p.read_text()) for p in run.glob("*.pid")] if run.is_dir() else []
