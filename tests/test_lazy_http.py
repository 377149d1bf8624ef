"""httpx (and psutil) stay out of a `sidecar run` that runs no Ollama task: the
shared client is made by the first Ollama task, in the deferred executor's build."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from sidecar.executors import ExecContext
from sidecar.executors.deferred import Deferred
from sidecar.executors.registry import build_executors
from sidecar.messages import parse_task
from sidecar.sharedhttp import SharedHTTP
from tests.fakes.ollama_server import open_ollama_server
from tests.fakes.proc_helpers import RecordingProgress, task_run

ROOT = Path(__file__).resolve().parents[1]

START_UP = """
import sys, tempfile, trio
from pathlib import Path
import sidecar.entry, sidecar.cli, sidecar.app
from sidecar import reports
from sidecar.config import config_from_mapping
from sidecar.executors import ExecContext
from sidecar.executors.registry import build_executors
from sidecar.hubtypes import HubTypes
from sidecar.sharedhttp import SharedHTTP

def loaded():
    return sorted(m for m in ("httpx", "httpcore", "psutil", "sidecar.executors.ollama") if m in sys.modules)

print("imports", loaded())

async def main():
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_mapping(
            {"agent_id": "a", "token": "t", "hub_url": "ws://127.0.0.1:1/ws", "state_dir": tmp},
            base_dir=Path(tmp),
        )
        execs = build_executors(ExecContext(cfg, SharedHTTP(), Path(tmp)))
        reports.prime_cpu_percent()
        await reports.resource_report()
        print("built", sorted(execs), loaded())
        from sidecar.devhub import open_dev_hub  # a test tool (it imports psutil, hypercorn)

        async with open_dev_hub() as hub:
            before = set(sys.modules)
            types = HubTypes()
            await types.learn(hub.api_url)
            new = set(sys.modules) - before
            print("learnt", types.known is not None, sorted({"httpx", "httpcore"} & new))

trio.run(main)
"""


def test_start_up_does_not_import_httpx_or_psutil() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", START_UP], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "imports []",
        "built ['claude', 'ollama', 'shell', 'wake'] []",
        "learnt True []",
    ]


def _ollama_task(task_id: str, url: str) -> Any:
    endpoint = url.removeprefix("http://")
    return parse_task(
        {
            "type": "task_assign",
            "task_id": task_id,
            "description": f"hello {task_id}",
            "routing_decision": {
                "target_type": "ollama",
                "selected_endpoint": endpoint,
                "selected_model": "m:1",
            },
        }
    )


async def test_first_ollama_tasks_build_one_executor_on_one_client(make_config: Any, tmp_path: Path) -> None:
    async with open_ollama_server(models=["m:1"]) as srv:
        http = SharedHTTP()
        ctx = ExecContext(make_config(), http, tmp_path)
        ollama = build_executors(ctx)["ollama"]
        assert isinstance(ollama, Deferred) and ollama.built is None and not http.created
        outcomes: dict[str, Any] = {}

        async def one(tid: str) -> None:
            outcomes[tid] = await ollama(task_run(ctx, _ollama_task(tid, srv.url), RecordingProgress(tid)))

        async with trio.open_nursery() as nursery:  # three first tasks at once
            for tid in ("o-1", "o-2", "o-3"):
                nursery.start_soon(one, tid)
        built = ollama.built
        assert built is not None and http.created
        assert all(o.ok and f"hello {tid}" in o.output for tid, o in outcomes.items())
        client = http.client()
        await ollama(task_run(ctx, _ollama_task("o-4", srv.url), RecordingProgress("o-4")))
        assert ollama.built is built and http.client() is client  # built once, one client
        await http.aclose()
        assert not http.created and client.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        http.client()


async def test_an_unused_shared_client_is_never_made() -> None:
    async with SharedHTTP() as http:
        pass
    assert not http.created
    with pytest.raises(RuntimeError, match="closed"):
        http.client()
