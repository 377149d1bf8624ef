"""Sidecar configuration: our TOML file or the original sidecar's config.json.

Both load into one attrs `Config` through the shared cattrs converter. Any
problem raises `ConfigError` naming the field and what is wrong with it.
Environment variables SIDECAR_HUB_URL, SIDECAR_TOKEN, SIDECAR_AGENT_ID and
SIDECAR_STATE_DIR override the file.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import attrs

from .log import get_logger
from .messages import LIMITS, converter, error_path

log = get_logger("sidecar.config")

ENV_OVERRIDES = {
    "SIDECAR_HUB_URL": "hub_url",
    "SIDECAR_TOKEN": "token",
    "SIDECAR_AGENT_ID": "agent_id",
    "SIDECAR_STATE_DIR": "state_dir",
}


class ConfigError(ValueError):
    """A config problem; `field` is the dotted path of the bad key."""

    def __init__(self, field: str, problem: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field '{field}': {problem}")
        self.field = field
        self.problem = problem


@attrs.frozen
class OllamaConfig:
    default_model: str = "qwen3:8b"
    idle_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    load_timeout_s: float = 300.0
    # The agentic tool loop (docs/agentic.md).
    agentic: str = "on_request"
    agentic_max_iterations: dict[str, int] = attrs.field(factory=dict)
    agentic_command_timeout_s: float = 30.0
    agentic_env: dict[str, str] = attrs.field(factory=dict)
    agentic_env_pass: list[str] = attrs.field(factory=list)
    agentic_sandbox: str = "none"


@attrs.frozen
class ClaudeConfig:
    binary: str = "claude"
    extra_args: list[str] = attrs.field(factory=list)
    # Extra environment for the CLI (e.g. ANTHROPIC_BASE_URL, CLAUDE_CODE_MAX_RETRIES).
    env: dict[str, str] = attrs.field(factory=dict)
    baseline_model: str = "claude-sonnet-4-5"


@attrs.frozen
class TimeLimits:
    """Default time limit per kind of work, for a task without `metadata.timeout_ms`.

    A kind left unset (None) is bounded by the task's tier: LLM work and woken
    agents take minutes, not the shell's 60 s (`default_timeout_ms`).
    """

    ollama_ms: int | None = None
    claude_ms: int | None = None
    wake_ms: int | None = None
    trivial_ms: int = 600_000
    standard_ms: int = 1_800_000
    complex_ms: int = 1_800_000
    unknown_ms: int = 1_800_000


@attrs.frozen
class PriceOverride:
    """USD per million tokens for one model, overriding the price catalogue."""

    input_per_mtok: float
    output_per_mtok: float


@attrs.frozen
class Config:
    # Original config.json fields (protocol.md).
    agent_id: str
    token: str
    hub_url: str
    hub_api_url: str | None = None
    name: str | None = None
    repo_dir: str | None = None
    wake_command: str | None = None
    capabilities: list[str] = attrs.field(factory=lambda: ["code"])
    confirmation_timeout_ms: int = 30_000
    results_dir: str | None = None
    log_file: str | None = None
    ollama_url: str | None = None
    # GitHub user asked to review each pull request ("" or unset: nobody).
    reviewer: str | None = None
    # Ours.
    # The branch-and-PR workflow for a git `repo_dir` (docs/delivery.md).
    git_workflow: bool = True
    state_dir: str | None = None
    capacity: int = 1
    queue_length: int = 0
    default_timeout_ms: int = 60_000
    kill_grace_s: float = 5.0
    ping_interval_s: float = 30.0
    pong_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    auth_backoff_s: float = 300.0
    output_cap_bytes: int = 1024 * 1024
    max_frame_bytes: int = 16 * 1024 * 1024
    progress_window_s: float = 0.1
    hub_rate_capacity: int = 60
    hub_rate_refill_per_s: float = 1.0
    progress_reserve: int = 12
    progress_budget_per_min: int | None = None
    keepalive_s: float = 120.0
    shutdown_grace_s: float = 10.0
    wake_attempt_timeout_s: float = 60.0
    # After the hub's restart_sidecar: how long running tasks may take to end first.
    restart_drain_s: float = 300.0
    # Local /healthz and /metrics endpoint, "host:port" (off when unset).
    metrics_listen: str | None = None
    ollama: OllamaConfig = attrs.field(factory=OllamaConfig)
    claude: ClaudeConfig = attrs.field(factory=ClaudeConfig)
    time_limits: TimeLimits = attrs.field(factory=TimeLimits)
    prices: dict[str, PriceOverride] = attrs.field(factory=dict)

    @property
    def display_name(self) -> str:
        return self.name or self.agent_id

    def resolved_state_dir(self) -> Path:
        assert self.state_dir is not None, "load_config always resolves state_dir"
        return Path(self.state_dir)


_POSITIVE = (
    "capacity",
    "default_timeout_ms",
    "kill_grace_s",
    "ping_interval_s",
    "pong_timeout_s",
    "connect_timeout_s",
    "backoff_initial_s",
    "backoff_max_s",
    "output_cap_bytes",
    "max_frame_bytes",
    "progress_window_s",
    "hub_rate_capacity",
    "hub_rate_refill_per_s",
    "keepalive_s",
    "confirmation_timeout_ms",
    "wake_attempt_timeout_s",
)


AGENTIC_MODES = ("on_request", "always", "never")
AGENTIC_SANDBOXES = ("none", "bwrap", "auto")
_TIERS = ("trivial", "standard", "complex")


def _validate_agentic(o: OllamaConfig) -> None:
    if o.agentic not in AGENTIC_MODES:
        raise ConfigError("ollama.agentic", f"must be one of {', '.join(AGENTIC_MODES)}, got {o.agentic!r}")
    if o.agentic_sandbox not in AGENTIC_SANDBOXES:
        raise ConfigError(
            "ollama.agentic_sandbox",
            f"must be one of {', '.join(AGENTIC_SANDBOXES)}, got {o.agentic_sandbox!r}",
        )
    for tier, n in o.agentic_max_iterations.items():
        if tier not in _TIERS:
            raise ConfigError(f"ollama.agentic_max_iterations.{tier}", f"not a tier ({', '.join(_TIERS)})")
        if n < 1:
            raise ConfigError(f"ollama.agentic_max_iterations.{tier}", f"must be at least 1, got {n!r}")
    if o.agentic_command_timeout_s <= 0:
        raise ConfigError("ollama.agentic_command_timeout_s", "must be positive")
    for name in [*o.agentic_env, *o.agentic_env_pass]:
        if not name or "=" in name or "\0" in name or name.startswith("SIDECAR_"):
            raise ConfigError("ollama.agentic_env", f"not an allowed variable name: {name!r}")


def _validate(cfg: Config) -> None:
    _validate_agentic(cfg.ollama)
    for key in ("agent_id", "token"):
        value = getattr(cfg, key)
        if not value:
            raise ConfigError(key, "must not be empty")
        if len(value) > LIMITS[key]:
            raise ConfigError(key, f"longer than the hub's limit of {LIMITS[key]} characters")
    url = urlparse(cfg.hub_url)
    if url.scheme not in ("ws", "wss") or not url.hostname:
        raise ConfigError("hub_url", f"must be a ws:// or wss:// URL, got {cfg.hub_url!r}")
    for key in _POSITIVE:
        if getattr(cfg, key) <= 0:
            raise ConfigError(key, f"must be positive, got {getattr(cfg, key)!r}")
    if cfg.restart_drain_s < 0:
        raise ConfigError("restart_drain_s", f"must be zero or more, got {cfg.restart_drain_s!r}")
    for name in (
        "ollama_ms",
        "claude_ms",
        "wake_ms",
        "trivial_ms",
        "standard_ms",
        "complex_ms",
        "unknown_ms",
    ):
        value = getattr(cfg.time_limits, name)
        if value is not None and value <= 0:
            raise ConfigError(f"time_limits.{name}", f"must be positive, got {value!r}")
    if cfg.progress_budget_per_min is not None and cfg.progress_budget_per_min <= 0:
        raise ConfigError(
            "progress_budget_per_min", f"must be positive (or unset), got {cfg.progress_budget_per_min!r}"
        )
    if cfg.hub_rate_capacity < 3:
        raise ConfigError("hub_rate_capacity", f"must be at least 3, got {cfg.hub_rate_capacity!r}")
    if not 0 <= cfg.progress_reserve <= cfg.hub_rate_capacity - 2:
        raise ConfigError(
            "progress_reserve",
            f"must be 0 or more and at most hub_rate_capacity - 2, got {cfg.progress_reserve!r}",
        )
    if cfg.queue_length < 0:
        raise ConfigError("queue_length", f"must be zero or more, got {cfg.queue_length!r}")
    if cfg.metrics_listen is not None:
        host, sep, port = cfg.metrics_listen.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ConfigError("metrics_listen", f"must be host:port, got {cfg.metrics_listen!r}")
    if cfg.ollama_url is not None:
        o = urlparse(cfg.ollama_url if "://" in cfg.ollama_url else "http://" + cfg.ollama_url)
        if o.scheme not in ("http", "https") or not o.hostname:
            raise ConfigError("ollama_url", f"must be an http(s) URL, got {cfg.ollama_url!r}")


def config_from_mapping(
    data: Mapping[str, Any], *, base_dir: Path, source: str | None = None, lenient: bool = False
) -> Config:
    """Build a Config from parsed file contents; relative paths resolve against base_dir.

    An unknown top-level key is an error, except with `lenient` (the original's
    config.json, which its own tools may extend): such keys are then dropped
    and named in one warning, as the original ignored them.
    """
    known = {a.name for a in attrs.fields(Config)}
    unknown = sorted(set(data) - known)
    if unknown and not lenient:
        raise ConfigError(unknown[0], "unknown key", source)
    if unknown:
        log.warning("config_keys_ignored", source=source, keys=",".join(unknown))
        data = {k: v for k, v in data.items() if k in known}
    for required in ("agent_id", "token", "hub_url"):
        if required not in data or data[required] is None:
            raise ConfigError(required, "is required", source)
    clean = {k: v for k, v in data.items() if v is not None}
    try:
        cfg = converter.structure(clean, Config)
    except Exception as exc:
        path, problem = error_path(exc)
        raise ConfigError(path.removeprefix("$."), problem, source) from exc
    try:
        _validate(cfg)
    except ConfigError as exc:
        raise ConfigError(exc.field, exc.problem, source) from None
    state_dir = Path(cfg.state_dir) if cfg.state_dir else base_dir / "state"
    if not state_dir.is_absolute():
        state_dir = base_dir / state_dir
    repo_dir = cfg.repo_dir
    if repo_dir and not Path(repo_dir).is_absolute():
        repo_dir = str(base_dir / repo_dir)
    results_dir = cfg.results_dir
    if results_dir and not Path(results_dir).is_absolute():
        results_dir = str(base_dir / results_dir)
    return attrs.evolve(cfg, state_dir=str(state_dir), repo_dir=repo_dir, results_dir=results_dir)


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> Config:
    """Load a TOML or JSON config file (or none: env only) and apply env overrides."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    source: str | None = None
    is_json = False
    base_dir = Path.cwd()
    if path is not None:
        p = Path(path)
        source = str(p)
        base_dir = p.resolve().parent
        try:
            raw = p.read_bytes()
        except OSError as exc:
            raise ConfigError("<file>", f"cannot read {p}: {exc.strerror}", None) from exc
        try:
            if p.suffix == ".json" or raw.lstrip().startswith(b"{"):
                is_json = True
                loaded = json.loads(raw)
            else:
                loaded = tomllib.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError("<file>", f"cannot parse: {exc}", source) from exc
        if not isinstance(loaded, dict):
            raise ConfigError("<file>", "top level must be an object/table", source)
        data = loaded
    for var, key in ENV_OVERRIDES.items():
        if env.get(var):
            data[key] = env[var]
    return config_from_mapping(data, base_dir=base_dir, source=source, lenient=is_json)
