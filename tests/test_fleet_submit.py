"""`sidecar submit` end to end: the CLI as a process, the dev hub, and a sidecar running the task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sidecar.app import open_sidecar
from sidecar.devhub import open_dev_hub
from tests.fleet_helpers import cli_env, sidecar_cli

AGENT, TOKEN = "agent-1", "submit-test-token-9"


async def test_submit_and_wait_success_failure_timeout(tmp_path: Path, make_config: Any) -> None:
    env = cli_env(tmp_path / "home")
    async with open_dev_hub(tokens={AGENT: TOKEN}, require_auth=True) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN)
        base = ("submit", "--hub", hub.api_url, "--token", TOKEN)
        async with open_sidecar(cfg):
            ok = await sidecar_cli(
                *base,
                "--description",
                "greet",
                "--shell",
                "echo hello-fleet",
                "--wait",
                env=env,
                cwd=tmp_path,
            )
            assert ok.returncode == 0, ok.stdout + ok.stderr
            lines = ok.stdout.splitlines()
            task_id = lines[0]
            assert hub.task(task_id).status == "completed"
            assert lines[-1] == f"{task_id}: completed: hello-fleet"
            assert lines[-2] == f"{task_id}: completed ({AGENT})"  # the status changes, then the end

            checked = await sidecar_cli(
                *base,
                "--description",
                "checked",
                "--shell",
                "true",
                "--verify",
                "command_succeeds:true",
                "--verify",
                "file_exists:no-such-file",
                "--wait",
                env=env,
                cwd=tmp_path,
            )
            assert checked.returncode == 0, checked.stdout + checked.stderr
            checked_id = checked.stdout.splitlines()[0]
            end, summary, failed = checked.stdout.splitlines()[-3:]
            assert (end, summary) == (f"{checked_id}: completed", "  verification fail: 1/2 checks passed")
            assert failed.startswith("    fail file_exists no-such-file: File not found: /")
            assert failed.endswith("/no-such-file")

            bad = await sidecar_cli(
                *base,
                "--description",
                "fail",
                "--shell",
                "echo broken >&2; exit 3",
                "--max-retries",
                "1",
                "--wait",
                env=env,
                cwd=tmp_path,
            )
            assert bad.returncode == 1, bad.stdout + bad.stderr
            failed_id = bad.stdout.splitlines()[0]
            assert hub.task(failed_id).status == "dead_letter"
            assert bad.stdout.splitlines()[-1].startswith(f"{failed_id}: dead_letter: ")

            slow = await sidecar_cli(
                *base,
                "--description",
                "slow",
                "--shell",
                "sleep 30",
                "--wait",
                "--timeout",
                "1",
                "--json",
                env=env,
                cwd=tmp_path,
            )
            assert slow.returncode == 124, slow.stdout + slow.stderr
            events = [json.loads(line) for line in slow.stdout.splitlines()]
            assert events[0]["event"] == "submitted" and events[0]["status"] == "queued"
            assert events[-1] == {
                "event": "result",
                "task_id": events[0]["task_id"],
                "status": "timeout",
                "exit_code": 124,
            }
            assert hub.task(events[0]["task_id"]).status in ("assigned", "accepted")  # it runs on
            hub.cancel(events[0]["task_id"])
        assert [v for v in hub.violations if v.kind != "rate_limited"] == []


async def test_submit_options_reach_the_hub(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")
    async with open_dev_hub(tokens={AGENT: TOKEN}, require_auth=True) as hub:
        base = ("submit", "--hub", hub.api_url, "--token", TOKEN)
        proc = await sidecar_cli(
            *base,
            "--description",
            "fix it",
            "--priority",
            "urgent",
            "--shell",
            "make test",
            "--metadata",
            '{"ticket": "T-1"}',
            "--target",
            "agent-9",
            "--verify",
            "test_passes:tests/test_x.py",
            "--verify",
            "git_clean",
            "--json",
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr
        [submitted] = [json.loads(line) for line in proc.stdout.splitlines()]
        assert submitted["event"] == "submitted" and submitted["priority"] == "urgent"
        fields = hub.task(submitted["task_id"]).fields
        assert fields["priority"] == "urgent" and fields["complexity_tier"] == "trivial"
        assert fields["metadata"] == {"ticket": "T-1", "shell_command": "make test", "assign_to": "agent-9"}
        assert fields["verification_steps"] == [
            {
                "type": "test_passes",
                "target": "tests/test_x.py",
                "description": "test_passes tests/test_x.py",
            },
            {"type": "git_clean", "target": "", "description": "git_clean"},
        ]
        assert hub.task(submitted["task_id"]).assign_to == "agent-9"

        refused = await sidecar_cli(
            "submit", "--hub", hub.api_url, "--token", "wrong", "--description", "x", env=env, cwd=tmp_path
        )
        assert refused.returncode == 1 and "401" in refused.stderr and "refused the token" in refused.stderr
        for bad in (
            ("--verify", "nope:x"),
            ("--verify", "file_exists"),
            ("--metadata", "[1]"),
            ("--metadata", "{bad"),
        ):
            usage = await sidecar_cli(*base, "--description", "x", *bad, env=env, cwd=tmp_path)
            assert usage.returncode == 2 and usage.stderr.startswith("sidecar submit: "), bad
        assert len(hub.tasks()) == 1
    down = await sidecar_cli(
        "submit", "--hub", "http://127.0.0.1:9", "--token", "t", "--description", "x", env=env, cwd=tmp_path
    )
    assert down.returncode == 1 and "unreachable" in down.stderr
