"""Turn a task into the prompt an LLM executor sends (Ollama now, Claude later).

The hub puts the instruction in `description`; the context it knows (repo,
branch, file hints, success criteria) goes into a system text, present only
when at least one of those fields says something.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from .messages import Task

SYSTEM_INTRO = "You are an agent working on a task assigned by the AgentCom hub."


@attrs.frozen
class Prompt:
    """System text (None when the task carries no context) and user text."""

    system: str | None
    user: str

    def messages(self) -> list[dict[str, str]]:
        """Chat messages in the shape Ollama's `/api/chat` (and most chat APIs) take."""
        out: list[dict[str, str]] = []
        if self.system:
            out.append({"role": "system", "content": self.system})
        out.append({"role": "user", "content": self.user})
        return out

    def combined(self) -> str:
        """One text, for tools that take no separate system prompt."""
        return f"{self.system}\n\n{self.user}" if self.system else self.user


def _item_text(item: Any) -> str:
    """A file hint or criterion as one line: strings as they are, objects compactly."""
    if isinstance(item, str):
        return item.strip()
    if isinstance(item, dict):
        # Hub file hints are sometimes {"path": …, "reason": …}; show them readably.
        path = item.get("path") or item.get("file")
        if isinstance(path, str) and path:
            reason = item.get("reason") or item.get("why")
            return f"{path} ({reason})" if isinstance(reason, str) and reason else path
        for key in ("description", "criterion", "text"):
            value = item.get(key)
            if isinstance(value, str) and value:
                return value
    return json.dumps(item, ensure_ascii=False, separators=(",", ":"), default=str)


def _bullets(items: list[Any]) -> list[str]:
    lines = [_item_text(i) for i in items if i is not None]
    return [f"- {line}" for line in lines if line]


def system_text(task: Task) -> str | None:
    """The task's context as a system text, or None when it has none."""
    parts: list[str] = []
    if task.repo:
        parts.append(f"Repository: {task.repo}")
    if task.branch:
        parts.append(f"Branch: {task.branch}")
    hints = _bullets(task.file_hints)
    if hints:
        parts.append("Files likely relevant:\n" + "\n".join(hints))
    criteria = _bullets(task.success_criteria)
    if criteria:
        parts.append("The task is done when:\n" + "\n".join(criteria))
    if not parts:
        return None
    return SYSTEM_INTRO + "\n\n" + "\n\n".join(parts)


def build_prompt(task: Task) -> Prompt:
    """The prompt for `task`: user text is the description, verbatim."""
    return Prompt(system=system_text(task), user=task.description)
