"""The chaos driver: real `sidecar run` processes, a dev hub, a fake Ollama, faults.

One `Episode` is one seeded run: `agents` sidecar processes (each its own agent
id, capacity and queue) against one dev hub (restarted at times on the same
port, keeping its tasks as the real hub does) and one fake Ollama server. A
submitter feeds a random schedule of tasks (shell, Ollama, Claude stand-in,
wake, each with a behaviour: fine, failing, stubborn, flooding, stalling, …);
an injector fires faults at random moments, some aimed at a phase of a task's
life (before accept, accepted but silent, mid-stream, in the SIGTERM grace,
result in flight, during shutdown). Then the faults stop, everything is let
settle, and `check()` tests Invariants 1-6 of shared/design.md from the
hub's records, the process table and each sidecar's state directory.

Everything random comes from one `random.Random(seed)`: the schedule and the
faults replay from the seed. (Timings between processes do not, so a replay
reproduces the same run of events, not the same interleaving.)
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from sidecar.devhub import DevHub, FrameRecord, HubState, open_dev_hub
from sidecar.procs import agent_marker_prefix, task_marker
from tests.fakes.ollama_server import OllamaServer, open_ollama_server
from tests.fakes.proc_helpers import wait_catching_sigterm
from tests.harness import SidecarProcess

from .dossier import Clock, task_dossier
from .procscan import describe, fd_count, marked_processes, read_state

TOKEN = "chaos-token-7"
HERE = Path(__file__).resolve().parent
CLAUDE_WRAPPER = HERE / "claude_chaos.py"
WAKE_AGENT = HERE.parent / "fakes" / "proc_wake_agent.py"
TERMINAL = ("task_complete", "task_failed")
FINISHED = ("completed", "dead_letter", "cancelled")
TASK_LOG_EVENTS = ("task_accepted", "task_started", "task_finished")
# Violating tasks per episode that get a dossier (tests/chaos/dossier.py).
DOSSIERS_MAX = 20

# Task kinds and their weights in a schedule.
KINDS: dict[str, float] = {
    "shell_ok": 30,
    "shell_slow": 12,
    "shell_fail": 5,
    "shell_flood": 3,
    "shell_stubborn": 3,
    "shell_grandchild": 3,
    "shell_setsid": 3,
    "shell_close_stdout": 3,
    "ollama_ok": 8,
    "ollama_stall": 2,
    "ollama_reset": 2,
    "ollama_truncate": 2,
    "ollama_error": 1,
    "claude_ok": 5,
    "claude_hang": 2,
    "claude_stubborn": 1,
    "claude_orphan": 2,
    "wake_ok": 4,
    "wake_fail": 1,
    "wake_background": 1,
}

# Kinds that must never be reported a success, whatever faults hit them.
NEVER_COMPLETES = frozenset(
    {
        "shell_fail",
        "shell_stubborn",
        "ollama_stall",
        "ollama_reset",
        "ollama_truncate",
        "ollama_error",
        "claude_stubborn",
        "wake_fail",
    }
)
# Kinds that a fault-free run completes (failures only for fault reasons).
MUST_COMPLETE = frozenset({"shell_ok", "ollama_ok", "claude_ok", "wake_ok", "shell_flood"})
FAULT_REASONS = frozenset({"sidecar_shutdown", "sidecar_busy"})

FAULTS: dict[str, float] = {
    "hub_drop": 6,
    "hub_close": 3,
    "hub_stall": 3,
    "hub_restart": 2,
    "rate_limited": 5,
    "validation_failed": 4,
    "hub_cancel": 6,
    "duplicate_assign": 4,
    "stale_assign": 3,
    "garbage": 5,
    "sidecar_sigterm": 2,
    "sidecar_kill9": 3,
    "result_in_flight": 4,
}
PHASES = ("any", "before_accept", "accepted_silent", "mid_stream", "sigterm_grace", "shutdown")

GARBAGE: list[str | bytes] = [
    "not json at all",
    "[1,2,3]",
    "{}",
    '{"type": null}',
    '{"type": "task_assign"}',
    '{"type": "task_assign", "task_id": 5}',
    '{"type": "task_ack", "task_id": [], "status": {}}',
    '{"type": "task_cancelled", "task_id": "no-such-task"}',
    '{"type": "task_continue", "task_id": "ghost", "generation": "x"}',
    '{"type": "rate_limited", "retry_after_ms": -5}',
    '{"type": "rate_limited", "retry_after_ms": 1e308}',
    '{"type": "error"}',
    '{"type": "state_report_ack", "task_id": "ghost", "action": "abort"}',
    '{"type": "' + "z" * 3000 + '"}',
    '{"type": "task_assign", "task_id": "g", "metadata": {"shell_command": 7}}',
    "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
    '{"a":' * 2000 + "1" + "}" * 2000,
    b"\x00\x01binary",
]


@attrs.define
class Planned:
    task_id: str
    kind: str
    token: str


@attrs.define
class KillSnapshot:
    """What a sidecar's state dir held right after a kill -9."""

    agent: str
    at: float
    hub_index: int
    in_flight: list[tuple[str, int, str]]
    outbox: list[tuple[str, int, str]]


@attrs.define
class Agent:
    name: str
    proc: ChaosSidecar
    up: bool = False
    fd_baseline: int | None = None
    expected_exit: bool = False
    # The current process was sent SIGKILL by a kill -9 fault: its -9 is no crash.
    killed9: bool = False
    starts: list[float] = attrs.field(factory=list)  # trio times of each start
    crashes: list[str] = attrs.field(factory=list)


