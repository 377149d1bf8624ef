"""End to end with LLM tiers: the real `sidecar run` process, the dev hub, the test
Ollama server, and the real Claude Code CLI against the fake Anthropic API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sidecar.devhub import DevHub
from tests.fakes.anthropic_api import Scenario, serve_fake_anthropic
from tests.fakes.ollama_server import Script, open_ollama_server

from .harness import SidecarProcess

ROOT = Path(__file__).resolve().parents[1]
CLAUDE_BIN = os.environ.get("SIDECAR_TEST_CLAUDE_BIN") or str(ROOT / ".tools/claude/node_modules/.bin/claude")


async def test_ollama_task_end_to_end(tmp_path: Path, hub: DevHub) -> None:
    async with open_ollama_server(
        scripts={
            "broken:1b": Script(status=404, error_message='model "broken:1b" not found, try pulling it first')
        }
    ) as ollama:
        sc = SidecarProcess(tmp_path / "sc", hub.ws_url, ollama_url=ollama.url)
        try:
            await sc.start()
            ok = hub.submit(
                description="say something",
                routing_decision={"target_type": "ollama", "selected_model": "qwen3:8b"},
            )
            rec = await hub.wait_until(
                lambda: hub.task(ok) if hub.task(ok).status == "completed" else None, 30
            )
            result = rec.result
            assert result is not None
            assert result["model_used"] == "qwen3:8b"
            assert result["tokens_out"] > 0 and result["tokens_in"] > 0
            assert result["estimated_cost_usd"] == 0.0
            assert result["equivalent_claude_cost_usd"] > 0
            assert "say something" in result["output"]  # the fake echoes the prompt
            await hub.wait_until(
                lambda: any(e["event_type"] == "token" for e in hub.task(ok).progress_events), 30
            )
            # A missing model is a 4xx: not retried, reported with Ollama's own message.
            bad = hub.submit(
                description="x",
                routing_decision={"target_type": "ollama", "selected_model": "broken:1b"},
                max_retries=0,
            )
            rec = await hub.wait_until(lambda: hub.task(bad) if hub.task(bad).failures else None, 30)
            assert "not found" in rec.failures[0]["error"] and rec.failures[0]["reason"] == "ollama_http_404"
            assert len([r for r in ollama.requests if r.path == "/api/chat"]) == 2
            assert [(v.kind, v.detail) for v in hub.violations] == []
        finally:
            await sc.cleanup()


@pytest.mark.claude_cli
@pytest.mark.skipif(
    not os.access(CLAUDE_BIN, os.X_OK), reason=f"Claude Code CLI not installed at {CLAUDE_BIN}"
)
async def test_claude_task_end_to_end_with_real_cli(tmp_path: Path, hub: DevHub) -> None:
    async with serve_fake_anthropic() as api:
        api.scenario = Scenario(text="The answer is 42.", chunk=4)
        home = tmp_path / "home"
        home.mkdir()
        sc = SidecarProcess(
            tmp_path / "sc",
            hub.ws_url,
            fmt="json",
            claude={
                "binary": CLAUDE_BIN,
                "env": {
                    "ANTHROPIC_BASE_URL": api.base_url,
                    "ANTHROPIC_API_KEY": "test-key",
                    "DISABLE_TELEMETRY": "1",
                    "DISABLE_AUTOUPDATER": "1",
                    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
                    "HOME": str(home),
                },
            },
        )
        try:
            await sc.start()
            tid = hub.submit(
                description="What is six times seven?",
                routing_decision={
                    "target_type": "claude",
                    "selected_endpoint": "claude_api",
                    "selected_model": "claude",
                },
            )
            rec = await hub.wait_until(
                lambda: hub.task(tid) if hub.task(tid).status == "completed" else None, 60
            )
            result = rec.result
            assert result is not None
            assert result["output"] == "The answer is 42."
            assert result["tokens_in"] > 0 and result["tokens_out"] > 0
            assert result["estimated_cost_usd"] > 0  # the CLI's own total_cost_usd
            assert result["equivalent_claude_cost_usd"] is None
            bodies = [r.json for r in api.message_requests()]
            assert any("six times seven" in str(b) for b in bodies)
            assert [(v.kind, v.detail) for v in hub.violations] == []
        finally:
            await sc.cleanup()
