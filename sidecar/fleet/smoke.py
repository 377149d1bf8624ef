"""join's smoke test: an `echo` task through the hub's API, followed to its end.

Marked `metadata.onboarding_test` and addressed to the new agent. Without a
service, join runs a sidecar of its own on the new config for the length of
the test (`open_sidecar`, in this process and its nursery), and stops it
cleanly when the test ends, whatever the outcome: nothing is left running.
"""

from __future__ import annotations

import secrets

from ..config import Config
from .hubapi import HubAPI
from .submit import describe_end, exit_code_of, follow

SMOKE_OUTPUT = "sidecar-join-ok"


class SmokeFailed(Exception):
    pass


def smoke_task(agent_id: str) -> dict[str, object]:
    return {
        "description": f"sidecar join smoke test for {agent_id}",
        "priority": "normal",
        "complexity_tier": "trivial",
        "max_retries": 1,
        "metadata": {
            "shell_command": f"echo {SMOKE_OUTPUT}",
            "onboarding_test": True,
            "assign_to": agent_id,
            "smoke_id": secrets.token_hex(4),
        },
    }


async def run_smoke(api: HubAPI, agent_id: str, config: Config | None, timeout_s: float) -> str:
    """Run the test; what it printed, or raise SmokeFailed saying why."""
    answer = await api.submit(smoke_task(agent_id))
    task_id = str(answer["task_id"])
    if config is None:
        task = await follow(api, task_id, timeout_s)
    else:
        from ..app import open_sidecar

        async with open_sidecar(config):
            task = await follow(api, task_id, timeout_s)
    if task is None:
        raise SmokeFailed(f"task {task_id} not finished after {timeout_s:g} s (is the agent connected?)")
    if exit_code_of(task.get("status")) != 0:
        raise SmokeFailed(f"task {task_id} {describe_end(task)}")
    return f"task {task_id} {describe_end(task)}"
