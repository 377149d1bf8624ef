"""Running the dev hub: hypercorn's Trio worker on one port, in a nursery.

`open_dev_hub` binds (port 0 picks a free port; `hub.port` tells which),
serves `/ws` and the HTTP API until the block ends, then stops the server and
drops every connection without reclaiming tasks, as a hub process that exits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from ..log import get_logger, register_secret, setup_logging
from .config import HubConfig
from .hub import DevHub
from .state import HubState

log = get_logger(__name__)

_DEFAULT_TOKENS: dict[str, str] = {"agent-1": "dev-token"}


def _hypercorn_config(host: str, port: int) -> hypercorn.config.Config:
    config = hypercorn.config.Config()
    bound = f"[{host}]" if ":" in host else host
    config.bind = [f"{bound}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 0.5
    return config


@asynccontextmanager
async def open_dev_hub(
    host: str = "127.0.0.1",
    port: int = 0,
    tokens: Mapping[str, str] | str | None = None,
    *,
    state: HubState | None = None,
    config: HubConfig | None = None,
    **options: Any,
) -> AsyncIterator[DevHub]:
    """Serve a dev hub for the duration of the block.

    `tokens`: agent_id → token, or one token any agent may use (default
    `{"agent-1": "dev-token"}`). `options` are `HubConfig` fields (`limits`,
    `concurrency`, `idle_timeout`, `knows_state_report`, …). `state`: a
    `HubState` from an earlier hub, to emulate a restart (`old.state.restarted()`
    keeps only the tasks, as the real hub does).
    """
    base = config if config is not None else HubConfig()
    if tokens is not None:
        options["tokens"] = tokens
    elif config is None:
        options["tokens"] = _DEFAULT_TOKENS
    cfg = attrs.evolve(base, **options)
    hub = DevHub(cfg, state)
    hub.host = host
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(hypercorn.trio.serve, hub, _hypercorn_config(host, port))
        hub.port = int(binds[0].rsplit(":", 1)[1])
        nursery.start_soon(hub.run_clocks)
        log.info("devhub_started", ws_url=hub.ws_url, api_url=hub.api_url)
        try:
            yield hub
        finally:
            hub.closing = True
            nursery.cancel_scope.cancel()
            log.info("devhub_stopped", port=hub.port)


async def serve_forever(
    host: str = "127.0.0.1",
    port: int = 4000,
    tokens: Mapping[str, str] | str | None = None,
    *,
    task_status: trio.TaskStatus[DevHub] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Serve a dev hub until cancelled; `nursery.start` gets the hub."""
    async with open_dev_hub(host, port, tokens, **options) as hub:
        task_status.started(hub)
        await trio.sleep_forever()


def run_hub_cli(
    port: int, token: str | None, agent: str | None, host: str = "127.0.0.1", **options: Any
) -> None:
    """`sidecar hub [--token T --agent A] …`: serve until Ctrl-C.

    `options` are `HubConfig` fields (`default_repo`, `require_auth`, …).
    Without `--agent`, agents join through `POST /api/onboard/register`.
    """
    if not logging.getLogger().handlers:
        setup_logging()
    tokens: dict[str, str] = {}
    if token is not None and agent is not None:
        register_secret(token)
        tokens[agent] = token

    async def main() -> None:
        async with open_dev_hub(host, port, tokens, **options) as hub:
            log.info("devhub_ready", ws_url=hub.ws_url, api_url=hub.api_url, agent_id=agent)
            await trio.sleep_forever()

    try:
        trio.run(main)
    except* KeyboardInterrupt:  # raised through the hub's nursery, so inside a group
        log.info("devhub_interrupted")
