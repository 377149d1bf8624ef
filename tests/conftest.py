"""Shared fixtures."""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
import trio
import trio.testing

from sidecar.config import Config, config_from_mapping
from sidecar.devhub import DevHub, open_dev_hub
from sidecar.log import task_context
from tests.harness import AGENT, TOKEN

# A suite started in the background of a non-interactive shell (`.ci/run &`)
# inherits SIGINT ignored, and so would every child it starts: a shell then
# cannot even trap it, and the SIGINT tests fail for no fault of the code. A
# handled signal is reset to its default in children at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def make_config(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Build a Config rooted in tmp_path, with overrides."""

    def _make(**overrides: object) -> Config:
        data: dict[str, object] = {
            "agent_id": "agent-1",
            "token": "secret-token-123",
            "hub_url": "ws://127.0.0.1:1/ws",
            "state_dir": str(tmp_path / "state"),
        }
        data.update(overrides)
        return config_from_mapping(data, base_dir=tmp_path)

    return _make


class Logs:
    """Events logged while the `logs` fixture is active, as dicts (`event`, `log_level`, `logger`, fields)."""

    def __init__(self, entries: list[MutableMapping[str, Any]]) -> None:
        self.entries = entries

    def named(self, event: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.entries if e.get("event") == event]

    @property
    def text(self) -> str:
        """Every event as JSON, unscrubbed: a secret found here reached a log call."""
        return "\n".join(json.dumps(e, default=str) for e in self.entries)


@pytest.fixture
def logs() -> Iterator[Logs]:
    """Capture every log event (debug and up) with the trio task's bound context."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs(processors=[task_context]) as entries:
            yield Logs(entries)
    finally:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time for tests that ask for it. Not a 0 threshold: the store works in
    a thread of its own, and the clock must not jump while it does."""
    return trio.testing.MockClock(autojump_threshold=0.01)


@pytest.fixture
async def hub() -> AsyncIterator[DevHub]:
    """A dev hub on 127.0.0.1 with the real hub's rate limits, knowing tests/harness's agent."""
    async with open_dev_hub(tokens={AGENT: TOKEN}) as h:
        assert h.config.limits is not None
        yield h
