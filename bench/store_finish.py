"""Time of `Store.finish` on the event loop: a small result, and one with 64 KB of output.

    .venv/bin/python bench/store_finish.py [--results 600]

A real store (journal on, in a temporary dir under ~/.cache like `latency.py`),
its `watch` running so that journaled writes reach SQLite as in the daemon.
Each task is admitted, then finished; the `finish` call is timed with
`perf_counter`, the first 50 of each kind not counted. Half the results are
small, half carry 64 KB of output: the frame's JSON encoding and the journal
line are what the bigger one measures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).parent))
from latency import default_state_parent  # bench/ is not a package

from sidecar.store import Store

OUTPUT = ("line of output number 12345 with some text\n" * 1600)[:65536]


async def bench(n: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"small": [], "64 KB": []}
    with tempfile.TemporaryDirectory(dir=default_state_parent()) as tmp:
        store = await Store.open(Path(tmp) / "s.db")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.watch)
                for i in range(n):
                    tid = f"t{i}"
                    await store.admit(tid, 1, {"task_id": tid, "description": "d"}, "m")
                    big = bool(i % 2)
                    result = {"status": "success", "output": OUTPUT if big else "", "exit_code": 0}
                    frame = {"type": "task_complete", "task_id": tid, "generation": 1, "result": result}
                    t0 = time.perf_counter()
                    await store.finish(tid, frame)
                    times["64 KB" if big else "small"].append((time.perf_counter() - t0) * 1e6)
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
        finally:
            await store.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=int, default=600)
    args = ap.parse_args()
    for kind, us in trio.run(bench, args.results).items():
        kept = us[50:]
        print(f"finish, {kind:<6} result: median {statistics.median(kept):6.0f} us  (n={len(kept)})")


if __name__ == "__main__":
    main()
