"""Regression tests for bugs the chaos suite found, one per bug, each written before its fix."""

from __future__ import annotations

from typing import Any

import trio

from sidecar.config import Config
from sidecar.devhub import open_dev_hub
from sidecar.link import HubLink
from sidecar.messages import FrameError


class _Recorder:
    """A LinkHandler that counts what the link tells it."""

    def __init__(self) -> None:
        self.identified = 0
        self.disconnected = 0
        self.changed = trio.Event()

    def _bump(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def on_identified(self, link: HubLink) -> None:
        self.identified += 1
        self._bump()

    async def on_frame(self, frame: dict[str, Any]) -> None:
        pass

    def on_disconnected(self) -> None:
        self.disconnected += 1
        self._bump()

    def on_bad_frame(self, error: FrameError, raw: str | bytes) -> None:
        pass


async def test_session_dropped_by_our_side_still_reports_disconnect(make_config: Any) -> None:
    """Chaos seed 1: a failed send ended the session without `on_disconnected`.

    `_drop_session()` (a failed or stalled send, `force_reconnect`, the
    half-open remedy) cleared `identified` before the run loop looked at it, so
    the outbox never heard of the disconnect and waited its full answer
    time-out (30 s) before resending a result whose ack had been lost; every
    result behind it waited too.
    """
    async with open_dev_hub(tokens={"agent-1": "secret-token-123"}) as hub:
        cfg: Config = make_config(hub_url=hub.ws_url, backoff_initial_s=0.01, backoff_max_s=0.05)
        rec = _Recorder()
        link = HubLink(cfg, rec)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.run)
            with trio.fail_after(10):
                while rec.identified < 1:
                    await rec.changed.wait()
                link.force_reconnect()
                while rec.identified < 2:
                    await rec.changed.wait()
            assert rec.disconnected == 1
            link.close()
