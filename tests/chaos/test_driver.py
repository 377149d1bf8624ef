"""The chaos driver itself: what an episode leaves behind when it fails."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest
import trio

from tests.harness import SidecarProcess

from .driver import ChaosSidecar, Episode


async def test_an_episode_whose_hub_crashes_leaves_no_sidecar_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash of the episode's dev hub cancels the episode; every sidecar it started
    must still be killed and reaped (an unshielded clean-up stopped at the first one,
    and the others kept running after the test, reconnecting to a dead hub)."""
    hub_owner = Episode._hub_owner

    async def crashing_hub_owner(self: Episode) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hub_owner, self)
            await self.hub_up.wait()

            def all_connected() -> bool:
                hub = self._hub()
                return len(self.agents) == self.n_agents and all(hub.connected(a) for a in self.agents)

            await self._hub().wait_until(all_connected, 60)
            raise RuntimeError("the dev hub crashed")

    monkeypatch.setattr(Episode, "_hub_owner", crashing_hub_owner)
    ep = Episode(1, tmp_path / "ep", agents=3, tasks=1_000)
    with pytest.RaisesGroup(RuntimeError, flatten_subgroups=True):
        await ep.run()
    assert len(ep.agents) == 3
    for agent in ep.agents.values():
        proc = agent.proc.proc
        assert proc is not None and proc.returncode is not None, f"{agent.name} still running"


@pytest.mark.parametrize("cls", [ChaosSidecar, SidecarProcess])
async def test_a_start_cancelled_before_the_spawn_closes_its_log(
    tmp_path: Path, cls: type[SidecarProcess]
) -> None:
    """A fault's restart can begin just as the submit phase cancels the injector:
    open_process then raises Cancelled at its first checkpoint. The log file opened
    for the child must be closed there, not by the GC (whose ResourceWarning the
    suite's `error` filter turns into a PytestUnraisableExceptionWarning)."""
    proc = cls(tmp_path / "a", "ws://127.0.0.1:1/ws")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with trio.CancelScope() as scope:
            scope.cancel()
            await proc.start()
        gc.collect()
    assert proc.proc is None  # cancelled before anything was spawned
