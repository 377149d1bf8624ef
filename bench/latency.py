"""Assign → accept and assign → complete latency of the real `sidecar run` process.

    .venv/bin/python bench/latency.py [--tasks 1000] [--warmup 20] [--command true]

The state dir goes under ~/.cache (see `default_state_parent`; `--state-dir`
to choose). A dev hub runs in this process on 127.0.0.1 with its rate limits switched
OFF (`limits=None`: 1,000 sequential tasks would exceed the real hub's 60
normal-tier frames a minute; limits are not what this measures). A real
`python -m sidecar run` subprocess (log level `info`, JSON lines to a file)
connects to it. Tasks are sequential: the next one is submitted once the hub
has received the previous one's `task_complete`.

All times are taken on the hub side, in this process, from the hub's own frame
records (trio clock): `task_assign` handed to the socket → `task_accepted`
received, and → `task_complete` received. They include the dev hub's own
work (hypercorn, JSON, validation) on both legs, on the same 2 cores.

Also printed: CPU seconds the sidecar and this process (the hub) spent per task
(the sidecar's also per thread, user and system time apart),
and the floor measured in the same run, before and after the sidecar's tasks:
a bare `subprocess.Popen(["true"]).wait()`, a loopback WebSocket round trip
(trio-websocket client and echo server in this process), and the creation of a
file next to the sidecar's state dir (each task creates its log file). Each
median is also given as a ratio to its floor: one round trip for assign ->
accepted, one round trip plus one bare spawn for assign -> complete, and the
same plus one file create.

With `--skeleton`, the same tasks then go through `bench/skeleton.py`, the
least worker that does a task's durable steps on the same stack (see its
docstring), against a fresh dev hub in the same run: the ratio to it is what
everything else the sidecar does costs. With `--node`, they also go through
`bench/node_floor.js`, the least Node.js worker doing the original sidecar's
wire steps (writing nothing, where the original writes its queue file): a floor
for the original, which is not available here, so a ratio under 0.8 to it is a
ratio under 0.8 to the original.
With `--node-model`, also through `node_floor.js --original-steps`: the same floor plus
the synchronous steps the original's source does on this path (its queue file written
three times through `write-file-atomic`, which fsyncs; two JSON log lines), a tighter
floor for the original (see that file's header).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import trio
import trio_websocket

from sidecar.devhub import DevHub, open_dev_hub

TOKEN = "bench-token-123456"
AGENT = "bench-agent"
# The sidecar's model of a hub whose rate limits are switched off (`limits=None`).
UNLIMITED: dict[str, Any] = {"hub_rate_capacity": 1_000_000, "hub_rate_refill_per_s": 1_000_000.0}


class Sidecar:
    """A `sidecar run` subprocess with a TOML config of our own."""

    def __init__(
        self,
        root: Path,
        hub_url: str,
        *,
        log_level: str = "info",
        checkout: Path | None = None,
        python: str | None = None,
        **overrides: Any,
    ) -> None:
        self.root = root
        # The interpreter that runs it (`bench/sidebyside.py --python`): this one unless told.
        self.python = python or sys.executable
        # Another checkout's sidecar (`bench/sidebyside.py --base`): run from there, its package first.
        self.checkout = checkout
        root.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "sidecar.log"
        self.log_level = log_level
        self.config: dict[str, Any] = {
            "agent_id": AGENT,
            "token": TOKEN,
            "hub_url": hub_url,
            "state_dir": str(root / "state"),
            "kill_grace_s": 2.0,
            "backoff_initial_s": 0.2,
            "backoff_max_s": 1.0,
            **overrides,
        }
        self.proc: trio.Process | None = None

    def argv(self, config_path: Path, extra_argv: list[str] | None) -> list[str]:
        argv = [self.python, *(extra_argv or []), "-m", "sidecar", "--log-format", "json"]
        return [*argv, "--log-level", self.log_level, "run", "--config", str(config_path)]

    async def start(self, extra_argv: list[str] | None = None) -> None:
        path = self.root / "sidecar.toml"
        path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in self.config.items()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        if self.checkout is not None:
            env["PYTHONPATH"] = str(self.checkout)
        argv = self.argv(path, extra_argv)
        with self.log_path.open("ab") as log:
            self.proc = await trio.lowlevel.open_process(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.checkout,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        with trio.fail_after(30):
            return await self.proc.wait()

    def events(self, name: str) -> list[dict[str, Any]]:
        """The sidecar's JSON log lines whose `event` is `name`."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("event") == name:
                out.append(obj)
        return out

    async def cleanup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            with trio.move_on_after(10):
                await self.proc.wait()


