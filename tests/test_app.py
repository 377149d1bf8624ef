"""The daemon in-process against the dev hub, under a virtual clock."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from sidecar.app import open_sidecar
from sidecar.devhub import open_dev_hub

AGENT, TOKEN = "agent-1", "app-test-token-7"


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0.01)


async def test_reports_sent_per_session_and_stopped_after_a_refusal(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, ollama_url="http://127.0.0.1:9")
        async with open_sidecar(cfg):
            await hub.wait_until(lambda: len(hub.frames(AGENT, type="resource_report")) >= 2, timeout=120)
            first = hub.frames(AGENT, type="identify")[0].at
            reports = hub.frames(AGENT, type="resource_report")
            assert reports[0].at - first == pytest.approx(5, abs=1)
            assert reports[1].at - reports[0].at == pytest.approx(30, abs=1)
            assert hub.frames(AGENT, type="ollama_report")
            # An older hub refuses the type: the sidecar stops sending it.
            await hub.send_frame(
                AGENT,
                {
                    "type": "error",
                    "error": "validation_failed",
                    "message_type": "resource_report",
                    "errors": [],
                },
            )
            refused_at = trio.current_time()
            await trio.sleep(100)
            later = [f for f in hub.frames(AGENT, type="resource_report") if f.at > refused_at + 1]
            assert later == []
        assert [v for v in hub.violations if v.kind != "rate_limited"] == []
