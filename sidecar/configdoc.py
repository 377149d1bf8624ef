"""The configuration reference table, generated from the `Config` attrs classes.

Each field's text is its own (`configfields.setting`'s `doc`).
`python -m sidecar.configdoc` prints the Markdown table that
`docs/configuration.md` holds between its `BEGIN GENERATED` / `END GENERATED`
markers; a test checks the two agree, so a new config field cannot go
undocumented.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from .config import ENV_OVERRIDES, INTERNAL, ClaudeConfig, Config, OllamaConfig, TimeLimits

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
        if not f.metadata.get(INTERNAL):
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
        rows.append(f"| `{name}` | {_default(f)} | {env} | {f.metadata.get('doc') or 'UNDOCUMENTED'} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(render(), end="")
