"""A small AgentCom hub of our own, speaking the real hub's protocol.

Used by `sidecar demo`, the integration tests and the chaos suite. It checks
frames, rate limits and task generations as the real hub does, so a sidecar
that would misbehave against the real hub fails against this one. It is a test
bench, not a scheduler.

    async with open_dev_hub(tokens={"agent-1": "tok"}) as hub:
        task_id = hub.submit({"description": "", "metadata": {"shell_command": "echo hi"}})
        await hub.wait_until(lambda: hub.task(task_id).status == "completed")
"""

from .config import HubConfig
from .hub import DevHub
from .ratelimit import RateLimits, TierLimit, tier_of
from .schemas import schemas_json, validate_ws_message
from .server import open_dev_hub, run_hub_cli, serve_forever
from .state import FrameRecord, HubState, TaskError, TaskRecord, Violation

__all__ = [
    "DevHub",
    "FrameRecord",
    "HubConfig",
    "HubState",
    "RateLimits",
    "TaskError",
    "TaskRecord",
    "TierLimit",
    "Violation",
    "open_dev_hub",
    "run_hub_cli",
    "schemas_json",
    "serve_forever",
    "tier_of",
    "validate_ws_message",
]
