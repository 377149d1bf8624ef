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

import attrs

from .configfields import (
    ConfigError,
    at_least,
    host_port,
    http_url,
    hub_string,
    non_negative,
    positive,
    positive_or_unbounded,
    setting,
    ws_url,
)
from .configtables import ClaudeConfig, OllamaConfig, PriceOverride, TimeLimits, validate_agentic
from .log import get_logger
from .messages import LIMITS, converter, error_path

log = get_logger("sidecar.config")
# Field metadata: not a setting (not read from a file, not documented as a key).
INTERNAL = "internal"
# Settings where "" means unset, as in the original's config.json.
_BLANK_IS_UNSET = frozenset({"hub_api_url", "ollama_url", "log_file", "results_dir", "wake_command"})

ENV_OVERRIDES = {
    "SIDECAR_HUB_URL": "hub_url",
    "SIDECAR_TOKEN": "token",
    "SIDECAR_AGENT_ID": "agent_id",
    "SIDECAR_STATE_DIR": "state_dir",
}


@attrs.frozen
class Config:
    # Original config.json fields (protocol.md).
    agent_id: str = setting(
        doc="Agent id the hub knows this sidecar by (identify). Hub limit 128 characters.",
        check=hub_string(LIMITS["agent_id"]),
    )
    token: str = setting(
        doc="The agent's hub token. Never logged, never passed to task processes.",
        check=hub_string(LIMITS["token"]),
    )
    hub_url: str = setting(
        doc="Hub WebSocket URL, `ws://HOST:4000/ws` or `wss://…`.",
        check=ws_url,
    )
    hub_api_url: str | None = setting(
        None,
        doc=(
            "Hub HTTP API base (`http://HOST:4000`); pull requests link to the task there (`/api/tasks/ID`)."
        ),
    )
    name: str | None = setting(
        None,
        doc="Display name sent in identify (default: agent_id).",
    )
    repo_dir: str | None = setting(
        None,
        doc=(
            "Working directory for tasks (default: `work/` in the state dir). A git checkout turns on the "
            "branch-and-PR workflow (docs/delivery.md). Relative paths resolve against the config "
            "file's directory."
        ),
    )
    wake_command: str | None = setting(
        None,
        doc=(
            "Shell template for legacy wake tasks; `${TASK_ID}`, `${TASK_JSON}`, "
            "`${TASK_DESCRIPTION}` are passed as environment variables, never substituted into the "
            "text."
        ),
    )
    capabilities: list[str] = setting(
        factory=lambda: ["code"],
        doc="Capabilities announced in identify.",
    )
    confirmation_timeout_ms: int = setting(
        30_000,
        doc="Wake path: how long the woken agent has to create `<task_id>.started`.",
        check=positive,
    )
    results_dir: str | None = setting(
        None,
        doc="Wake path: where the woken agent writes `<task_id>.started` and `<task_id>.json`.",
    )
    log_file: str | None = setting(
        None,
        doc="Also write JSON log lines to this file (stderr always gets them).",
    )
    ollama_url: str | None = setting(
        None,
        doc=(
            "Local Ollama server, sent in identify and `ollama_report`; used when the hub names no endpoint."
        ),
        check=http_url,
    )
    # GitHub user asked to review each pull request ("" or unset: nobody).
    reviewer: str | None = setting(
        None,
        doc=(
            'GitHub user asked to review each pull request (`gh pr create --reviewer`); `""` or '
            "unset: nobody."
        ),
    )
    # Ours.
    # The branch-and-PR workflow for a git `repo_dir` (docs/delivery.md).
    git_workflow: bool = setting(
        True,
        doc=(
            "The branch-and-PR workflow for a git `repo_dir` or a task's `repo` workspace: a branch "
            "per task, push and pull request after a verified success. `false`: tasks run in the tree"
            " as it is."
        ),
    )
    state_dir: str | None = setting(
        None,
        doc=(
            "SQLite store (`sidecar.db`) and per-task logs (`logs/`). Default: `state` next to the "
            "config file."
        ),
    )
    capacity: int = setting(
        1,
        doc="Tasks run at once.",
        check=positive,
    )
    queue_length: int = setting(
        0,
        doc="Tasks held waiting for a slot beyond `capacity` (0: refuse when full).",
        check=non_negative,
    )
    default_timeout_ms: int = setting(
        60_000,
        doc=(
            "Time limit of a shell task whose metadata has no `timeout_ms` (other kinds: "
            "`[time_limits]`). It bounds the whole run, verification and pull request included."
        ),
        check=positive,
    )
    kill_grace_s: float = setting(
        5.0,
        doc=("On time-out/cancel/shutdown: SIGTERM to the task's process group, SIGKILL this much later."),
        check=positive,
    )
    ping_interval_s: float = setting(
        30.0,
        doc="Heartbeat ping period (the hub drops sockets idle for 60 s).",
        check=positive,
    )
    pong_timeout_s: float = setting(
        10.0,
        doc="No pong within this: the connection is dead, reconnect.",
        check=positive,
    )
    connect_timeout_s: float = setting(
        10.0,
        doc="TCP + WebSocket handshake + identify time limit.",
        check=positive,
    )
    backoff_initial_s: float = setting(
        1.0,
        doc="First reconnect delay (doubles, with jitter).",
        check=positive,
    )
    backoff_max_s: float = setting(
        60.0,
        doc="Reconnect delay cap.",
        check=positive,
    )
    auth_backoff_s: float = setting(
        300.0,
        doc="Wait after the hub refuses the token (`invalid_token`), instead of a tight loop.",
        check=positive,
    )
    output_cap_bytes: int = setting(
        1024 * 1024,
        doc="Output kept in a result (the tail); the task log keeps more (`task_log_max_bytes`).",
        check=positive,
    )
    task_log_max_bytes: int = setting(
        256 * 1024 * 1024,
        doc=(
            "Largest task log (`logs/<task_id>.log`); past it the log ends with a line saying so "
            "and the task runs on. One task printing at full speed (~300 MB/s) must not fill "
            "the state disk and stop the agent taking tasks."
        ),
        check=positive,
    )
    max_frame_bytes: int = setting(
        16 * 1024 * 1024,
        doc="Largest frame accepted from the hub.",
        check=positive,
    )
    progress_window_s: float = setting(
        0.1,
        doc="Progress coalescing window per task.",
        check=positive,
    )
    hub_rate_capacity: int = setting(
        60,
        doc=(
            "The hub's normal-tier bucket per agent (accepts, progress, results and reports share "
            "it), as the sidecar models it. The real hub: 60."
        ),
        check=at_least(3),
    )
    hub_rate_refill_per_s: float = setting(
        1.0,
        doc="Its refill, tokens per second. The real hub: 1.",
        check=positive,
    )
    progress_reserve: int = setting(
        12,
        doc=(
            "Tokens of that bucket progress never spends, kept for accepts and results, plus one per "
            "task held. At least 10 is advised; 12 also keeps progress alone from drawing the hub's "
            "`rate_limit_warning` (sent below 20 % of its bucket)."
        ),
        check=non_negative,
    )
    progress_budget_per_min: int | None = setting(
        None,
        doc=(
            "Optional extra cap on task_progress frames per minute, all tasks together (formerly the "
            "only progress budget, default 40). Unset: progress spends whatever the bucket holds "
            "above the reserve."
        ),
        check=positive,
    )
    keepalive_s: float = setting(
        120.0,
        doc=(
            "A silent running task, and one queued for a slot, gets a `status` progress frame this often "
            "(hub stuck detection is 10 min)."
        ),
        check=positive,
    )
    shutdown_grace_s: float = setting(
        10.0,
        doc="On SIGTERM: how long to keep flushing results and progress before exiting.",
        check=positive,
    )
    wake_attempt_timeout_s: float = setting(
        60.0,
        doc=(
            "Wake path: time limit of one wake command attempt, unless the agent has confirmed "
            "(`<task_id>.started`) by then: a command that runs the agent in the foreground then "
            "runs on under the task's limit (`inf`: the task's limit only)."
        ),
        check=positive_or_unbounded,
    )
    # After the hub's restart_sidecar: how long running tasks may take to end first.
    restart_drain_s: float = setting(
        300.0,
        doc=(
            "After the hub's `restart_sidecar`: how long the running tasks may take to end (no new "
            "ones are taken) before the graceful restart cancels them."
        ),
        check=non_negative,
    )
    # Local /healthz and /metrics endpoint, "host:port" (off when unset).
    metrics_listen: str | None = setting(
        None,
        doc=(
            "`host:port` for `/healthz` and `/metrics` (Prometheus). Off when unset; use "
            "`127.0.0.1:9464` unless a scraper on another host needs it."
        ),
        check=host_port,
    )
    ollama: OllamaConfig = setting(
        factory=OllamaConfig,
        doc="Table `[ollama]`, below.",
    )
    claude: ClaudeConfig = setting(
        factory=ClaudeConfig,
        doc="Table `[claude]`, below.",
    )
    time_limits: TimeLimits = setting(
        factory=TimeLimits,
        doc="Table `[time_limits]`, below: default limits of Ollama, Claude and wake tasks.",
    )
    prices: dict[str, PriceOverride] = setting(
        factory=dict,
        doc=(
            'Table `[prices."MODEL"]` with `input_per_mtok`, `output_per_mtok` (USD per million '
            "tokens): overrides the bundled price catalogue for that model."
        ),
    )
    # Not a setting: the file this config was read from (None: the environment
    # only). The branch workflow leaves it out of a checkout's clean check.
    config_file: str | None = attrs.field(default=None, metadata={INTERNAL: True})

    @property
    def display_name(self) -> str:
        return self.name or self.agent_id

    def resolved_state_dir(self) -> Path:
        assert self.state_dir is not None, "load_config always resolves state_dir"
        return Path(self.state_dir)


