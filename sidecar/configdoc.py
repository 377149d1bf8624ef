"""The configuration reference table, generated from the `Config` attrs classes.

`python -m sidecar.configdoc` prints the Markdown table that
`docs/configuration.md` holds between its `BEGIN GENERATED` / `END GENERATED`
markers; a test checks the two agree, so a new config field cannot go
undocumented.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from .config import ENV_OVERRIDES, ClaudeConfig, Config, OllamaConfig, TimeLimits

DESCRIPTIONS: dict[str, str] = {
    "agent_id": "Agent id the hub knows this sidecar by (identify). Hub limit 128 characters.",
    "token": "The agent's hub token. Never logged, never passed to task processes.",
    "hub_url": "Hub WebSocket URL, `ws://HOST:4000/ws` or `wss://…`.",
    "hub_api_url": "Hub HTTP API base (`http://HOST:4000`); pull requests link to the task there "
    "(`/api/tasks/ID`).",
    "name": "Display name sent in identify (default: agent_id).",
    "repo_dir": "Working directory for tasks (default: the state dir). A git checkout turns on the "
    "branch-and-PR workflow (docs/delivery.md). Relative paths resolve against the config file's directory.",
    "reviewer": 'GitHub user asked to review each pull request (`gh pr create --reviewer`); `""` '
    "or unset: nobody.",
    "git_workflow": "The branch-and-PR workflow for a git `repo_dir` or a task's `repo` workspace: a "
    "branch per task, push and pull request after a verified success. `false`: tasks run in the "
    "tree as it is.",
    "wake_command": "Shell template for legacy wake tasks; `${TASK_ID}`, `${TASK_JSON}`, "
    "`${TASK_DESCRIPTION}` are passed as environment variables, never substituted into the text.",
    "capabilities": "Capabilities announced in identify.",
    "confirmation_timeout_ms": "Wake path: how long the woken agent has to create `<task_id>.started`.",
    "results_dir": "Wake path: where the woken agent writes `<task_id>.started` and `<task_id>.json`.",
    "log_file": "Also write JSON log lines to this file (stderr always gets them).",
    "ollama_url": "Local Ollama server, sent in identify and `ollama_report`; used when the hub "
    "names no endpoint.",
    "state_dir": "SQLite store (`sidecar.db`) and per-task logs (`logs/`). Default: `state` next to "
    "the config file.",
    "capacity": "Tasks run at once.",
    "queue_length": "Tasks held waiting for a slot beyond `capacity` (0: refuse when full).",
    "default_timeout_ms": "Time limit of a shell task whose metadata has no `timeout_ms` (other kinds: "
    "`[time_limits]`). It bounds the whole run, verification and pull request included.",
    "kill_grace_s": "On time-out/cancel/shutdown: SIGTERM to the task's process group, SIGKILL this "
    "much later.",
    "ping_interval_s": "Heartbeat ping period (the hub drops sockets idle for 60 s).",
    "pong_timeout_s": "No pong within this: the connection is dead, reconnect.",
    "connect_timeout_s": "TCP + WebSocket handshake + identify time limit.",
    "backoff_initial_s": "First reconnect delay (doubles, with jitter).",
    "backoff_max_s": "Reconnect delay cap.",
    "auth_backoff_s": "Wait after the hub refuses the token (`invalid_token`), instead of a tight loop.",
    "output_cap_bytes": "Output kept in a result (the tail); the task log keeps everything.",
    "max_frame_bytes": "Largest frame accepted from the hub.",
    "progress_window_s": "Progress coalescing window per task.",
    "hub_rate_capacity": "The hub's normal-tier bucket per agent (accepts, progress, results "
    "and reports share it), as the sidecar models it. The real hub: 60.",
    "hub_rate_refill_per_s": "Its refill, tokens per second. The real hub: 1.",
    "progress_reserve": "Tokens of that bucket progress never spends, kept for accepts and "
    "results, plus one per task held. At least 10 is advised; 12 also keeps progress alone from "
    "drawing the hub's `rate_limit_warning` (sent below 20 % of its bucket).",
    "progress_budget_per_min": "Optional extra cap on task_progress frames per minute, all tasks "
    "together (formerly the only progress budget, default 40). Unset: progress spends whatever the "
    "bucket holds above the reserve.",
    "keepalive_s": "A silent running task gets a `status` progress frame this often (hub stuck "
    "detection is 10 min).",
    "shutdown_grace_s": "On SIGTERM: how long to keep flushing results and progress before exiting.",
    "wake_attempt_timeout_s": "Wake path: time limit of one wake command attempt.",
    "restart_drain_s": "After the hub's `restart_sidecar`: how long the running tasks may take to "
    "end (no new ones are taken) before the graceful restart cancels them.",
    "metrics_listen": "`host:port` for `/healthz` and `/metrics` (Prometheus). Off when unset; use "
    "`127.0.0.1:9464` unless a scraper on another host needs it.",
    "ollama": "Table `[ollama]`, below.",
    "claude": "Table `[claude]`, below.",
    "time_limits": "Table `[time_limits]`, below: default limits of Ollama, Claude and wake tasks.",
    "prices": 'Table `[prices."MODEL"]` with `input_per_mtok`, `output_per_mtok` (USD per million '
    "tokens): overrides the bundled price catalogue for that model.",
    "ollama.default_model": "Model when the hub's routing decision names none.",
    "ollama.idle_timeout_s": "A stream silent this long (once it has begun) fails (transient: retried).",
    "ollama.load_timeout_s": "How long Ollama may take to begin its answer (a cold model load) "
    "before the task fails (transient: retried).",
    "ollama.connect_timeout_s": "Connecting to the Ollama server.",
    "ollama.agentic": "When Ollama tasks run the agentic tool loop (docs/agentic.md): `on_request` "
    "(`metadata.agentic` or `routing_decision.agentic` is true), `always`, or `never`.",
    "ollama.agentic_max_iterations": "Turn limit per tier, e.g. `{standard = 15}` (defaults: trivial 5, "
    "standard 10, complex 20); a task's `metadata.max_iterations` wins.",
    "ollama.agentic_command_timeout_s": "`run_command`'s time limit when the model names none "
    "(never more than what is left of the task's limit).",
    "ollama.agentic_env": "Variables set for `run_command` (beside PATH, HOME, LANG). Never the hub "
    "token or a `SIDECAR_*` name.",
    "ollama.agentic_env_pass": "Names of the sidecar's own variables passed on to `run_command`.",
    "ollama.agentic_sandbox": "`none`, `bwrap` (run commands in bubblewrap; a task fails if the host "
    "has no `bwrap`) or `auto` (bwrap when present).",
    "claude.binary": "The Claude Code CLI (name on PATH or path).",
    "claude.extra_args": "Extra CLI arguments, appended.",
    "claude.env": "Extra environment for the CLI (e.g. `ANTHROPIC_BASE_URL`, `CLAUDE_CODE_MAX_RETRIES`).",
    "time_limits.ollama_ms": "Limit of every Ollama task without `timeout_ms` (unset: by tier, below).",
    "time_limits.claude_ms": "Limit of every Claude task without `timeout_ms` (unset: by tier).",
    "time_limits.wake_ms": "Limit of every wake task without `timeout_ms` (unset: by tier).",
    "time_limits.trivial_ms": "Ollama / Claude / wake task of tier `trivial` (10 min).",
    "time_limits.standard_ms": "… of tier `standard` (30 min).",
    "time_limits.complex_ms": "… of tier `complex` (30 min).",
    "time_limits.unknown_ms": "… of no or an unknown tier (30 min).",
    "claude.baseline_model": "Model whose price gives `equivalent_claude_cost_usd` for Ollama results.",
}

_NESTED: dict[str, type[Any]] = {"ollama": OllamaConfig, "claude": ClaudeConfig, "time_limits": TimeLimits}


def _default(field: Any) -> str:
    default = field.default
    if default is attrs.NOTHING:
        return "required"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        default = default.factory()
    if isinstance(default, (OllamaConfig, ClaudeConfig, TimeLimits)):
        return "(table)"
    if default is None:
        return "unset"
    return f"`{json.dumps(default)}`"


def fields() -> list[tuple[str, Any]]:
    """Every config key, dotted for nested tables, with its attrs field."""
    out: list[tuple[str, Any]] = []
    for f in attrs.fields(Config):
        out.append((f.name, f))
    for prefix, cls in _NESTED.items():
        for f in attrs.fields(cls):
            out.append((f"{prefix}.{f.name}", f))
    return out


def render() -> str:
    env_of = {key: var for var, key in ENV_OVERRIDES.items()}
    rows = ["| key | default | env override | meaning |", "|---|---|---|---|"]
    for name, f in fields():
        env = f"`{env_of[name]}`" if name in env_of else ""
        rows.append(f"| `{name}` | {_default(f)} | {env} | {DESCRIPTIONS.get(name, 'UNDOCUMENTED')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
