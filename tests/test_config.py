"""Config loading: TOML, the original config.json unchanged, env overrides, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import ConfigError, load_config

# The Node sidecar's config.json, every field it knows (protocol.md).
ORIGINAL = {
    "agent_id": "gpu-box-1",
    "token": "a3f9c2-token",
    "hub_url": "ws://10.0.0.5:4000/ws",
    "hub_api_url": "http://10.0.0.5:4000",
    "repo_dir": "/srv/repo",
    "wake_command": 'openclaw agent --message "${TASK_DESCRIPTION}"',
    "capabilities": ["code", "gpu"],
    "confirmation_timeout_ms": 45000,
    "results_dir": "./results",
    "log_file": "./sidecar.log",
    "ollama_url": "http://127.0.0.1:11434",
}


def test_original_config_json_accepted_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ORIGINAL, indent=2))
    cfg = load_config(path, env={})
    assert cfg.agent_id == "gpu-box-1"
    assert cfg.capabilities == ["code", "gpu"]
    assert cfg.confirmation_timeout_ms == 45000
    assert cfg.results_dir == str(tmp_path / "results")
    assert cfg.state_dir == str(tmp_path / "state")
    assert cfg.capacity == 1 and cfg.queue_length == 0


def test_toml_with_sections(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(
        'agent_id = "a1"\ntoken = "t0k3n"\nhub_url = "ws://127.0.0.1:4000/ws"\ncapacity = 3\n'
        'state_dir = "/var/lib/sidecar"\n[ollama]\ndefault_model = "llama3"\n'
        '[prices."my-model"]\ninput_per_mtok = 1.5\noutput_per_mtok = 2\n'
    )
    cfg = load_config(path, env={})
    assert cfg.capacity == 3
    assert cfg.ollama.default_model == "llama3"
    assert cfg.prices["my-model"].output_per_mtok == 2.0
    assert cfg.state_dir == "/var/lib/sidecar"


def test_env_overrides(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ORIGINAL))
    env = {
        "SIDECAR_HUB_URL": "wss://hub.example/ws",
        "SIDECAR_TOKEN": "from-env",
        "SIDECAR_AGENT_ID": "other",
        "SIDECAR_STATE_DIR": str(tmp_path / "st"),
    }
    cfg = load_config(path, env=env)
    assert (cfg.hub_url, cfg.token, cfg.agent_id, cfg.state_dir) == (
        "wss://hub.example/ws",
        "from-env",
        "other",
        str(tmp_path / "st"),
    )


@pytest.mark.parametrize(
    ("patch", "field", "problem"),
    [
        ({"capacity": "two"}, "capacity", "expected an integer"),
        ({"capacity": 0}, "capacity", "must be positive"),
        ({"hub_url": "http://x/ws"}, "hub_url", "ws://"),
        ({"capabilities": ["ok", 3]}, "capabilities[1]", "expected a string"),
        # A string is not a list of one (cattrs alone made "code" ["c", "o", "d", "e"]).
        ({"capabilities": "code"}, "capabilities", "expected a list"),
        # json reads Infinity, TOML inf: a grace or time-out that never ends is refused.
        ({"kill_grace_s": float("inf")}, "kill_grace_s", "must be a finite number"),
        ({"ollama": {"load_timeout_s": float("inf")}}, "ollama.load_timeout_s", "must be a finite number"),
        ({"ollama": {"idle_timeout_s": "slow"}}, "ollama.idle_timeout_s", "expected a number"),
        ({"token": None}, "token", "is required"),
        ({"queue_length": -1}, "queue_length", "zero or more"),
        # Checks carried by the fields of nested tables name the whole path.
        ({"ollama": {"idle_timeout_s": -1}}, "ollama.idle_timeout_s", "must be positive"),
        ({"ollama": {"agentic": "sometimes"}}, "ollama.agentic", "must be one of on_request"),
        ({"time_limits": {"trivial_ms": 0}}, "time_limits.trivial_ms", "must be positive"),
        ({"token": ""}, "token", "must not be empty"),
        ({"agent_id": "a" * 129}, "agent_id", "limit of 128"),
        ({"metrics_listen": "nohost"}, "metrics_listen", "host:port"),
        ({"hub_rate_capacity": 2}, "hub_rate_capacity", "at least 3"),
        ({"progress_reserve": 59}, "progress_reserve", "at most hub_rate_capacity - 2"),
    ],
)
def test_bad_config_names_field(tmp_path: Path, patch: dict[str, object], field: str, problem: str) -> None:
    data = {**ORIGINAL, **patch}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.field == field
    assert problem in str(info.value)
    assert f"'{field}'" in str(info.value)


# What the original's onboarding tool writes, unchanged (its own tests' fixture).
ONBOARDED = {
    "agent_id": "test-agent-001",
    "token": "test-token",
    "hub_url": "ws://localhost:4000/ws",
    "hub_api_url": "http://localhost:4000",
    "repo_dir": "/srv/working",
    "reviewer": "",
    "capabilities": [],
    "confirmation_timeout_ms": 30000,
    "results_dir": "./results",
    "log_file": "./sidecar.log",
}


def test_onboarding_tools_config_json_accepted_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ONBOARDED, indent=2))
    cfg = load_config(path, env={})
    assert cfg.reviewer == "" and cfg.capabilities == [] and cfg.hub_api_url == "http://localhost:4000"
    assert cfg.git_workflow is True
    named = load_config(_write(tmp_path / "b.json", {**ONBOARDED, "reviewer": "alice"}), env={})
    assert named.reviewer == "alice"


def test_blank_urls_and_paths_are_unset_and_the_log_file_is_next_to_the_config(tmp_path: Path) -> None:
    """The original tested these for truthiness: `"ollama_url": ""` meant no Ollama
    (found from outside: it was refused as "must be an http(s) URL"). A relative
    `log_file` resolves next to the config file, as the other paths do."""
    blank = {"ollama_url": "", "hub_api_url": "", "wake_command": "", "results_dir": ""}
    cfg = load_config(_write(tmp_path / "c.json", {**ONBOARDED, **blank}), env={})
    assert (cfg.ollama_url, cfg.hub_api_url, cfg.wake_command, cfg.results_dir) == (None, None, None, None)
    assert cfg.log_file == str(tmp_path / "sidecar.log")
    assert load_config(_write(tmp_path / "d.json", {**ONBOARDED, "log_file": ""}), env={}).log_file is None
    with pytest.raises(ConfigError, match="ollama_url"):
        load_config(_write(tmp_path / "e.json", {**ONBOARDED, "ollama_url": "ftp://x"}), env={})


def test_the_config_file_is_remembered_and_is_not_a_key(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.json", dict(ONBOARDED))
    assert load_config(path, env={}).config_file == str(path.resolve())
    toml = tmp_path / "s.toml"
    toml.write_text('agent_id = "a"\ntoken = "t"\nhub_url = "ws://h:1/ws"\nconfig_file = "x"\n')
    with pytest.raises(ConfigError, match="config_file"):
        load_config(toml, env={})


def _write(path: Path, data: dict[str, object]) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_unknown_json_keys_are_one_warning_naming_them(tmp_path: Path, logs: Any) -> None:
    path = _write(tmp_path / "config.json", {**ORIGINAL, "colour": "blue", "zeal": 3, "debug": True})
    cfg = load_config(path, env={})
    assert cfg.agent_id == ORIGINAL["agent_id"]
    warnings = logs.named("config_keys_ignored")
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["keys"] == "colour,debug,zeal"


@pytest.mark.parametrize(
    ("extra", "warned"),
    [
        ({"openclaw_wake_command": "openclaw cron wake --mode now"}, True),
        ({"openclaw_wake_command": None}, False),  # as the v0.1 example wrote it
        ({"openclaw_wake_command": "openclaw wake", "wake_command": "w ${TASK_ID}"}, False),
    ],
)
def test_the_v01_wake_key_gets_a_warning_that_says_what_to_set(
    tmp_path: Path, logs: Any, extra: dict[str, object], warned: bool
) -> None:
    base = {k: v for k, v in ORIGINAL.items() if k != "wake_command"}
    path = _write(tmp_path / "config.json", {**base, **extra})
    cfg = load_config(path, env={})
    assert cfg.wake_command == extra.get("wake_command")  # never taken as the wake_command
    hints = [w["hint"] for w in logs.named("openclaw_wake_command_not_used")]
    assert len(hints) == warned and all("set wake_command" in h for h in hints)


def test_unknown_toml_key_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text('agent_id = "a1"\ntoken = "t0k3n"\nhub_url = "ws://127.0.0.1:4000/ws"\ncolour = "blue"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.field == "colour" and "unknown key" in str(info.value)


def test_time_limits_and_git_workflow_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.toml"
    path.write_text(
        'agent_id = "a1"\ntoken = "t0k3n"\nhub_url = "ws://127.0.0.1:4000/ws"\ngit_workflow = false\n'
        'reviewer = "bob"\n[time_limits]\nclaude_ms = 5400000\ntrivial_ms = 120000\n'
    )
    cfg = load_config(path, env={})
    assert cfg.git_workflow is False and cfg.reviewer == "bob"
    assert cfg.time_limits.claude_ms == 5_400_000 and cfg.time_limits.trivial_ms == 120_000
    path.write_text(path.read_text() + "unknown_ms = 0\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.field == "time_limits.unknown_ms"


def test_cli_bad_config_exits_nonzero_with_field(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**ORIGINAL, "ping_interval_s": -5}))
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "ping_interval_s" in proc.stderr and "must be positive" in proc.stderr
    assert str(ORIGINAL["token"]) not in proc.stderr