@attrs.define
class Report:
    seed: int
    lifecycles: int = 0
    tasks: int = 0
    faults: Counter[str] = attrs.field(factory=Counter)
    phases: Counter[str] = attrs.field(factory=Counter)
    outcomes: Counter[str] = attrs.field(factory=Counter)
    violations: list[str] = attrs.field(factory=list)
    transit_gaps: int = 0
    announced_gaps: int = 0
    kill9: int = 0
    hub_restarts: int = 0
    elapsed_s: float = 0.0
    submit_s: float = 0.0
    settle_s: float = 0.0
    # Marked processes seen at the idle check that were gone within its 5 s
    # second look (a teardown still in its grace period), counted, not excused silently.
    late_exits: int = 0
    # Results left on disk at the final stop that the hub would refuse (stale).
    stale_left: int = 0
    # Violation -> what the episode knew of the task(s) it names (`dossier.py`).
    details: dict[str, str] = attrs.field(factory=dict)

    def merge(self, other: Report) -> None:
        self.lifecycles += other.lifecycles
        self.tasks += other.tasks
        self.faults.update(other.faults)
        self.phases.update(other.phases)
        self.outcomes.update(other.outcomes)
        self.violations.extend(other.violations)
        self.transit_gaps += other.transit_gaps
        self.announced_gaps += other.announced_gaps
        self.kill9 += other.kill9
        self.hub_restarts += other.hub_restarts
        self.late_exits += other.late_exits
        self.stale_left += other.stale_left
        self.details.update(other.details)

    def text(self, violation: str) -> str:
        """A violation with its dossier, if it has one (indented below it)."""
        detail = self.details.get(violation)
        if not detail:
            return violation
        return violation + "\n" + "\n".join("    " + line for line in detail.splitlines())


class ChaosSidecar(SidecarProcess):
    """The harness's process, with its own TMPDIR (Invariant 3: no temp file left)."""

    def __init__(self, root: Path, hub_url: str, **overrides: Any) -> None:
        super().__init__(root, hub_url, fmt="json", **overrides)
        self.tmpdir = root / "tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)

    def argv(self, config_path: Path) -> list[str]:
        # The daemon's default log level (info), not the harness's debug.
        return [sys.executable, "-m", "sidecar", "--log-format", "json", "run", "--config", str(config_path)]

    def child_env(self) -> dict[str, str]:
        return {**super().child_env(), "TMPDIR": str(self.tmpdir), "CHAOS_PID_DIR": str(self.root)}


