"""Shared fixtures."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from sidecar.config import Config, config_from_mapping

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