def _validate(cfg: Config) -> None:
    """What no single field can check alone (each field checks itself: `configfields.setting`)."""
    validate_agentic(cfg.ollama)
    if cfg.progress_reserve > cfg.hub_rate_capacity - 2:
        raise ConfigError(
            "progress_reserve",
            f"must be at most hub_rate_capacity - 2, got {cfg.progress_reserve!r}",
        )


def config_from_mapping(
    data: Mapping[str, Any], *, base_dir: Path, source: str | None = None, lenient: bool = False
) -> Config:
    """Build a Config from parsed file contents; relative paths resolve against base_dir.

    An unknown top-level key is an error, except with `lenient` (the original's
    config.json, which its own tools may extend): such keys are then dropped
    and named in one warning, as the original ignored them.
    """
    known = {a.name for a in attrs.fields(Config) if not a.metadata.get(INTERNAL)}
    unknown = sorted(set(data) - known)
    if unknown and not lenient:
        raise ConfigError(unknown[0], "unknown key", source)
    if unknown:
        log.warning("config_keys_ignored", source=source, keys=",".join(unknown))
        if data.get("openclaw_wake_command") and not data.get("wake_command"):
            # The v0.1 sidecar's fire-and-forget wake: taking it as wake_command
            # would make every wake task wait for a `.started` file that such an
            # agent never writes.
            log.warning(
                "openclaw_wake_command_not_used",
                source=source,
                hint=(
                    "set wake_command (with ${TASK_ID}, ${TASK_JSON} or ${TASK_DESCRIPTION}); the woken "
                    "agent must create results_dir/<task_id>.started and write <task_id>.json"
                ),
            )
        data = {k: v for k, v in data.items() if k in known}
    for required in ("agent_id", "token", "hub_url"):
        if required not in data or data[required] is None:
            raise ConfigError(required, "is required", source)
    # None is unset; so is "" for a setting that names a URL, a file or a command
    # (the original tested them for truthiness: `"ollama_url": ""` meant none).
    clean = {k: v for k, v in data.items() if v is not None and not (v == "" and k in _BLANK_IS_UNSET)}
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

    def under_base(path: str | None) -> str | None:
        return str(base_dir / path) if path and not Path(path).is_absolute() else path

    return attrs.evolve(
        cfg,
        state_dir=str(state_dir),
        repo_dir=under_base(cfg.repo_dir),
        results_dir=under_base(cfg.results_dir),
        log_file=under_base(cfg.log_file),
    )


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
    cfg = config_from_mapping(data, base_dir=base_dir, source=source, lenient=is_json)
    return attrs.evolve(cfg, config_file=str(Path(path).resolve())) if path is not None else cfg


__all__ = [
    "ENV_OVERRIDES",
    "INTERNAL",
    "ClaudeConfig",
    "Config",
    "ConfigError",
    "OllamaConfig",
    "PriceOverride",
    "TimeLimits",
    "config_from_mapping",
    "load_config",
]
