"""Which optional frame types the hub accepts (protocol.md, "Hub limits").

Older hubs do not know `wake_result` or `agent_restarting`, and a frame of an
unknown type is a validation failure (ten a minute close the socket). So the
sidecar learns the hub's types from `GET /api/schemas` at each identify, and
failing that from the hub's answer: a type refused once (`validation_failed`)
is not sent again by this process. Until either is known, a type is tried.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse, urlunparse

import trio

from .config import Config
from .httpget import FetchError, get_json
from .log import get_logger

log = get_logger("sidecar.hubtypes")

# Frames we send that some hub may not know.
OPTIONAL_TYPES = frozenset({"resource_report", "ollama_report", "wake_result", "agent_restarting"})
SCHEMAS_TIMEOUT_S = 5.0


def api_url_of(config: Config) -> str:
    """The hub's HTTP base: `hub_api_url`, else derived from `hub_url` (ws://H:P/ws → http://H:P)."""
    if config.hub_api_url:
        return config.hub_api_url.rstrip("/")
    parts = urlparse(config.hub_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunparse((scheme, parts.netloc, "", "", "", ""))


def ws_types(schemas: Any) -> frozenset[str] | None:
    """The WebSocket types in a `GET /api/schemas` body, or None if it is not one."""
    ws = schemas.get("websocket") if isinstance(schemas, dict) else None
    if not isinstance(ws, list):
        return None
    return frozenset(str(s["type"]) for s in ws if isinstance(s, dict) and isinstance(s.get("type"), str))


class HubTypes:
    """What this process knows of the hub's message types."""

    def __init__(self) -> None:
        self.known: frozenset[str] | None = None  # from /api/schemas; None: not learned
        self.refused: set[str] = set()
        self._asked = trio.Event()  # the first `learn` has ended, learnt or not

    def accepts(self, mtype: str) -> bool:
        if mtype in self.refused:
            return False
        return self.known is None or mtype in self.known

    async def check(self, mtype: str) -> bool:
        """`accepts`, once the first look at `/api/schemas` has ended (bounded).

        A frame sent at once after identify (a `restart_sidecar` answered
        within milliseconds) would otherwise go out before the hub was asked.
        """
        with trio.move_on_after(SCHEMAS_TIMEOUT_S):
            await self._asked.wait()
        return self.accepts(mtype)

    def on_refusal(self, error: str, mtype: str | None) -> None:
        """The hub's `error` frame: a `validation_failed` of an optional type refuses it."""
        if error == "validation_failed" and mtype is not None and mtype in OPTIONAL_TYPES:
            if mtype not in self.refused:
                log.info("hub_type_refused", message_type=mtype, action="not sent again")
            self.refused.add(mtype)

    async def learn(self, api_url: str) -> None:
        """Ask the hub's `/api/schemas`; on any failure keep what is known."""
        try:
            await self._learn(api_url)
        finally:
            self._asked.set()

    async def _learn(self, api_url: str) -> None:
        try:
            types = ws_types(await get_json(f"{api_url}/api/schemas", timeout_s=SCHEMAS_TIMEOUT_S))
        except FetchError as exc:
            log.info("hub_schemas_unavailable", url=api_url, error=str(exc)[:200], status=exc.status)
            return
        if types is None:
            log.info("hub_schemas_unavailable", url=api_url, error="no websocket schemas in the answer")
            return
        self.known = types
        log.info("hub_schemas_learned", optional=sorted(OPTIONAL_TYPES & types))
