"""The config's tables: `[ollama]`, `[claude]`, `[time_limits]` and `[prices."MODEL"]`.

Each field carries its doc text and its check (`configfields.setting`).
"""

from __future__ import annotations

import attrs

from .configfields import ConfigError, one_of, positive, setting

AGENTIC_MODES = ("on_request", "always", "never")
AGENTIC_SANDBOXES = ("none", "bwrap", "auto")
_TIERS = ("trivial", "standard", "complex")


@attrs.frozen
class OllamaConfig:
    default_model: str = setting(
        "qwen3:8b",
        doc="Model when the hub's routing decision names none.",
    )
    idle_timeout_s: float = setting(
        60.0,
        doc="A stream silent this long (once it has begun) fails (transient: retried).",
        check=positive,
    )
    connect_timeout_s: float = setting(
        10.0,
        doc="Connecting to the Ollama server.",
        check=positive,
    )
    load_timeout_s: float = setting(
        300.0,
        doc=(
            "How long Ollama may take to begin its answer (a cold model load) before the task fails "
            "(transient: retried)."
        ),
        check=positive,
    )
    # The agentic tool loop (docs/agentic.md).
    agentic: str = setting(
        "on_request",
        doc=(
            "When Ollama tasks run the agentic tool loop (docs/agentic.md): `on_request` "
            "(`metadata.agentic` or `routing_decision.agentic` is true), `always`, or `never`."
        ),
        check=one_of(*AGENTIC_MODES),
    )
    agentic_max_iterations: dict[str, int] = setting(
        factory=dict,
        doc=(
            "Turn limit per tier, e.g. `{standard = 15}` (defaults: trivial 5, standard 10, complex "
            "20); a task's `metadata.max_iterations` wins."
        ),
    )
    agentic_command_timeout_s: float = setting(
        30.0,
        doc=(
            "`run_command`'s time limit when the model names none (never more than what is left of "
            "the task's limit)."
        ),
        check=positive,
    )
    agentic_env: dict[str, str] = setting(
        factory=dict,
        doc=(
            "Variables set for `run_command` (beside PATH, HOME, LANG). Never the hub token or a "
            "`SIDECAR_*` name."
        ),
    )
    agentic_env_pass: list[str] = setting(
        factory=list,
        doc="Names of the sidecar's own variables passed on to `run_command`.",
    )
    agentic_sandbox: str = setting(
        "none",
        doc=(
            "`none`, `bwrap` (run commands in bubblewrap; a task fails if the host has no `bwrap`) or"
            " `auto` (bwrap when present)."
        ),
        check=one_of(*AGENTIC_SANDBOXES),
    )


@attrs.frozen
class ClaudeConfig:
    binary: str = setting(
        "claude",
        doc="The Claude Code CLI (name on PATH or path).",
    )
    extra_args: list[str] = setting(
        factory=list,
        doc="Extra CLI arguments, appended.",
    )
    # Extra environment for the CLI (e.g. ANTHROPIC_BASE_URL, CLAUDE_CODE_MAX_RETRIES).
    env: dict[str, str] = setting(
        factory=dict,
        doc="Extra environment for the CLI (e.g. `ANTHROPIC_BASE_URL`, `CLAUDE_CODE_MAX_RETRIES`).",
    )
    baseline_model: str = setting(
        "claude-sonnet-4-5",
        doc="Model whose price gives `equivalent_claude_cost_usd` for Ollama results.",
    )


@attrs.frozen
class TimeLimits:
    """Default time limit per kind of work, for a task without `metadata.timeout_ms`.

    A kind left unset (None) is bounded by the task's tier: LLM work and woken
    agents take minutes, not the shell's 60 s (`default_timeout_ms`).
    """

    ollama_ms: int | None = setting(
        None,
        doc="Limit of every Ollama task without `timeout_ms` (unset: by tier, below).",
        check=positive,
    )
    claude_ms: int | None = setting(
        None,
        doc="Limit of every Claude task without `timeout_ms` (unset: by tier).",
        check=positive,
    )
    wake_ms: int | None = setting(
        None,
        doc="Limit of every wake task without `timeout_ms` (unset: by tier).",
        check=positive,
    )
    trivial_ms: int = setting(
        600_000,
        doc="Ollama / Claude / wake task of tier `trivial` (10 min).",
        check=positive,
    )
    standard_ms: int = setting(
        1_800_000,
        doc="… of tier `standard` (30 min).",
        check=positive,
    )
    complex_ms: int = setting(
        1_800_000,
        doc="… of tier `complex` (30 min).",
        check=positive,
    )
    unknown_ms: int = setting(
        1_800_000,
        doc="… of no or an unknown tier (30 min).",
        check=positive,
    )


@attrs.frozen
class PriceOverride:
    """USD per million tokens for one model, overriding the price catalogue."""

    input_per_mtok: float
    output_per_mtok: float


def validate_agentic(o: OllamaConfig) -> None:
    for tier, n in o.agentic_max_iterations.items():
        if tier not in _TIERS:
            raise ConfigError(f"ollama.agentic_max_iterations.{tier}", f"not a tier ({', '.join(_TIERS)})")
        if n < 1:
            raise ConfigError(f"ollama.agentic_max_iterations.{tier}", f"must be at least 1, got {n!r}")
    for name in [*o.agentic_env, *o.agentic_env_pass]:
        if not name or "=" in name or "\0" in name or name.startswith("SIDECAR_"):
            raise ConfigError("ollama.agentic_env", f"not an allowed variable name: {name!r}")
