"""Several workers side by side on one dev hub, their tasks interleaved one by one.

    .venv/bin/python bench/sidebyside.py [--base DIR ...] [--python PY ...] [--skeleton] [--rounds 300]

Each worker is a process of its own with its own agent id and state dir,
connected to the same dev hub (rate limits OFF, as in `latency.py`): this
checkout's `sidecar run` ("cur"), the `sidecar run` of each `--base` checkout
(a `git worktree add /tmp/base REV`: "base", "base2", …) and, with
`--skeleton`, `bench/skeleton.py` and, with `--node`, `bench/node_floor.js` (a floor
for the Node original, see latency.py; `--node-model` adds it with
`--original-steps`). The tasks are sequential, as in `latency.py`, but a round
gives one task to each worker in turn (in a fresh random order each round)
before the next round starts. So every worker's
tasks are sampled across the same minutes of the machine's drift, which on
this project's VMs moves a single worker's median by 30-60 % within an hour
and makes separate runs, even paired ones (`ab.py`), blind to a 10 %
difference. The other workers are idle while one works. `--python PY` adds
this checkout run by another interpreter ("cur-py1", …; with `--skeleton`
also "skeleton-py1"), to weigh the interpreter's build against the code.

On disk, which directory a worker's state dir lands in moves its figures by up
to 4 % (ext4 places directories in different block groups, and every task
creates its log file there: two checkouts of the same code gave 0.957-0.997 in
one state dir each). So the rounds are split into `--segments` runs of fresh
workers in fresh state dirs, and the ratio of each segment is printed too.
The default parent spreads each run's directory over the disk (ext4's TOPDIR
flag, see `latency.default_state_parent`), so that a run does not create its
files among the inodes the last run freed, which ext4 without a journal
passes over one by one for minutes.
With `--state-dir /dev/shm` (a create costs 0.01 ms) the same A/A gave
0.997-1.009: use that for changes that do not touch the log file's create.

Printed per worker: assign -> task_accepted and -> task_complete (median, p90,
p99), then for each worker against "cur": the ratio of the medians and the
median of the per-round ratios (the same round's two tasks, seconds apart).
All times are the hub's, from its own frame records.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import attrs
import trio

sys.path.insert(0, str(Path(__file__).parent))
from latency import (  # bench/ is not a package
    TOKEN,
    UNLIMITED,
    NodeFloor,
    NodeModel,
    Sidecar,
    Skeleton,
    add_hub_gc_option,
    default_state_parent,
    hub_gc_paused,
    latencies,
    one_task,
    pct,
)

from sidecar.devhub import DevHub, open_dev_hub


@attrs.frozen
class Worker:
    """One worker of the bench: its kind, and the checkout and interpreter that run it."""

    kind: type[Sidecar]
    checkout: Path | None = None  # None: this one
    python: str | None = None  # None: this one


def worker_specs(args: argparse.Namespace) -> dict[str, Worker]:
    """The workers by agent id, "cur" first: the `--base` checkouts, the `--python`s, the skeleton."""
    specs = {"cur": Worker(Sidecar)}
    for i, base in enumerate(args.base):
        specs[f"base{i + 1 if i else ''}"] = Worker(Sidecar, checkout=base)
    for i, python in enumerate(args.python, start=1):
        specs[f"cur-py{i}"] = Worker(Sidecar, python=python)
    if args.skeleton:
        specs["skeleton"] = Worker(Skeleton)
        for i, python in enumerate(args.python, start=1):
            specs[f"skeleton-py{i}"] = Worker(Skeleton, python=python)
    if args.node:
        specs["node"] = Worker(NodeFloor)
    if args.node_model:
        specs["node-model"] = Worker(NodeModel)
    return specs


async def segment(
    hub: DevHub, root: Path, specs: dict[str, Worker], args: argparse.Namespace, rng: random.Random
) -> dict[str, list[str]]:
    """Fresh workers in fresh state dirs under `root`; their counted tasks' ids."""
    names = list(specs)
    workers = {
        name: spec.kind(
            root / name,
            hub.ws_url,
            log_level=args.log_level,
            checkout=spec.checkout,
            python=spec.python,
            agent_id=name,
            **UNLIMITED,
        )
        for name, spec in specs.items()
    }
    try:
        for w in workers.values():
            await w.start()
        for name in names:
            await hub.wait_until(lambda name=name: hub.connected(name), 30)  # type: ignore[misc]
        ids: dict[str, list[str]] = {n: [] for n in names}
        per_segment = max(1, args.rounds // args.segments)
        with hub_gc_paused(args.hub_gc == "paused"):
            for r in range(args.warmup + per_segment):
                order = names[:]
                rng.shuffle(order)
                for name in order:
                    tid = await one_task(hub, args.command, name)
                    if r >= args.warmup:
                        ids[name].append(tid)
        for w in workers.values():
            assert await w.stop() == 0
        # Disconnected now: the next segment's workers take the same agent ids.
        for name in names:
            await hub.wait_until(lambda name=name: not hub.connected(name), 30)  # type: ignore[misc]
    finally:
        for w in workers.values():
            await w.cleanup()
    return ids


async def bench(args: argparse.Namespace) -> tuple[dict[str, dict[str, list[float]]], list[dict[str, float]]]:
    specs = worker_specs(args)  # the --base checkouts resolved by main()
    names = list(specs)
    rng = random.Random(args.seed)
    out: dict[str, dict[str, list[float]]] = {n: {"accept_ms": [], "complete_ms": []} for n in names}
    ratios: list[dict[str, float]] = []  # per segment: each worker's complete median over cur's
    with tempfile.TemporaryDirectory(dir=args.state_dir) as tmp:
        async with open_dev_hub(tokens={n: TOKEN for n in names}, limits=None) as hub:
            for k in range(args.segments):
                ids = await segment(hub, Path(tmp) / f"segment-{k}", specs, args, rng)
                medians = {}
                for name in names:
                    bad = [t for t in ids[name] if hub.task(t).status != "completed"]
                    assert not bad, f"{name}: {len(bad)} tasks did not complete"
                    acc, comp = latencies(hub, ids[name], agent=name)
                    out[name]["accept_ms"] += acc
                    out[name]["complete_ms"] += comp
                    medians[name] = statistics.median(comp)
                ratios.append({n: medians["cur"] / m for n, m in medians.items() if n != "cur"})
            assert not hub.violations, hub.violations[:3]
    return out, ratios


def line(name: str, what: str, ms: list[float]) -> str:
    return (
        f"{name:<9} {what:<9}: median {statistics.median(ms):6.2f} ms  p90 {pct(ms, 90):6.2f}"
        f"  p99 {pct(ms, 99):6.2f}  (n={len(ms)})"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", action="append", default=[], help="another checkout to run beside this one")
    ap.add_argument("--skeleton", action="store_true", help="also run bench/skeleton.py beside them")
    ap.add_argument(
        "--python",
        action="append",
        default=[],
        help="also run this checkout (and with --skeleton the skeleton) with this interpreter",
    )
    ap.add_argument("--node", action="store_true", help="also run bench/node_floor.js beside them")
    ap.add_argument(
        "--node-model",
        action="store_true",
        help="also run node_floor.js --original-steps (the floor plus the original's own writes and logs)",
    )
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20, help="rounds not counted, in each segment")
    ap.add_argument("--command", default="true")
    ap.add_argument("--log-level", default="info", help="the sidecars' --log-level")
    ap.add_argument("--state-dir", default=None, help="parent of the state dirs (default as latency.py)")
    ap.add_argument(
        "--segments",
        type=int,
        default=4,
        help="restart every worker in fresh state dirs this many times (default 4): see the docstring",
    )
    ap.add_argument("--seed", type=int, default=1)
    add_hub_gc_option(ap, "the rounds")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    args = ap.parse_args()
    if args.state_dir is None:
        args.state_dir = str(default_state_parent())
    args.base = [Path(b).resolve() for b in args.base]
    r, seg_ratios = trio.run(bench, args)
    print(
        f"{args.rounds} rounds of one sequential `{args.command}` task per worker, interleaved,"
        f" in {args.segments} segments of fresh workers and state dirs, one dev hub, rate limits OFF,"
        f" log level {args.log_level}, state dirs under {args.state_dir}, hub GC {args.hub_gc}"
    )
    print(f"python    : {sys.executable} (cur, base, skeleton)")
    for i, python in enumerate(args.python, start=1):
        print(f"python    : {python} (cur-py{i}" + (f", skeleton-py{i})" if args.skeleton else ")"))
    for name, fig in r.items():
        print(line(name, "accepted", fig["accept_ms"]))
        print(line(name, "complete", fig["complete_ms"]))
    cur = r["cur"]
    for name, fig in r.items():
        if name == "cur":
            continue
        parts = []
        for key, label in (("accept_ms", "accepted"), ("complete_ms", "complete")):
            med = statistics.median(cur[key]) / statistics.median(fig[key])
            per_round = statistics.median(a / b for a, b in zip(cur[key], fig[key], strict=True))
            parts.append(f"{label} {med:.3f}x (per round {per_round:.3f}x)")
        per_seg = " ".join(f"{seg[name]:.3f}" for seg in seg_ratios)
        print(f"cur / {name:<9}: " + ", ".join(parts) + f"; complete by segment {per_seg}")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