class Episode:
    def __init__(
        self,
        seed: int,
        root: Path,
        *,
        agents: int = 4,
        tasks: int = 150,
        capacity: int = 4,
        queue: int = 2,
        fault_every_s: float = 0.3,
        submit_every_s: float = 0.15,
        settle_s: float = 90.0,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.root = root
        self.n_agents = agents
        self.n_tasks = tasks
        self.capacity = capacity
        self.queue = queue
        self.fault_every_s = fault_every_s
        self.submit_every_s = submit_every_s
        self.settle_s = settle_s
        self.report = Report(seed)
        self.prefix = f"c{seed % 10**8}"
        self.agents: dict[str, Agent] = {}
        self.planned: dict[str, Planned] = {}
        self.kills: list[KillSnapshot] = []
        self.hubs: list[DevHub] = []
        self.hub: DevHub | None = None
        self.hub_up = trio.Event()
        self.state = HubState()
        self.port = 0
        self.ollama: OllamaServer | None = None
        self.faulting = True
        self._restart_hub = trio.Event()
        self._hub_gone = trio.Event()
        self._inflight_drops = 0
        self.clock = Clock(0.0, 0.0)
        # Violation -> the task ids it names, for their dossiers at the episode's end.
        self._named: dict[str, list[str]] = {}

    # -- set-up ------------------------------------------------------------------

    def _agent_config(self, name: str) -> dict[str, Any]:
        assert self.ollama is not None
        results = self.root / name / "results"
        results.mkdir(parents=True, exist_ok=True)
        wake = f'{sys.executable} {WAKE_AGENT} {results} "${{TASK_DESCRIPTION}}" "${{TASK_ID}}"'
        return {
            "agent_id": name,
            "token": TOKEN,
            "capacity": self.capacity,
            "queue_length": self.queue,
            "kill_grace_s": 0.4,
            "backoff_initial_s": 0.05,
            "backoff_max_s": 0.4,
            "ping_interval_s": 0.5,
            "pong_timeout_s": 0.7,
            "connect_timeout_s": 3.0,
            "shutdown_grace_s": 3.0,
            "progress_window_s": 0.05,
            # The chaos hub runs without rate limits: the sidecar's model of the
            # hub's bucket must say so, or it paces itself to the real hub's 60.
            "hub_rate_capacity": 1_000_000,
            "hub_rate_refill_per_s": 1_000_000.0,
            "default_timeout_ms": 30_000,
            # The same bound for LLM and wake tasks as for shell ones (by default theirs is minutes).
            "time_limits": {k: 30_000 for k in ("trivial_ms", "standard_ms", "complex_ms", "unknown_ms")},
            "output_cap_bytes": 64 * 1024,
            "confirmation_timeout_ms": 5_000,
            "results_dir": str(results),
            "wake_command": wake,
            "repo_dir": str(self.root / name / "repo"),
            "ollama_url": self.ollama.url,
            "ollama": {"idle_timeout_s": 0.5, "connect_timeout_s": 2.0},
            "claude": {"binary": str(self.root / "claude")},
        }

    def _write_claude_wrapper(self) -> None:
        path = self.root / "claude"
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {CLAUDE_WRAPPER} "$@"\n')
        path.chmod(0o755)

    # -- the run -----------------------------------------------------------------

    async def run(self) -> Report:
        start = trio.current_time()
        self.clock = Clock(start, time.time() - start)
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_claude_wrapper()
        async with open_ollama_server() as ollama, trio.open_nursery() as nursery:
            self.ollama = ollama
            nursery.start_soon(self._hub_owner)
            await self.hub_up.wait()
            for i in range(self.n_agents):
                name = f"{self.prefix}-a{i}"
                (self.root / name / "repo").mkdir(parents=True, exist_ok=True)
                proc = ChaosSidecar(self.root / name, self._hub().ws_url, **self._agent_config(name))
                self.agents[name] = Agent(name, proc)
            try:
                for agent in self.agents.values():
                    await self._start(agent)
                async with trio.open_nursery() as inner:
                    inner.start_soon(self._injector)
                    await self._submitter()
                    self.faulting = False
                    inner.cancel_scope.cancel()
                self.report.submit_s = trio.current_time() - start
                self._check_fault_rate()
                await self._settle()
                self.report.settle_s = trio.current_time() - start - self.report.submit_s
                await self._check_and_stop()
            finally:
                # Shielded: an episode ended by an exception (its hub crashed) is being
                # cancelled, and an unshielded wait here would stop at the first agent,
                # leaving the others' processes running after the test.
                with trio.CancelScope(shield=True):
                    for agent in self.agents.values():
                        await agent.proc.cleanup()
                self._sweep_leftovers()
                self._write_dossiers()
                nursery.cancel_scope.cancel()
        self.report.elapsed_s = trio.current_time() - start
        return self.report

    def _check_fault_rate(self) -> None:
        """An episode that injected far fewer faults than its schedule proves little."""
        expected = self.report.submit_s / self.fault_every_s
        injected = sum(self.report.faults.values())
        # Faults run one after another and many wait (stalls, restarts), so about a
        # quarter of the schedule is normal; a stuck injector managed a twentieth.
        if expected >= 20 and injected < expected / 10:
            self.report.violations.append(
                f"[seed {self.seed}] driver: {injected} faults in {self.report.submit_s:.0f} s "
                f"of submitting, {expected:.0f} expected"
            )

    def _hub(self) -> DevHub:
        assert self.hub is not None
        return self.hub

    async def _hub_owner(self) -> None:
        tokens = {f"{self.prefix}-a{i}": TOKEN for i in range(self.n_agents)}
        while True:
            async with open_dev_hub(
                port=self.port,
                tokens=tokens,
                state=self.state,
                limits=None,
                concurrency=self.capacity + self.queue,
                accept_timeout=20.0,
                stuck_timeout=60.0,
            ) as hub:
                self.port = hub.port
                self._instrument(hub)
                self.hubs.append(hub)
                self.hub = hub
                self._hub_gone = trio.Event()
                self.hub_up.set()
                await self._restart_hub.wait()
                self._restart_hub = trio.Event()
                self.hub_up = trio.Event()
                self.hub = None
            self._hub_gone.set()
            self.state = self.state.restarted()
            await trio.sleep(self.rng.uniform(0.05, 1.0))

    def _instrument(self, hub: DevHub) -> None:
        """Drop the socket just as a result arrives, sometimes: its ack is then lost."""
        original = hub.record_received

        def record(rec: FrameRecord) -> None:
            original(rec)
            if (
                self.faulting
                and self._inflight_drops > 0
                and rec.type in TERMINAL
                and rec.verdict == "ok"
                and rec.agent_id is not None
            ):
                self._inflight_drops -= 1
                self.report.faults["result_in_flight"] += 1
                for s in list(hub._sessions):
                    if s.id == rec.session:
                        s.abort()

        hub.record_received = record  # type: ignore[method-assign]

    async def _start(self, agent: Agent) -> None:
        agent.proc.config["hub_url"] = self._hub().ws_url if self.hub else agent.proc.config["hub_url"]
        await agent.proc.start()
        agent.up = True
        agent.expected_exit = False
        agent.killed9 = False
        agent.starts.append(trio.current_time())

    # -- schedule ----------------------------------------------------------------

    def _plan(self, n: int) -> tuple[str, dict[str, Any]]:
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        token = f"tok{self.seed % 10**6}x{n}"
        assert self.ollama is not None
        ollama_rd = {
            "target_type": "ollama",
            "selected_endpoint": f"127.0.0.1:{self.ollama.port}",
            "selected_model": "qwen3:8b",
        }
        shell = {"target_type": "sidecar"}
        fields: dict[str, Any] = {"description": f"chaos task {token}", "max_retries": 3}
        meta: dict[str, Any] = {}
        rd: dict[str, Any] | None = shell
        py = sys.executable
        if kind == "shell_ok":
            meta["shell_command"] = f"echo {token}"
        elif kind == "shell_slow":
            meta["shell_command"] = (
                f"for i in 1 2 3 4 5; do echo {token}-$i; sleep {self.rng.uniform(0.02, 0.3):.3f}; done"
            )
        elif kind == "shell_fail":
            meta["shell_command"] = f"echo {token} >&2; exit 3"
            fields["max_retries"] = 1
        elif kind == "shell_flood":
            meta["shell_command"] = f"echo {token}; yes {token} | head -c 400000"
        elif kind == "shell_stubborn":
            code = textwrap.dedent(
                """
                import os, signal, time
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                os.fork()
                print("stubborn", os.getpid(), flush=True)
                while True:
                    time.sleep(0.05)
                """
            )
            meta["shell_command"] = f"{py} -c '{code}'"
            meta["timeout_ms"] = self.rng.choice([300, 600, 900])
            fields["max_retries"] = 1
        elif kind == "shell_grandchild":
            meta["shell_command"] = f"sleep 30 & echo {token}"
            meta["timeout_ms"] = 5_000
        elif kind == "shell_setsid":
            meta["shell_command"] = f"setsid sleep 30 >/dev/null 2>&1 < /dev/null & echo {token}"
        elif kind == "shell_close_stdout":
            meta["shell_command"] = f"echo {token}; exec >&- 2>&-; sleep 0.3"
        elif kind.startswith("ollama"):
            rd = ollama_rd
            fields["description"] = f"say {token}"
            directive = {
                "ollama_ok": "!delay_s=0.01",
                "ollama_stall": "!stall_after=2",
                "ollama_reset": "!reset_after=2",
                "ollama_truncate": "!truncate_after=2",
                "ollama_error": "!error_after=1",
            }[kind]
            rd["selected_model"] = "qwen3:8b" + directive
            fields["max_retries"] = 1 if kind != "ollama_ok" else 3
        elif kind.startswith("claude"):
            mode = kind.split("_", 1)[1]
            rd = {"target_type": "claude", "selected_endpoint": "claude_api", "selected_model": "claude"}
            fields["description"] = f"do {token} chaos-claude={mode}"
            if mode in ("hang", "stubborn"):
                meta["timeout_ms"] = 800
                fields["max_retries"] = 1
        elif kind.startswith("wake"):
            rd = None
            modes = {"wake_ok": "success", "wake_fail": "fail", "wake_background": "background"}
            fields["description"] = modes[kind]
            if kind == "wake_fail":
                fields["max_retries"] = 1
        fields["metadata"] = meta
        fields["routing_decision"] = rd
        fields["task_id"] = f"{self.prefix}-t{n}"
        return kind, fields

    async def _submitter(self) -> None:
        for n in range(self.n_tasks):
            kind, fields = self._plan(n)
            while self.hub is None:
                await self.hub_up.wait()
            tid = self._hub().submit(fields)
            self.planned[tid] = Planned(tid, kind, fields["description"])
            self.report.tasks += 1
            await trio.sleep(self.rng.expovariate(1 / self.submit_every_s))
            # Keep the backlog bounded so faults land on running tasks.
            while self.hub is not None and len(self.state.queued()) > 3 * self.n_agents:
                with trio.move_on_after(0.2):
                    await self._hub()._changed.wait()

    # -- faults ------------------------------------------------------------------

    async def _injector(self) -> None:
        while True:
            await trio.sleep(self.rng.expovariate(1 / self.fault_every_s))
            fault = self.rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
            phase = self.rng.choice(PHASES)
            try:
                # No fault takes this long (the slowest waits 30 s for an exit):
                # a driver stuck here would quietly stop injecting for the rest
                # of the episode, as a lost dev-hub write once made it do.
                with trio.move_on_after(60) as bound:
                    await self._fault(fault, phase)
                if bound.cancelled_caught:
                    self.report.violations.append(
                        f"[seed {self.seed}] driver: fault {fault}@{phase} still running after 60 s"
                    )
            except KeyError:
                pass  # the agent went away meanwhile

    def _up_agents(self) -> list[Agent]:
        hub = self.hub
        return [a for a in self.agents.values() if a.up and hub is not None and hub.connected(a.name)]

    async def _target(self, phase: str) -> tuple[Agent, str | None] | None:
        """An agent (and a task of it) in `phase`, waiting a little for one."""
        if phase in ("any", "shutdown", "sigterm_grace"):
            ups = self._up_agents()
            if not ups:
                return None
            agent = self.rng.choice(ups)
            return agent, None
        with trio.move_on_after(1.0):
            while True:
                hub = self.hub
                if hub is None:
                    return None
                cands = []
                for rec in self.state.tasks.values():
                    held_by = self.agents.get(rec.assigned_to or "")
                    if held_by is None or not held_by.up or not hub.connected(held_by.name):
                        continue
                    if phase == "before_accept" and rec.status == "assigned":
                        cands.append((held_by, rec.task_id))
                    elif phase == "accepted_silent" and rec.status == "accepted" and not rec.progress:
                        cands.append((held_by, rec.task_id))
                    elif phase == "mid_stream" and rec.status == "accepted" and rec.progress:
                        cands.append((held_by, rec.task_id))
                if cands:
                    return self.rng.choice(cands)
                await hub._changed.wait()
        return None

    async def _fault(self, fault: str, phase: str) -> None:
        if fault == "result_in_flight":
            self._inflight_drops += 1
            return
        if fault == "hub_restart":
            if self.hub is not None and self.rng.random() < 0.5:
                self.report.faults[fault] += 1
                self.report.hub_restarts += 1
                self._restart_hub.set()
                await self._hub_gone.wait()
            return
        target = await self._target(phase)
        if target is None or self.hub is None:
            return
        agent, tid = target
        hub = self.hub
        self.report.faults[fault] += 1
        self.report.phases[f"{fault}@{phase}"] += 1
        if phase == "sigterm_grace":
            # Cancel a task of this agent (its children get SIGTERM), then the fault.
            held = [r for r in hub.state.assigned_to(agent.name) if r.status == "accepted"]
            if held:
                hub.cancel(self.rng.choice(held).task_id)
                await trio.sleep(self.rng.uniform(0, 0.3))
        if phase == "shutdown" and fault not in ("sidecar_sigterm", "sidecar_kill9"):
            await self._sigterm(agent, restart_after=False)
            await trio.sleep(self.rng.uniform(0, 0.2))
        await self._apply(fault, agent, tid)
        if phase == "shutdown" and not agent.up:
            await self._restart_later(agent)

    async def _apply(self, fault: str, agent: Agent, tid: str | None) -> None:
        hub = self.hub
        if hub is None:
            return
        name = agent.name
        connected = hub.connected(name)
        if fault == "hub_drop" and connected:
            await hub.drop(name)
        elif fault == "hub_close" and connected:
            await hub.disconnect(name, 1001, "going away")
        elif fault == "hub_stall":
            hub.stall(name, True)
            await trio.sleep(self.rng.uniform(0.2, 1.5))
            hub.stall(name, False)
        elif fault == "rate_limited" and connected:
            await hub.send_frame(
                name, {"type": "rate_limited", "retry_after_ms": self.rng.randint(0, 1500), "tier": "normal"}
            )
        elif fault == "validation_failed" and connected:
            mtype = self.rng.choice(["task_progress", "resource_report", "ping", "ollama_report"])
            await hub.send_frame(
                name,
                {
                    "type": "error",
                    "error": "validation_failed",
                    "message_type": mtype,
                    "errors": [{"path": "x", "error": "chaos"}],
                },
            )
        elif fault == "hub_cancel":
            tid = tid or self._any_task_of(name)
            if tid is not None:
                hub.cancel(tid)
        elif fault in ("duplicate_assign", "stale_assign") and connected:
            tid = tid or self._any_task_of(name, include_finished=True)
            if tid is None:
                return
            rec = hub.task(tid)
            if not rec.assigns or rec.assigned_to not in (name, None):
                return
            frame = dict(rec.assigns[-1])
            if fault == "stale_assign":
                frame["generation"] = max(0, int(frame["generation"]) - 1)
            await hub.send_frame(name, frame)
        elif fault == "garbage" and connected:
            for _ in range(self.rng.randint(1, 4)):
                await hub.send_raw(name, self.rng.choice(GARBAGE))
        elif fault == "sidecar_sigterm":
            await self._sigterm(agent, restart_after=True)
        elif fault == "sidecar_kill9":
            await self._kill9(agent)

    def _any_task_of(self, agent: str, include_finished: bool = False) -> str | None:
        recs = [r for r in self.state.tasks.values() if r.assigned_to == agent and r.status in ("accepted",)]
        if include_finished and not recs:
            recs = [r for r in self.state.tasks.values() if r.status == "completed" and r.assigns]
            recs = [r for r in recs if any(h[2].get("agent_id") == agent for h in r.history[-2:])]
        return self.rng.choice(recs).task_id if recs else None

    async def _sigterm(self, agent: Agent, *, restart_after: bool) -> None:
        if not agent.up:
            return
        agent.expected_exit = True
        proc = agent.proc.proc
        assert proc is not None
        # Not in the first tens of milliseconds of a (re)started process, before
        # Python runs `sidecar/entry.py`: nothing can catch a signal there, and it
        # ends the process by the signal (a known limit, docs/reliability.md "Open";
        # nothing has been started or stored by then). I5 holds from there on.
        await wait_catching_sigterm(proc.pid)  # bounded: past it, an exit by the signal is I5
        proc.send_signal(signal.SIGTERM)
        agent.up = False
        if restart_after:
            await self._wait_exit(agent)
            await self._start(agent)
        # else: the caller restarts it later

    async def _wait_exit(self, agent: Agent) -> None:
        proc = agent.proc.proc
        assert proc is not None
        with trio.move_on_after(30) as scope:
            code = await proc.wait()
        if scope.cancelled_caught:
            agent.crashes.append("graceful shutdown took over 30 s")
            proc.kill()
            await proc.wait()
        elif code != 0 and not (agent.killed9 and code == -signal.SIGKILL):
            agent.crashes.append(f"exit code {code} after SIGTERM")

    async def _restart_later(self, agent: Agent) -> None:
        await self._wait_exit(agent)
        while self.hub is None:
            await self.hub_up.wait()
        await self._start(agent)

    async def _kill9(self, agent: Agent) -> None:
        if not agent.up:
            return
        agent.expected_exit = True
        # Down before the wait: the SIGKILL goes out at once, and a fault cancelled
        # while it waits (the submit phase ending) must not leave a dead process
        # marked up, for the final stop to SIGTERM and then report as "exit code -9
        # after SIGTERM" (I5) although the sidecar never saw that SIGTERM.
        agent.up = False
        agent.killed9 = True
        await agent.proc.kill9()
        self.report.kill9 += 1
        in_flight, outbox = read_state(agent.proc.state_dir)
        self.kills.append(KillSnapshot(agent.name, trio.current_time(), len(self.hubs), in_flight, outbox))
        await trio.sleep(self.rng.uniform(0, 0.3))
        while self.hub is None:
            await self.hub_up.wait()
        await self._start(agent)

    # -- settle and check ----------------------------------------------------------

    async def _settle(self) -> None:
        while self.hub is None:
            await self.hub_up.wait()
        hub = self._hub()
        for agent in self.agents.values():
            hub.stall(agent.name, False)
            if not agent.up:
                await self._restart_later(agent)
        for agent in self.agents.values():
            self._check_alive(agent)

        def done() -> bool:
            return all(r.status in FINISHED for r in self.state.tasks.values())

        try:
            await hub.wait_until(done, self.settle_s)
        except trio.TooSlowError:
            for rec in self.state.tasks.values():
                if rec.status not in FINISHED:
                    self._violation(
                        1,
                        f"task {rec.task_id} ({self.planned[rec.task_id].kind}) never finished: "
                        f"status {rec.status} gen {rec.generation}, history {rec.history[-6:]}",
                        rec.task_id,
                    )
        await self._await_kill_leftovers(15.0)
        # Let results of cancelled tasks' cleanup and queued progress drain.
        await trio.sleep(1.0)

    def _check_alive(self, agent: Agent) -> None:
        proc = agent.proc.proc
        if agent.up and proc is not None and proc.returncode is not None:
            self._violation(5, f"{agent.name} died by itself: exit code {proc.returncode}")
            agent.up = False

    def _violation(self, invariant: int, text: str, task_id: str | None = None) -> None:
        line = f"[seed {self.seed}] I{invariant}: {text}"
        self.report.violations.append(line)
        if task_id is not None:
            self._named.setdefault(line, []).append(task_id)

    def _write_dossiers(self) -> None:
        """Attach to each violation naming a task what the episode knew of it.

        Built once at the end (each sidecar's log read once), when the logs hold
        everything, shutdown included. Also written beside the episode's state
        dirs, as `violations.txt`.
        """
        if not self.report.violations:
            return
        events = {name: agent.proc.events() for name, agent in self.agents.items()}
        tasks = list(dict.fromkeys(t for ids in self._named.values() for t in ids))[:DOSSIERS_MAX]
        built: dict[str, str] = {}
        for tid in tasks:
            plan = self.planned.get(tid)
            built[tid] = task_dossier(
                tid,
                kind=plan.kind if plan else "?",
                state=self.state,
                hubs=self.hubs,
                logs={name: (task_marker(name, tid), evs) for name, evs in events.items()},
                clock=self.clock,
            )
        for line, ids in self._named.items():
            parts = [built[t] for t in ids if t in built]
            if parts:
                self.report.details[line] = "\n".join(parts)
        if self.root.is_dir():
            (self.root / "violations.txt").write_text(
                "".join(self.report.text(v) + "\n" for v in self.report.violations)
            )

    async def _check_and_stop(self) -> None:
        for agent in self.agents.values():
            self._check_alive(agent)
        self._check_tasks()
        self._check_progress()
        self._check_kills()
        # Idle now: nothing of ours may be running, and fds are back near the baseline.
        await self._check_no_processes()
        for agent in self.agents.values():
            if agent.up:
                fds = fd_count(agent.proc.pid)
                if fds > 64:
                    self._violation(3, f"{agent.name} holds {fds} file descriptors when idle")
        # Graceful stop of everyone: exit code 0, nothing left in the state dirs.
        for agent in self.agents.values():
            if agent.up:
                await self._sigterm(agent, restart_after=False)
                await self._wait_exit(agent)
            for text in agent.crashes:
                self._violation(5, f"{agent.name}: {text}")
            in_flight, outbox = read_state(agent.proc.state_dir)
            # A result still stored is a loss only if the hub still needs it. One the
            # hub would refuse (its task since given out again, or already ended by
            # this very generation, or unknown to it) is harmless: it waits on disk
            # and is retired at the next start. This happens when the episode ends
            # inside a rate-limit pause (a `garbage` rate_limited frame asks for 30 s).
            needed = [item for item in outbox if self._result_needed(*item)]
            if in_flight or needed:
                self._violation(1, f"{agent.name} state dir still holds {in_flight} / {needed}")
            self.report.stale_left += len(outbox) - len(needed)
            assert isinstance(agent.proc, ChaosSidecar)
            tmp = [p.name for p in agent.proc.tmpdir.iterdir()]
            if tmp:
                self._violation(3, f"{agent.name} left temp files {tmp[:5]}")
            results = agent.proc.root / "results"
            left = [p.name for p in results.iterdir() if not p.name.endswith(".pid")]
            if left:
                self._violation(3, f"{agent.name} left wake files {left[:5]}")
            text = agent.proc.log_text()
            if "Traceback" in text:
                at = text.index("Traceback")
                self._violation(5, f"{agent.name} logged a traceback: {text[at : at + 800]}")

    def _marked(self) -> dict[int, str]:
        return {pid: m for a in self.agents for pid, m in marked_processes(agent_marker_prefix(a)).items()}

    async def _check_no_processes(self) -> None:
        """Invariant 2 at idle: no process any task started is alive.

        A process found is looked at again for up to 5 s: a teardown whose grace
        period is still running (the hub's view of a task can end before the
        sidecar's) is not a leak. What remains is reported with everything
        known of it: which task and agent, what the sidecar logged of that task,
        and the process's parent, group, age and command.
        """
        first = mine = self._marked()
        with trio.move_on_after(5.0):
            while mine:
                await trio.sleep(0.1)
                mine = self._marked()
        self.report.late_exits += len(set(first) - set(mine))
        if not mine:
            return
        owners = {task_marker(a, tid): (a, tid) for a in self.agents for tid in self.planned}
        for pid, marker in sorted(mine.items()):
            agent, tid = owners.get(marker, ("?", "?"))
            rec = self.state.tasks.get(tid)
            plan = self.planned.get(tid)
            up = self.agents[agent].up if agent in self.agents else "?"
            logged = [
                (e.get("event"), e.get("generation"), e.get("outcome"))
                for e in (self.agents[agent].proc.events() if agent in self.agents else [])
                if e.get("task_id") == tid and e.get("event") in TASK_LOG_EVENTS
            ]
            self._violation(
                2,
                f"process alive at idle: {describe(pid)} of task {tid} "
                f"({plan.kind if plan else '?'}) on {agent}; hub status "
                f"{rec.status if rec else '?'}, history {rec.history[-4:] if rec else []}; "
                f"sidecar log {logged[-6:]}; agent up {up}",
                tid if tid in self.planned else None,
            )

    def _result_needed(self, task_id: str, generation: int, kind: str) -> bool:
        rec = self.state.tasks.get(task_id)
        if rec is None or rec.generation != generation:
            return False  # unknown to the hub, or superseded: it would be refused
        return rec.status not in FINISHED  # the hub still waits for this generation's end

    def _accepted_by_sidecar(self, task_id: str, info: dict[str, Any]) -> bool:
        """Did the sidecar the hub took this task from ever accept that generation?

        A `task_assign` lost with a dying socket (a drop, a stalled hub) never
        reached the sidecar: the hub's clock reclaims it, as it must, and that is
        no fault of the sidecar's (Invariant 1 is about tasks it accepted).
        """
        agent = self.agents.get(str(info.get("agent_id")))
        if agent is None:
            return True
        gen = info.get("generation")
        # Wire evidence first: the hub received task_accepted for this generation.
        rec = self.state.tasks.get(task_id)
        if rec is not None and any(
            e == "accepted" and i.get("generation") == gen and i.get("agent_id") == agent.name
            for e, _, i in rec.history
        ):
            return True
        # Else the sidecar's own word: it logs task_accepted once the task is stored,
        # before it sends the frame (which a dying socket may then lose).
        return any(
            e.get("task_id") == task_id and e.get("generation") == gen
            for e in agent.proc.events("task_accepted")
        )

    def _check_tasks(self) -> None:
        rep = self.report
        for rec in self.state.tasks.values():
            plan = self.planned[rec.task_id]
            rep.lifecycles += len(rec.assigns)
            rep.outcomes[f"{plan.kind}:{rec.status}"] += 1
            events = [e for e, _, _ in rec.history]
            bad = [
                h
                for h in rec.history
                if h[0] == "reclaimed"
                and h[2].get("reason") != "agent_disconnect"
                and self._accepted_by_sidecar(rec.task_id, h[2])
            ]
            if bad:
                self._violation(1, f"{rec.task_id} reclaimed by a hub clock: {bad}", rec.task_id)
            if rec.status == "completed":
                if plan.kind in NEVER_COMPLETES:
                    self._violation(
                        1, f"{rec.task_id} ({plan.kind}) reported success: {rec.result}", rec.task_id
                    )
                out = str((rec.result or {}).get("output", ""))
                token = plan.token.split()[-1] if plan.kind.startswith("shell") else None
                if token and plan.kind != "shell_stubborn" and token not in out:
                    self._violation(
                        1, f"{rec.task_id} ({plan.kind}) output lacks {token!r}: {out[:200]!r}", rec.task_id
                    )
                if plan.kind == "wake_ok" and f"did {rec.task_id}" not in out:
                    self._violation(1, f"{rec.task_id} wake output wrong: {out[:200]!r}", rec.task_id)
            elif rec.status == "dead_letter" and plan.kind in MUST_COMPLETE:
                reasons = {f.get("reason") for f in rec.failures}
                if not reasons <= FAULT_REASONS:
                    self._violation(1, f"{rec.task_id} ({plan.kind}) failed: {rec.failures[-1]}", rec.task_id)
            assert events  # every task has a history
        # At most one terminal outcome per (task, generation).
        for rec in self.state.tasks.values():
            terminal = [h for h in rec.history if h[0] in ("completed", "retried", "dead_letter")]
            gens = Counter(h[2].get("generation") for h in terminal if h[0] != "dead_letter")
            for gen, n in gens.items():
                if n > 1:
                    self._violation(1, f"{rec.task_id} gen {gen} finished {n} times", rec.task_id)

    def _check_progress(self) -> None:
        """Invariant 4: per task and sidecar run, seq rises by one; gaps are announced."""
        runs: dict[tuple[str, str, int], list[tuple[float, int, int, dict[str, Any]]]] = {}
        for hi, hub in enumerate(self.hubs):
            # A frame belongs to the sidecar run that opened its connection: by when the
            # hub first heard on that session, not when it read the frame. A killed
            # run's last frames may be read after its successor has started (they were
            # in the socket's buffer), and counted in the new run they looked like seq
            # going back to 1.
            opened: dict[int, float] = {}
            for f in hub.frames():
                opened[f.session] = min(opened.get(f.session, f.at), f.at)
            for f in hub.frames(type="task_progress"):
                if f.frame is None or f.agent_id is None or f.verdict != "ok":
                    continue
                ev = f.frame.get("execution_event")
                if not isinstance(ev, dict) or not isinstance(ev.get("seq"), int):
                    continue
                agent = self.agents.get(f.agent_id)
                starts = agent.starts if agent else [0.0]
                run = sum(1 for s in starts if s <= opened[f.session])
                key = (f.agent_id, str(f.frame.get("task_id")), run)
                runs.setdefault(key, []).append((f.at, hi * 10**6 + f.session, ev["seq"], ev))
        for key, items in runs.items():
            # In send order: a sidecar run speaks on one connection at a time, so a
            # later session (hub, then session id) carries later frames. Arrival order
            # is not send order: a stalled hub reads an old socket's last frames after
            # the sidecar has given up on it and said more on a new one.
            items.sort(key=lambda x: (x[1], x[0]))
            prev_seq, prev_session = 0, None
            for _, session, seq, ev in items:
                if seq <= prev_seq:
                    self._violation(4, f"{key}: seq {seq} after {prev_seq}", key[1])
                elif seq != prev_seq + 1:
                    announced = (ev.get("dropped_events") or 0) > 0 or (ev.get("dropped_bytes") or 0) > 0
                    if announced:
                        self.report.announced_gaps += 1
                    elif prev_session is not None and session != prev_session:
                        self.report.transit_gaps += 1  # lost with a socket: no one could count it
                    elif prev_seq == 0:
                        # The run's first frames went to a socket that died before we
                        # started recording this session (a kill -9 restart window).
                        self.report.transit_gaps += 1
                    else:
                        self._violation(
                            4, f"{key}: unannounced gap {prev_seq} -> {seq} in one session", key[1]
                        )
                prev_seq, prev_session = seq, session

    def _check_kills(self) -> None:
        """Invariant 6: after each kill -9 every held task was recovered, every stored result sent."""
        for snap in self.kills:
            held, unsent = self._kill_leftovers(snap)
            for tid in held:
                self._violation(6, f"{snap.agent}: held {tid} at kill -9, neither recovered nor ended", tid)
            for item in unsent:
                self._violation(6, f"{snap.agent}: stored result {item} not sent after restart", item[0])

    def _kill_leftovers(self, snap: KillSnapshot) -> tuple[list[str], list[tuple[str, int, str]]]:
        """What the hub has not yet heard of since a kill -9: held tasks, stored results."""
        later = [
            f
            for hub in self.hubs[snap.hub_index - 1 :]
            for f in hub.frames(snap.agent)
            if f.at >= snap.at or hub is not self.hubs[snap.hub_index - 1]
        ]
        recovering = {str(f.frame.get("task_id")) for f in later if f.type == "task_recovering" and f.frame}
        # A task held at the kill must be announced again after the restart, or
        # ended there (a SIGTERM that came before the new session could
        # identify fails it as sidecar_shutdown instead): either way the hub hears.
        ended = {str(f.frame.get("task_id")) for f in later if f.type in TERMINAL and f.frame}
        held = [tid for tid, _gen, _state in snap.in_flight if tid not in recovering and tid not in ended]
        sent = {
            (str(f.frame.get("task_id")), int(f.frame.get("generation") or 0), f.type)
            for f in later
            if f.type in TERMINAL and f.frame
        }
        # task_reassign tells the sidecar to drop the task's results (protocol.md).
        reassigned = {
            str(f.frame.get("task_id"))
            for hub in self.hubs[snap.hub_index - 1 :]
            for f in hub.sent(snap.agent, type="task_reassign")
            if f.frame and f.at >= snap.at
        }
        # A newer generation given to this agent makes older results stale: the
        # sidecar drops them rather than have the hub refuse them (also protocol).
        newest: dict[str, int] = {}
        for hub in self.hubs[snap.hub_index - 1 :]:
            for f in hub.sent(snap.agent, type="task_assign"):
                if f.frame and f.at >= snap.at and isinstance(f.frame.get("generation"), int):
                    tid = str(f.frame.get("task_id"))
                    newest[tid] = max(newest.get(tid, 0), int(f.frame["generation"]))
        unsent = [
            item
            for item in snap.outbox
            if item not in sent and item[0] not in reassigned and not newest.get(item[0], -1) > item[1]
        ]
        return held, unsent

    async def _await_kill_leftovers(self, limit_s: float) -> None:
        """Give restarted sidecars time to tell the hub what a kill -9 left stored.

        Every task can be finished at the hub (run again elsewhere) while a
        sidecar restarted late, under load, has not yet sent the stale results
        its store kept; it sends them (the hub refuses them) a few seconds later.
        Invariant 6 is checked after this wait, which ends as soon as nothing is
        left to hear.
        """
        with trio.move_on_after(limit_s):
            while any(any(self._kill_leftovers(snap)) for snap in self.kills):
                with trio.move_on_after(0.2):
                    await self._hub()._changed.wait()

    def _sweep_leftovers(self) -> None:
        for agent in self.agents:
            for pid in marked_processes(agent_marker_prefix(agent)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def marker_of(agent: str, task_id: str) -> str:
    return task_marker(agent, task_id)


async def run_episodes(
    seeds: list[int], root: Path, make: Callable[[int, Path], Episode] | None = None, parallel: int = 4
) -> Report:
    """Run one episode per seed, `parallel` at a time (they mostly wait, on timers and peers)."""
    total = Report(seeds[0] if seeds else 0)
    limiter = trio.CapacityLimiter(parallel)

    async def one(seed: int) -> None:
        async with limiter:
            ep = make(seed, root / f"ep{seed}") if make else Episode(seed, root / f"ep{seed}")
            rep = await ep.run()
            total.merge(rep)
            print(json.dumps(summary(rep)), flush=True)
            for v in rep.violations:  # as they happen: a long soak's end may be far away
                print(f"VIOLATION {rep.text(v)}", flush=True)

    async with trio.open_nursery() as nursery:
        for seed in seeds:
            nursery.start_soon(one, seed)
    total.elapsed_s = math.nan
    return total


def summary(rep: Report) -> dict[str, Any]:
    return {
        "seed": rep.seed,
        "lifecycles": rep.lifecycles,
        "tasks": rep.tasks,
        "violations": len(rep.violations),
        "faults": sum(rep.faults.values()),
        "kill9": rep.kill9,
        "hub_restarts": rep.hub_restarts,
        "transit_gaps": rep.transit_gaps,
        "announced_gaps": rep.announced_gaps,
        "late_exits_at_idle": rep.late_exits,
        "stale_results_left": rep.stale_left,
        "elapsed_s": round(rep.elapsed_s, 1),
        "submit_s": round(rep.submit_s, 1),
        "settle_s": round(rep.settle_s, 1),
    }