class Skeleton(Sidecar):
    """`bench/skeleton.py` on the same config: this stack's floor for the same durable steps."""

    def argv(self, config_path: Path, extra_argv: list[str] | None) -> list[str]:
        return [self.python, str(Path(__file__).with_name("skeleton.py")), "--config", str(config_path)]


class NodeFloor(Sidecar):
    """`bench/node_floor.js` on the same config: a floor for the Node original's own task path."""

    def argv(self, config_path: Path, extra_argv: list[str] | None) -> list[str]:
        return ["node", str(Path(__file__).with_name("node_floor.js")), "--config", str(config_path)]

    async def start(self, extra_argv: list[str] | None = None) -> None:
        # Installs `ws` into .tools/node-floor the first time (a no-op afterwards).
        await trio.run_process(["bash", str(Path(__file__).with_name("node-floor-install.sh"))])
        await super().start(extra_argv)


class NodeModel(NodeFloor):
    """`node_floor.js --original-steps`: the floor plus the original's own per-task steps."""

    def argv(self, config_path: Path, extra_argv: list[str] | None) -> list[str]:
        return [*super().argv(config_path, extra_argv), "--original-steps"]


def bare_spawn_ms(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.Popen(["true"], stdin=subprocess.DEVNULL).wait()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def ws_round_trip_ms(n: int) -> list[float]:
    """Round trips of a small text frame through a loopback trio-websocket echo server."""

    async def echo(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    out = []
    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, echo, "127.0.0.1", 0, None)
        port = server.port
        async with trio_websocket.open_websocket("127.0.0.1", port, "/", use_ssl=False) as ws:
            frame = json.dumps({"type": "task_accepted", "task_id": "t" * 36, "protocol_version": 1})
            for _ in range(n):
                t0 = time.perf_counter()
                await ws.send_message(frame)
                await ws.get_message()
                out.append((time.perf_counter() - t0) * 1000)
        nursery.cancel_scope.cancel()
    return out


def file_create_ms(n: int, where: Path) -> list[float]:
    """Creating (and closing) a new file in `where`: every task creates its log like this.

    On this project's VMs the figure depends on the directory and drifts over
    time, from 0.015 ms to over 1 ms of kernel CPU per file (ext4 looking for a
    free inode), so it is measured beside the sidecar's own state dir, in the same run.
    """
    where.mkdir(parents=True, exist_ok=True)
    paths = [where / f"floor-{i}.log" for i in range(n)]
    out = []
    for path in paths:
        t0 = time.perf_counter()
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644))
        out.append((time.perf_counter() - t0) * 1000)
    # Not unlinked here: they go with the run's state dir at its end. On ext4
    # without a journal, inodes freed in the last 1-6 minutes are passed over
    # one by one by every create in their block group (see default_state_parent),
    # so deleting them now would slow the sidecar's own creates that follow.
    return out


async def floors(n: int) -> dict[str, list[float]]:
    return {"spawn_ms": bare_spawn_ms(n), "ws_rtt_ms": await ws_round_trip_ms(n)}


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def thread_cpu_s(pid: int) -> dict[int, tuple[str, float, float]]:
    """Per thread of `pid`: its name, user and system CPU seconds."""
    out: dict[int, tuple[str, float, float]] = {}
    for t in psutil.Process(pid).threads():
        try:
            name = Path(f"/proc/{pid}/task/{t.id}/comm").read_text().strip()
        except OSError:
            continue
        out[t.id] = ("event loop" if t.id == pid else name, t.user_time, t.system_time)
    return out


