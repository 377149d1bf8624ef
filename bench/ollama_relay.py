"""Relay throughput: the sidecar's Ollama executor vs the official `ollama` client.

One fake Ollama server (tests/fakes/ollama_server.py) runs in a subprocess, so
its work sits on the other core. It streams N content chunks (chunked NDJSON,
several lines per socket write so the client side is the bottleneck). Over the
same stream, in one run and alternating rounds:

- sidecar: `OllamaExecutor` → `ProgressSender` → bounded progress channel →
  a consumer task that drains it (plain drain), and, when `sidecar/batcher.py`
  is there, the same through the real `Batcher` into a sink that discards frames;
- official: `ollama.AsyncClient.chat(stream=True)`, doing nothing with chunks.

Prints chunks/s for each (best and median of the rounds) and the ratio.

    .venv/bin/python bench/ollama_relay.py [--chunks 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import trio

from sidecar.config import config_from_mapping
from sidecar.executors import ExecContext
from sidecar.executors.ollama import OllamaExecutor
from sidecar.messages import Task, parse_task
from sidecar.progress import ProgressSender, open_progress
from sidecar.taskrun import TaskRun

ROOT = Path(__file__).resolve().parent.parent


async def start_server(nursery: trio.Nursery) -> tuple[str, trio.Process]:
    proc: trio.Process = await nursery.start(
        functools.partial(
            trio.run_process,
            [sys.executable, "-m", "tests.fakes.ollama_server", "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    )
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(30):
        while b"\n" not in buf:
            data = await proc.stdout.receive_some()
            if not data:
                raise RuntimeError("fake server exited before listening")
            buf += data
    return buf.split(b"\n")[0].decode().removeprefix("listening on "), proc


class _NullSink:
    """A connection that is always up and discards every frame."""

    def __init__(self) -> None:
        self.frames = 0

    def can_send(self) -> bool:
        return True

    async def send_progress(self, frame: dict[str, Any]) -> bool:
        self.frames += 1
        return True


def _make_task(url: str, model: str) -> Any:
    return parse_task(
        {
            "type": "task_assign",
            "task_id": "bench",
            "description": "relay benchmark",
            "routing_decision": {"target_type": "ollama", "selected_endpoint": url, "selected_model": model},
        }
    )


def _run(task: Task, progress: ProgressSender) -> TaskRun:
    return TaskRun(task=task, progress=progress, marker="bench", log_path=Path(os.devnull), workdir=Path("."))


async def run_sidecar(executor: OllamaExecutor, url: str, model: str, chunks: int) -> None:
    """Executor → progress channel → a consumer that only counts."""
    send, recv = open_progress()
    task = _make_task(url, model)
    received = 0

    async def drain() -> None:
        # Take whatever is queued at each wake-up, as the real batcher does:
        # one scheduler pass per batch, not per event.
        nonlocal received
        while True:
            try:
                await recv.receive()
            except trio.EndOfChannel:
                return
            received += 1
            while True:
                try:
                    recv.receive_nowait()
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    return
                received += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        async with send:
            outcome = await executor(_run(task, ProgressSender(send, task.task_id)))
    assert outcome.ok, outcome
    assert outcome.tokens_out == chunks and received == chunks, (outcome.tokens_out, received)


async def run_sidecar_batcher(executor: OllamaExecutor, url: str, model: str, chunks: int) -> None:
    """Executor → progress channel → the real Batcher, into a sink that discards frames."""
    from sidecar.batcher import Batcher

    send, recv = open_progress()
    task = _make_task(url, model)
    b = Batcher()
    async with trio.open_nursery() as nursery:
        b.task_started(task.task_id)
        nursery.start_soon(b.run, recv, _NullSink())
        async with send:
            outcome = await executor(_run(task, ProgressSender(send, task.task_id)))
        b.task_finished(task.task_id)
        nursery.cancel_scope.cancel()
    assert outcome.ok and outcome.tokens_out == chunks, outcome
    assert b.stats.events_in == chunks, b.stats


async def run_official(client: ollama.AsyncClient, model: str, chunks: int) -> None:
    n = 0
    async for _part in await client.chat(
        model=model, messages=[{"role": "user", "content": "relay benchmark"}], stream=True
    ):
        n += 1
    assert n == chunks + 1, n  # content chunks plus the final done line


async def run_ceiling(http: httpx.AsyncClient, url: str, model: str, chunks: int) -> None:
    """httpx alone, bytes read and thrown away: what neither client can beat."""
    body = {"model": model, "messages": [], "stream": True}
    async with http.stream("POST", url + "/api/chat", json=body) as r:
        async for _data in r.aiter_raw():
            pass


async def main(chunks: int, rounds: int, flush_every: int) -> None:
    try:
        import sidecar.batcher  # noqa: F401

        have_batcher = True
    except ImportError:
        have_batcher = False
    model = f"bench!chunks={chunks}!flush_every={flush_every}"
    warm = f"bench!chunks=2000!flush_every={flush_every}"
    results: dict[str, list[tuple[float, float]]] = {}
    async with trio.open_nursery() as nursery:
        url, proc = await start_server(nursery)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = config_from_mapping(
                    {"agent_id": "bench", "token": "bench-token", "hub_url": "ws://127.0.0.1:1/ws"},
                    base_dir=Path(tmp),
                )
                async with httpx.AsyncClient() as http:
                    executor = OllamaExecutor(ExecContext(cfg, http, Path(tmp)))
                    official = ollama.AsyncClient(host=url)
                    variants: dict[str, Callable[[str, int], Awaitable[None]]] = {
                        SIDECAR: lambda m, n: run_sidecar(executor, url, m, n),
                        OFFICIAL: lambda m, n: run_official(official, m, n),
                    }
                    if have_batcher:
                        variants[BATCHER] = lambda m, n: run_sidecar_batcher(executor, url, m, n)
                    variants[CEILING] = lambda m, n: run_ceiling(http, url, m, n)
                    for fn in variants.values():
                        await fn(warm, 2000)
                    results = {name: [] for name in variants}
                    for _ in range(rounds):
                        for name, fn in variants.items():
                            wall, cpu = trio.current_time(), time.process_time()
                            await fn(model, chunks)
                            wall, cpu = trio.current_time() - wall, time.process_time() - cpu
                            results[name].append((chunks / wall, cpu / chunks * 1e6))
                    await official._client.aclose()
        finally:
            proc.terminate()
    print(f"chunks per stream: {chunks}, rounds: {rounds}, lines per server write: {flush_every}")
    print(f"  {'':44s} {'chunks/s (median, best)':>26s}   client CPU us/chunk (median)")
    for name, runs in results.items():
        rates = [r for r, _ in runs]
        cpus = [c for _, c in runs]
        print(
            f"  {name:44s} {statistics.median(rates):>12,.0f} {max(rates):>12,.0f}"
            f"   {statistics.median(cpus):>8.2f}"
        )
    for name in (SIDECAR, BATCHER):
        if name in results:
            side = statistics.median(r for r, _ in results[name])
            off = statistics.median(r for r, _ in results[OFFICIAL])
            side_cpu = statistics.median(c for _, c in results[name])
            off_cpu = statistics.median(c for _, c in results[OFFICIAL])
            print(
                f"  ratio {name} / official: throughput {side / off:.2f}x, "
                f"CPU per chunk {side_cpu / off_cpu:.2f}x"
            )


SIDECAR = "sidecar: executor -> channel -> drain"
BATCHER = "sidecar: executor -> channel -> Batcher"
OFFICIAL = "official ollama.AsyncClient"
CEILING = "ceiling: httpx aiter_raw, no parsing"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--chunks", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flush-every", type=int, default=64, help="content lines per server write")
    args = parser.parse_args()
    trio.run(main, args.chunks, args.rounds, args.flush_every)
