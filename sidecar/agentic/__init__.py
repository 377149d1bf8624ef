"""The agentic Ollama path: a ReAct loop over sandboxed workspace tools.

`wants_agentic` is the trigger; `runner.run_agentic` builds the loop's parts
for one task; `loop.run_loop` is the loop itself. See docs/agentic.md.
"""

from __future__ import annotations

from ..messages import Task


def wants_agentic(task: Task, mode: str) -> bool:
    """True when this Ollama task runs the tool loop.

    `mode` is the config's `ollama.agentic`: "always", "never", or "on_request"
    (the default): then `metadata.agentic` or `routing_decision.agentic` must be true.
    """
    if mode == "always":
        return True
    if mode == "never":
        return False
    decision = task.routing_decision
    return task.metadata.get("agentic") is True or (decision is not None and decision.agentic is True)
