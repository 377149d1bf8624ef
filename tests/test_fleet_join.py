"""`sidecar join` and `sidecar leave` end to end: the CLI as a process against the dev hub over real HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import trio

from sidecar.config import load_config
from sidecar.devhub import DevHub, open_dev_hub
from sidecar.procs import agent_marker_prefix
from tests.chaos.procscan import marked_processes
from tests.fleet_helpers import (
    cli_env,
    make_remote,
    sidecar_cli,
    standin_service_pids,
    systemctl_calls,
    write_systemctl_standin,
    write_systemd_standin,
)

STEP_RE = re.compile(r"^\[(\d)/6\] ([a-z ]+): ")


def steps(stdout: str) -> list[tuple[int, str, str]]:
    """The numbered progress lines: (number, step, text)."""
    out = []
    for line in stdout.splitlines():
        m = STEP_RE.match(line)
        if m:
            out.append((int(m.group(1)), m.group(2), line[m.end() :]))
    return out


def onboarding_tasks(hub: DevHub) -> list[dict[str, object]]:
    return [t.to_json() for t in hub.tasks() if (t.fields.get("metadata") or {}).get("onboarding_test")]


async def nothing_left_running(hub: DevHub, agent: str) -> None:
    await hub.wait_until(lambda: not hub.connected(agent), 10)
    assert marked_processes(agent_marker_prefix(agent)) == {}
    assert marked_processes("sidecar-fleet-") == {}


async def test_join_from_nothing_then_leave(tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    await make_remote(remote, tmp_path / "work")
    env = cli_env(tmp_path / "home")
    async with open_dev_hub(tokens={}, default_repo=remote.as_uri(), require_auth=True) as hub:
        proc = await sidecar_cli("join", "--hub", hub.api_url, "--name", "box-1", env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [n for n, _, _ in steps(proc.stdout)] == [1, 2, 3, 4, 5, 6]
        assert "has joined the fleet" in proc.stdout

        agent_dir = tmp_path / "home" / ".local" / "share" / "sidecar" / "agents" / "box-1"
        token = hub.state.registered["box-1"]
        assert token not in proc.stdout + proc.stderr
        # The token only in the owner-only env file, not in the TOML (nor the progress file).
        env_file = agent_dir / "sidecar.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert env_file.read_text() == f"SIDECAR_TOKEN={token}\n"
        for name in ("sidecar.toml", ".join-progress.json", ".sidecar-join"):
            assert token not in (agent_dir / name).read_text()
        settings = tomllib.loads((agent_dir / "sidecar.toml").read_text())
        assert settings["hub_url"] == hub.ws_url and settings["hub_api_url"] == hub.api_url
        cfg = load_config(agent_dir / "sidecar.toml", env={"SIDECAR_TOKEN": token})
        assert cfg.agent_id == "box-1" and cfg.repo_dir == str(agent_dir / "repo")
        assert (agent_dir / "repo" / "README.md").read_text() == "fleet repo\n"
        # Without --service: the exact command to run it, with the token left in its file.
        run_line = next(line for line in proc.stdout.splitlines() if " run --config " in line)
        assert f"$(cat {env_file})" in run_line and str(agent_dir / "sidecar.toml") in run_line

        # The smoke test: an echo through the shell path, run by join's own sidecar.
        [smoke] = onboarding_tasks(hub)
        assert smoke["status"] == "completed" and smoke["assigned_to"] == "box-1"
        assert "sidecar-join-ok" in str(smoke["result"])
        assert steps(proc.stdout)[-1][2].startswith("passed: task ")
        await nothing_left_running(hub, "box-1")
        assert hub.violations == []

        # A rerun finds everything done and does nothing again.
        again = await sidecar_cli("join", "--hub", hub.api_url, "--name", "box-1", env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stdout
        assert [t for _, _, t in steps(again.stdout)][1:] == [
            "done earlier: agent box-1",
            f"done earlier: {remote.as_uri()} in {agent_dir / 'repo'}",
            f"wrote {agent_dir / 'sidecar.toml'} (token in {env_file}, mode 0600)",
            "not installed (no --service); run the agent with:",
            "passed earlier",
        ]
        assert len(onboarding_tasks(hub)) == 1

        # leave: every step ok, the token revoked, the directory gone.
        left = await sidecar_cli(
            "leave", "--name", "box-1", "--unit-dir", str(tmp_path / "units"), env=env, cwd=tmp_path
        )
        assert left.returncode == 0, left.stdout
        assert [line.split(": ")[1] for line in left.stdout.splitlines()] == ["ok", "ok", "ok"]
        assert "box-1" in hub.state.revoked and not agent_dir.exists()
        assert agent_dir.parent.is_dir()  # only the agent's own directory went


async def test_join_resumes_after_a_failed_step(tmp_path: Path) -> None:
    remote = tmp_path / "later" / "remote.git"  # not there yet: the clone fails
    env = cli_env(tmp_path / "home")
    agent_dir = tmp_path / "agent"
    args = ("join", "--hub", "", "--name", "box-2", "--dir", str(agent_dir))
    async with open_dev_hub(tokens={}, default_repo=remote.as_uri()) as hub:
        argv = list(args)
        argv[2] = hub.api_url
        first = await sidecar_cli(*argv, env=env, cwd=tmp_path)
        assert first.returncode == 1, first.stdout + first.stderr
        done = steps(first.stdout)
        assert [n for n, _, _ in done] == [1, 2, 3]
        assert done[2][2].startswith("FAILED: git clone ") and "rerun the same command" in first.stdout
        token = hub.state.registered["box-2"]
        assert agent_dir.joinpath("sidecar.env").read_text() == f"SIDECAR_TOKEN={token}\n"
        assert not agent_dir.joinpath("sidecar.toml").exists()

        await make_remote(remote, tmp_path / "work")
        second = await sidecar_cli(*argv, env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr
        done = steps(second.stdout)
        assert done[1][2] == "done earlier: agent box-2"  # registered once: no 409
        assert done[2][2].startswith("cloned ")
        assert list(hub.state.registered) == ["box-2"] and hub.state.registered["box-2"] == token
        assert (agent_dir / "repo" / "README.md").exists()
        [smoke] = onboarding_tasks(hub)
        assert smoke["status"] == "completed"
        await nothing_left_running(hub, "box-2")


async def test_rejoin_after_409(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    agent_dir = tmp_path / "agent"
    async with open_dev_hub(tokens={"box-3": "existing-token-3"}) as hub:
        proc = await sidecar_cli(
            "join", "--hub", hub.api_url, "--name", "box-3", "--dir", str(agent_dir), env=env, cwd=tmp_path
        )
        assert proc.returncode == 1
        failed = steps(proc.stdout)[-1]
        assert failed[:2] == (2, "register") and "already registered" in failed[2]
        assert f"sidecar join --hub {hub.api_url} --name box-3 --rejoin --token T" in failed[2]
        assert hub.state.registered == {}

        wrong = await sidecar_cli(
            "join",
            "--hub",
            hub.api_url,
            "--name",
            "box-3",
            "--rejoin",
            "--token",
            "nope",
            "--dir",
            str(agent_dir),
            env=env,
            cwd=tmp_path,
        )
        assert wrong.returncode == 1 and "refused the token" in wrong.stdout

        ok = await sidecar_cli(
            "join",
            "--hub",
            hub.api_url,
            "--name",
            "box-3",
            "--rejoin",
            "--token",
            "existing-token-3",
            "--dir",
            str(agent_dir),
            env=env,
            cwd=tmp_path,
        )
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert steps(ok.stdout)[1][2] == "rejoined as box-3 with its existing token"
        assert "existing-token-3" not in ok.stdout + ok.stderr
        assert (agent_dir / "sidecar.env").read_text() == "SIDECAR_TOKEN=existing-token-3\n"
        [smoke] = onboarding_tasks(hub)
        assert smoke["status"] == "completed" and smoke["assigned_to"] == "box-3"
        await nothing_left_running(hub, "box-3")


async def test_join_with_service_then_leave_with_a_standin_systemctl(tmp_path: Path) -> None:
    bin_dir, log, units = tmp_path / "bin", tmp_path / "systemctl.log", tmp_path / "units"
    write_systemctl_standin(bin_dir, log)
    env = cli_env(tmp_path / "home", path_prefix=bin_dir)
    agent_dir = tmp_path / "agent dir"  # a space, to see the unit's quoting
    join = (
        "join",
        "--hub",
        "",
        "--name",
        "box-4",
        "--dir",
        str(agent_dir),
        "--service",
        "--no-smoke",
        "--unit-dir",
        str(units),
    )
    async with open_dev_hub(tokens={}) as hub:
        argv = list(join)
        argv[2] = hub.api_url
        proc = await sidecar_cli(*argv, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        done = steps(proc.stdout)
        assert done[2][2] == "the hub has no default repository: skipped"
        assert (
            done[4][2]
            == f"installed {units / 'sidecar-box-4.service'}, enabled and started sidecar-box-4.service"
        )
        assert done[5][2] == "skipped (--no-smoke)"
        user = [] if os.geteuid() == 0 else ["--user"]
        calls = systemctl_calls(log)
        assert [c["argv"] for c in calls] == [
            [*user, "daemon-reload"],
            [*user, "enable", "--now", "sidecar-box-4.service"],
        ]
        token = hub.state.registered["box-4"]
        for call in calls:  # the token never reaches a child's environment
            assert not any(token in v for v in call["env"].values())

        unit = (units / "sidecar-box-4.service").read_text()
        assert f'--config "{agent_dir / "sidecar.toml"}"' in unit
        assert f"EnvironmentFile={agent_dir / 'sidecar.env'}\n" in unit
        assert f"WorkingDirectory={agent_dir}\n" in unit
        for setting in (
            "Restart=always",
            "KillMode=mixed",
            "TimeoutStopSec=30",
            "RestartPreventExitStatus=2",
        ):
            assert setting + "\n" in unit  # the template's settings are kept
        assert "/etc/sidecar" not in unit and "/opt/trio-sidecar/bin" not in unit and token not in unit

        # A rerun does not install it again.
        again = await sidecar_cli(*argv, env=env, cwd=tmp_path)
        assert again.returncode == 0 and steps(again.stdout)[4][2] == "done earlier: sidecar-box-4.service"
        assert len(systemctl_calls(log)) == 2

        left = await sidecar_cli(
            "leave",
            "--name",
            "box-4",
            "--dir",
            str(agent_dir),
            "--unit-dir",
            str(units),
            env=env,
            cwd=tmp_path,
        )
        assert left.returncode == 0, left.stdout
        assert [c["argv"] for c in systemctl_calls(log)[2:]] == [
            [*user, "disable", "--now", "sidecar-box-4.service"],
            [*user, "daemon-reload"],
        ]
        assert not (units / "sidecar-box-4.service").exists() and not agent_dir.exists()
        assert "box-4" in hub.state.revoked


async def test_leave_refuses_bad_names_and_foreign_directories(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    base = tmp_path / "home" / ".local" / "share" / "sidecar" / "agents"
    base.mkdir(parents=True)
    (base / "keep.txt").write_text("x")
    for bad in ("..", ".", "a/b", "../agents", "x y", ""):
        proc = await sidecar_cli("leave", "--name", bad, env=env, cwd=tmp_path)
        assert proc.returncode == 2 and "nothing done" in proc.stdout, bad
    assert (base / "keep.txt").exists()

    # A directory join did not make (no marker) is left alone; the other steps still run and report.
    foreign = base / "box-5"
    foreign.mkdir()
    (foreign / "data").write_text("precious")
    async with open_dev_hub(tokens={"box-5": "tok-5"}) as hub:
        proc = await sidecar_cli(
            "leave",
            "--name",
            "box-5",
            "--hub",
            hub.api_url,
            "--token",
            "tok-5",
            "--unit-dir",
            str(tmp_path / "units"),
            env=env,
            cwd=tmp_path,
        )
        lines = proc.stdout.splitlines()
        assert proc.returncode == 1
        assert lines[0].startswith("[1/3] service: ok") and lines[1].startswith(
            "[2/3] token: ok: token revoked"
        )
        assert lines[2].startswith("[3/3] directory: FAILED") and "no marker" in lines[2]
        assert (foreign / "data").read_text() == "precious" and "box-5" in hub.state.revoked

    # An unreachable hub fails its step, and the directory step still runs.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".sidecar-join").write_text('{"agent_id": "box-6"}')
    proc = await sidecar_cli(
        "leave",
        "--name",
        "box-6",
        "--dir",
        str(mine),
        "--hub",
        "http://127.0.0.1:9",
        "--token",
        "t",
        "--unit-dir",
        str(tmp_path / "units"),
        env=env,
        cwd=tmp_path,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and "token: FAILED" in lines[1] and "unreachable" in lines[1]
    assert lines[2].startswith("[3/3] directory: ok") and not mine.exists()
    # A marker for another agent: refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / ".sidecar-join").write_text('{"agent_id": "box-7"}')
    proc = await sidecar_cli(
        "leave",
        "--name",
        "box-8",
        "--dir",
        str(other),
        "--unit-dir",
        str(tmp_path / "u"),
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and other.exists() and "for agent 'box-7'" in proc.stdout


async def test_join_generated_name_resumes_without_name_or_dir(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    remote = tmp_path / "later.git"
    async with open_dev_hub(tokens={}, default_repo=remote.as_uri()) as hub:
        first = await sidecar_cli("join", "--hub", hub.api_url, "--no-smoke", env=env, cwd=tmp_path)
        assert first.returncode == 1 and steps(first.stdout)[-1][1] == "repository"
        [name] = hub.state.registered
        assert re.fullmatch(r"[a-z0-9._-]+-[0-9a-f]{4}", name), name
        assert steps(first.stdout)[1][2] == f"registered as {name}"
        await make_remote(remote, tmp_path / "work")
        # The same command finds the unfinished join of this hub and goes on with it.
        second = await sidecar_cli("join", "--hub", hub.api_url, "--no-smoke", env=env, cwd=tmp_path)
        assert second.returncode == 0, second.stdout + second.stderr
        assert steps(second.stdout)[1][2] == f"done earlier: agent {name}"
        assert list(hub.state.registered) == [name]
        agent_dir = tmp_path / "home" / ".local" / "share" / "sidecar" / "agents" / name
        assert (agent_dir / "repo" / "README.md").exists()


async def test_join_and_leave_against_the_sidecar_hub_process(tmp_path: Path) -> None:
    """The whole cycle against `sidecar hub` itself, as an operator would try it."""
    remote = tmp_path / "remote.git"
    await make_remote(remote, tmp_path / "work")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    hub_argv = [
        sys.executable,
        "-m",
        "sidecar",
        "--log-format",
        "json",
        "hub",
        "--port",
        str(port),
        "--default-repo",
        remote.as_uri(),
        "--require-auth",
        "--newer",
    ]
    proc = await trio.lowlevel.open_process(hub_argv, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    env = cli_env(tmp_path / "home")
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stderr is not None
        buffer = b""
        with trio.fail_after(20):
            while b"devhub_ready" not in buffer:
                chunk = await proc.stderr.receive_some()
                assert chunk, buffer
                buffer += chunk
        joined = await sidecar_cli(
            "join", "--hub", url, "--name", "box-9", "--dir", str(tmp_path / "a"), env=env, cwd=tmp_path
        )
        assert joined.returncode == 0, joined.stdout + joined.stderr
        assert steps(joined.stdout)[5][2].endswith("completed: sidecar-join-ok")
        token = (tmp_path / "a" / "sidecar.env").read_text().strip().split("=", 1)[1]
        submitted = await sidecar_cli(
            "submit", "--hub", url, "--token", token, "--description", "queued only", env=env, cwd=tmp_path
        )
        assert submitted.returncode == 0 and submitted.stdout.startswith("task-")
        left = await sidecar_cli(
            "leave",
            "--name",
            "box-9",
            "--dir",
            str(tmp_path / "a"),
            "--unit-dir",
            str(tmp_path / "u"),
            env=env,
            cwd=tmp_path,
        )
        assert left.returncode == 0, left.stdout
        assert not (tmp_path / "a").exists()
        # Revoked: the token no longer passes as a Bearer.
        again = await sidecar_cli(
            "submit", "--hub", url, "--token", token, "--description", "x", env=env, cwd=tmp_path
        )
        assert again.returncode == 1 and "401" in again.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_join_service_smoke_test_runs_on_the_installed_unit(tmp_path: Path) -> None:
    """A systemctl stand-in that runs the unit as systemd would: the rendered ExecStart and
    EnvironmentFile start a working agent, which runs join's smoke test; leave stops it."""
    bin_dir, log, units, run = (
        tmp_path / "bin",
        tmp_path / "systemctl.log",
        tmp_path / "units",
        tmp_path / "run",
    )
    write_systemd_standin(bin_dir, log, units, run)
    env = cli_env(tmp_path / "home", path_prefix=bin_dir)
    agent_dir = tmp_path / "agent"
    async with open_dev_hub(tokens={}) as hub:
        try:
            proc = await sidecar_cli(
                "join",
                "--hub",
                hub.api_url,
                "--name",
                "box-10",
                "--dir",
                str(agent_dir),
                "--service",
                "--unit-dir",
                str(units),
                env=env,
                cwd=tmp_path,
            )
            assert proc.returncode == 0, (
                proc.stdout + proc.stderr + (run / "sidecar-box-10.service.log").read_text()
            )
            assert "the installed service runs it" in proc.stdout
            [smoke] = onboarding_tasks(hub)
            assert smoke["status"] == "completed" and smoke["assigned_to"] == "box-10"
            [pid] = standin_service_pids(run)
            assert hub.connected("box-10")  # the service stays up after join
            left = await sidecar_cli(
                "leave",
                "--name",
                "box-10",
                "--dir",
                str(agent_dir),
                "--unit-dir",
                str(units),
                env=env,
                cwd=tmp_path,
            )
            assert left.returncode == 0, left.stdout
            await nothing_left_running(hub, "box-10")
            assert standin_service_pids(run) == []
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        finally:
            for pid in standin_service_pids(run):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