def thread_cpu_delta(
    before: dict[int, tuple[str, float, float]], after: dict[int, tuple[str, float, float]], tasks: int
) -> list[tuple[str, float, float]]:
    """(name, user ms, system ms) per task for each thread that used CPU between the two snapshots."""
    rows = []
    for tid, (name, user, system) in after.items():
        u0, s0 = before.get(tid, (name, 0.0, 0.0))[1:]
        if user - u0 + system - s0 > 0:
            rows.append((name, (user - u0) * 1000 / tasks, (system - s0) * 1000 / tasks))
    return sorted(rows, key=lambda r: -(r[1] + r[2]))


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


async def one_task(hub: DevHub, command: str, agent: str | None = None) -> str:
    """Submit one shell task (to `agent`, else whoever is free) and wait for its end; its id."""
    tid = hub.submit(
        metadata={"shell_command": command}, routing_decision={"target_type": "sidecar"}, assign_to=agent
    )
    await hub.wait_until(lambda: hub.task(tid).status in ("completed", "dead_letter"), 30)
    return tid


async def run_tasks(hub: DevHub, n: int, command: str) -> list[str]:
    return [await one_task(hub, command) for _ in range(n)]


def latencies(hub: DevHub, ids: list[str], agent: str = AGENT) -> tuple[list[float], list[float]]:
    assigned: dict[str, float] = {}
    for f in hub.sent(agent, type="task_assign"):
        if f.frame is not None:
            assigned.setdefault(f.frame["task_id"], f.at)
    accepted: dict[str, float] = {}
    for f in hub.frames(agent, type="task_accepted"):
        if f.frame is not None:
            accepted.setdefault(f.frame["task_id"], f.at)
    completed: dict[str, float] = {}
    for f in hub.frames(agent, type="task_complete"):
        if f.frame is not None:
            completed.setdefault(f.frame["task_id"], f.at)
    acc = [(accepted[t] - assigned[t]) * 1000 for t in ids]
    comp = [(completed[t] - assigned[t]) * 1000 for t in ids]
    return acc, comp


def default_state_parent() -> Path:
    """Where the bench's state dir goes unless told: on the disk a user's state dir is on.

    Not $TMPDIR: /tmp is a tmpfs on many systems. Creating a file (every task
    creates its log) costs what the directory's block group makes it cost.
    On ext4 without a journal (this project's VMs: no jbd2 on /dev/vda), the
    inode allocator passes over every inode of the group freed in the last
    60 s (360 s while its inode-table block is dirty) one by one
    (`recently_deleted` in fs/ext4/ialloc.c). Each run deletes its state dir,
    thousands of log files, at its end, so a run started within minutes of
    the last one in the same group paid 0.3-0.9 ms of kernel CPU a create
    against 0.02 ms: the "slow directories" of earlier passes. A production
    sidecar deletes no log (operators prune by age), so its creates are the
    fast ones. This parent therefore has ext4's TOPDIR flag (`chattr +T`):
    each run's temporary directory is placed like a top-level one, in a
    group of its own choosing, not in the group of the last run's deletions.
    `file_create_ms` prints the create's cost in the same run.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trio-sidecar-bench"
    base.mkdir(parents=True, exist_ok=True)
    spread_subdirectories(base)
    return base


_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(path: Path) -> bool:
    """Set ext4's TOPDIR flag on `path` (best effort); whether it is set.

    Other file systems (tmpfs, btrfs, xfs) do not have it: False, nothing changed.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        flags = int.from_bytes(buf[:4], sys.byteorder)
        if not flags & _FS_TOPDIR_FL:
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, (flags | _FS_TOPDIR_FL).to_bytes(4, sys.byteorder) + bytes(4))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def describe(name: str, ms: list[float]) -> str:
    return (
        f"{name:<22}: median {statistics.median(ms):6.2f} ms  p99 {pct(ms, 99):6.2f} ms"
        f"  (min {min(ms):.2f}, max {max(ms):.2f}, n={len(ms)})"
    )


@contextlib.contextmanager
def hub_gc_paused(paused: bool = True) -> Iterator[None]:
    """This process's (the dev hub's) cyclic GC off while tasks are measured.

    The hub keeps every frame it saw, so its heap grows through a run, and its
    collections land inside the tasks they interrupt: per 1,000 tasks about 15
    of the middle generation (1.8 ms each) and one full one (26 ms), which
    set the p99 and the max of whatever worker is measured. The hub a sidecar
    meets in production has no such pauses. Reference counting still frees
    almost everything; what cycles there are wait until the end.
    """
    if not paused:
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def add_hub_gc_option(ap: argparse.ArgumentParser, during: str) -> None:
    """`--hub-gc paused|on`: this process's GC `during` the measurement (see `hub_gc_paused`)."""
    ap.add_argument(
        "--hub-gc",
        choices=("paused", "on"),
        default="paused",
        help=f"the hub process's cyclic GC during {during} (default paused: see latency.hub_gc_paused)",
    )


async def measure(worker: type[Sidecar], root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run the tasks through one worker process against a fresh dev hub; its figures."""
    async with open_dev_hub(tokens={AGENT: TOKEN}, limits=None) as hub:
        # Limits OFF at the hub, so the sidecar's model of its bucket is unbounded too.
        sc = worker(root, hub.ws_url, log_level=args.log_level, **UNLIMITED)
        profile = worker is Sidecar and args.profile
        try:
            await sc.start(["-m", "cProfile", "-o", args.profile] if profile else None)
            await hub.wait_until(lambda: hub.connected(AGENT), 30)
            await run_tasks(hub, args.warmup, args.command)
            sc_cpu0, hub_cpu0 = cpu_s(sc.pid), cpu_s(os.getpid())
            threads0 = thread_cpu_s(sc.pid)
            with hub_gc_paused(args.hub_gc == "paused"):
                t0 = trio.current_time()
                ids = await run_tasks(hub, args.tasks, args.command)
                wall = trio.current_time() - t0
            sc_cpu, hub_cpu = cpu_s(sc.pid) - sc_cpu0, cpu_s(os.getpid()) - hub_cpu0
            threads = thread_cpu_delta(threads0, thread_cpu_s(sc.pid), args.tasks)
            acc, comp = latencies(hub, ids)
            bad = [t for t in ids if hub.task(t).status != "completed"]
            assert not bad, f"{len(bad)} tasks did not complete"
            assert not hub.violations, hub.violations[:3]
            assert await sc.stop() == 0
            if args.keep_log and worker is Sidecar:
                await trio.Path(args.keep_log).write_bytes(await trio.Path(sc.log_path).read_bytes())
        finally:
            await sc.cleanup()
    return {
        "accept_ms": acc,
        "complete_ms": comp,
        "wall_s": wall,
        "sidecar_cpu_ms_per_task": sc_cpu * 1000 / args.tasks,
        "sidecar_threads": threads,
        "hub_cpu_ms_per_task": hub_cpu * 1000 / args.tasks,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    before = await floors(args.floor)
    with tempfile.TemporaryDirectory(dir=args.state_dir) as tmp:
        create = file_create_ms(args.floor, Path(tmp) / "create-floor-before")
        r = await measure(Sidecar, Path(tmp) / "sc", args)
        if args.skeleton:
            r["skeleton"] = await measure(Skeleton, Path(tmp) / "skeleton", args)
        if args.node:
            r["node"] = await measure(NodeFloor, Path(tmp) / "node", args)
        if args.node_model:
            r["node_model"] = await measure(NodeModel, Path(tmp) / "node-model", args)
        create += file_create_ms(args.floor, Path(tmp) / "create-floor-after")
    after = await floors(args.floor)
    r["spawn_ms"] = before["spawn_ms"] + after["spawn_ms"]
    r["ws_rtt_ms"] = before["ws_rtt_ms"] + after["ws_rtt_ms"]
    r["file_create_ms"] = create
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--command", default="true")
    ap.add_argument("--log-level", default="info", help="the sidecar's --log-level")
    ap.add_argument(
        "--state-dir",
        default=None,
        help="parent of the sidecar's state dir (default: $XDG_CACHE_HOME or ~/.cache, not /tmp)",
    )
    ap.add_argument("--profile", default=None, help="run the sidecar under cProfile, stats to this file")
    ap.add_argument("--keep-log", default=None, help="copy the sidecar's JSON log here")
    ap.add_argument("--floor", type=int, default=300, help="floor samples, before and after (default 300)")
    ap.add_argument("--json", action="store_true", help="also print the raw figures as JSON")
    add_hub_gc_option(ap, "the measured tasks")
    ap.add_argument(
        "--skeleton",
        action="store_true",
        help="also run bench/skeleton.py (the same durable steps, nothing else) and give the ratio to it",
    )
    ap.add_argument(
        "--node",
        action="store_true",
        help="also run bench/node_floor.js (the Node original's wire steps only) and give the ratio to it",
    )
    ap.add_argument(
        "--node-model",
        action="store_true",
        help="also run node_floor.js --original-steps (its wire steps and its own per-task writes and logs)",
    )
    args = ap.parse_args()
    if args.profile:
        args.profile = str(Path(args.profile).resolve())
    if args.state_dir is None:
        args.state_dir = str(default_state_parent())
    r = trio.run(bench, args)
    where = args.state_dir
    print(
        f"{args.tasks} sequential `{args.command}` tasks, dev hub on loopback, rate limits OFF,"
        f" sidecar log level {args.log_level}, state dir under {where}, hub GC {args.hub_gc}"
    )
    print(describe("assign -> task_accepted", r["accept_ms"]))
    print(describe("assign -> task_complete", r["complete_ms"]))
    spawn, rtt = statistics.median(r["spawn_ms"]), statistics.median(r["ws_rtt_ms"])
    acc, comp = statistics.median(r["accept_ms"]), statistics.median(r["complete_ms"])
    print(describe("floor: bare spawn", r["spawn_ms"]))
    print(describe("floor: ws round trip", r["ws_rtt_ms"]))
    print(describe("floor: file create", r["file_create_ms"]))
    create = statistics.median(r["file_create_ms"])
    print(
        f"ratio to floor        : accepted {acc / rtt:5.2f}x one round trip,"
        f" complete {comp / (rtt + spawn):5.2f}x one round trip + one spawn"
        f" ({comp / (rtt + spawn + create):.2f}x with one file create)"
    )
    print(
        f"throughput            : {args.tasks / r['wall_s']:6.1f} tasks/s"
        f"  CPU per task: sidecar {r['sidecar_cpu_ms_per_task']:.2f} ms,"
        f" hub+bench {r['hub_cpu_ms_per_task']:.2f} ms"
    )
    # The other "python" is the store's thread (Python does not name OS threads): its SQLite
    # calls and, since c9dd280, each task log's create (a slow create shows as its system time).
    # "Trio thread N" are to_thread workers (before c9dd280, the log's create ran in one).
    by_thread = ", ".join(
        f"{name} {user:.2f} user + {system:.2f} sys" for name, user, system in r["sidecar_threads"]
    )
    print(f"sidecar CPU by thread : {by_thread} (ms per task)")
    for key, label in (("skeleton", "skeleton"), ("node", "node floor"), ("node_model", "node model")):
        if key not in r:
            continue
        other = r[key]
        print(describe(f"{label}: accepted", other["accept_ms"]))
        print(describe(f"{label}: complete", other["complete_ms"]))
        other_acc, other_comp = statistics.median(other["accept_ms"]), statistics.median(other["complete_ms"])
        print(
            f"{'ratio to ' + label:<22}: accepted {acc / other_acc:5.2f}x, complete {comp / other_comp:5.2f}x"
            f"  ({label} CPU per task {other['sidecar_cpu_ms_per_task']:.2f} ms)"
        )
    if args.json:
        print(json.dumps({k: v for k, v in r.items()}))


if __name__ == "__main__":
    main()
