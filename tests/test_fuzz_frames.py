"""Property-based fuzzing of every inbound frame type (Invariant 5).

Each example is a batch of hostile frames fed, in process, through the link's
decoder (`decode_frame`) into a live `Sidecar` (`on_frame` / `on_bad_frame`),
exactly as the link's reader does, followed by one valid task. The sidecar
must raise nothing, and must still accept, run and store the result of that
valid task. Over-the-socket fuzzing is the smaller part: the chaos suite's
`garbage` fault and tests/test_e2e.py send such frames over a real WebSocket.

FUZZ_EXAMPLES x FRAMES_PER_EXAMPLE frames per run (default 250 x 48 = 12,000).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.app import Sidecar
from sidecar.config import Config
from sidecar.executors import ExecContext, Executor
from sidecar.frames import read_frame
from sidecar.messages import FrameError, Outcome
from sidecar.store import Store
from sidecar.taskrun import TaskRun
from tests.harness import feed

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "250"))
FRAMES_PER_EXAMPLE = 48
FRAMES_TRIED = 0

INBOUND_TYPES = [
    "identified",
    "task_assign",
    "task_ack",
    "task_cancelled",
    "task_continue",
    "task_reassign",
    "state_report_ack",
    "restart_sidecar",
    "pong",
    "error",
    "rate_limit_warning",
    "rate_limited",
    "message",
    "channel_message",
    "agent_joined",
    "ollama_report_ack",
]
FIELDS = [
    "task_id",
    "description",
    "metadata",
    "generation",
    "assigned_at",
    "repo",
    "branch",
    "file_hints",
    "success_criteria",
    "verification_steps",
    "complexity",
    "routing_decision",
    "status",
    "timestamp",
    "action",
    "reason",
    "error",
    "message_type",
    "errors",
    "retry_after_ms",
    "tier",
    "remaining",
    "capacity",
    "agent_id",
]

# Lone surrogates survive json.dumps as \ud800 escapes and come back as str.
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "t1", "\ud800", "x\udfff", "\x00", "task-0", "💥" * 10]),
    st.integers(min_value=1000, max_value=70_000).map(lambda n: "h" * n),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    # Past SQLite's 64 bits, and past a float (a time limit): each stopped the daemon once.
    st.sampled_from([2**63, 2**70, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(texts, st.sampled_from(FIELDS)), inner, max_size=4),
    ),
    max_leaves=12,
)


def _nested(depth: int) -> str:
    """JSON text nested `depth` deep (built as text: json.dumps would recurse)."""
    return '{"a":[' * (depth // 2) + "1" + "]}" * (depth // 2)


def _base(kind: str) -> dict[str, Any]:
    if kind == "task_assign":
        return {
            "type": kind,
            "task_id": "fz",
            "description": "d",
            "metadata": {"shell_command": "true"},
            "generation": 1,
            "routing_decision": {"target_type": "sidecar"},
        }
    return {"type": kind, "task_id": "fz", "generation": 1, "status": "complete", "retry_after_ms": 10}


@st.composite
def frames(draw: st.DrawFn) -> str | bytes:
    how = draw(st.integers(0, 9))
    if how == 0:
        return draw(st.one_of(st.text(max_size=60), st.binary(max_size=30)))
    if how == 1:
        return json.dumps(draw(json_values))
    if how == 2:
        kind, field = draw(st.sampled_from(INBOUND_TYPES)), draw(st.sampled_from(FIELDS))
        return f'{{"type": "{kind}", "{field}": {_nested(draw(st.integers(1, 3000)))}}}'
    frame = _base(draw(st.sampled_from(INBOUND_TYPES)))
    # A few ids, so that many a task_assign names a task new to the store: those
    # take the intake journal, where a value SQLite cannot hold used to wait.
    frame["task_id"] = f"fz-{draw(st.integers(0, 3))}"
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        frame[field] = draw(json_values)
    for field in draw(st.lists(st.sampled_from(sorted(frame)), max_size=2)):
        if field != "type" or draw(st.booleans()):
            frame.pop(field, None)
    if how == 3:
        frame["type"] = draw(json_values)
    text = json.dumps(frame)
    if how == 4 and len(text) > 2:
        cut = draw(st.integers(1, len(text) - 1))
        text = text[:cut]
    return text


async def _fast(run: TaskRun) -> Outcome:
    await run.progress.emit("stdout", "ran " + run.task_id[:20])
    return Outcome(ok=True, output="ok")


def _executors(ctx: ExecContext) -> dict[str, Executor]:
    return {"shell": _fast, "ollama": _fast, "claude": _fast, "wake": _fast}


async def _one_batch(config: Config, batch: list[str | bytes], n: int) -> None:
    store = await Store.open(Path(config.resolved_state_dir()) / f"fz{n}.db", durable=False)
    try:
        async with httpx.AsyncClient() as http:
            sc = Sidecar(config, store, http, executors=_executors)
            async with trio.open_nursery() as nursery:
                await nursery.start(sc.run)
                for raw in batch:
                    try:
                        frame = read_frame(raw)
                    except FrameError as exc:
                        sc.on_bad_frame(exc, raw)
                        continue
                    with trio.fail_after(10):
                        await sc.on_frame(frame)
                # A valid task still runs to a stored result.
                valid = {
                    "type": "task_assign",
                    "task_id": f"valid-{n}",
                    "description": "after the fuzz",
                    "metadata": {"shell_command": "true"},
                    "generation": 7,
                    "routing_decision": {"target_type": "sidecar"},
                }
                await feed(sc, valid)
                with trio.fail_after(20):
                    await sc.supervisor.held[str(valid["task_id"])].done.wait()  # its end is stored
                done = [i for i in await store.outbox() if i.task_id == valid["task_id"]]
                assert [i.frame["type"] for i in done] == ["task_complete"]
                sc.stopped.set()
    finally:
        await store.close()


def test_fuzz_every_inbound_frame_type(tmp_path: Path) -> None:
    from sidecar.config import config_from_mapping

    config = config_from_mapping(
        {
            "agent_id": "fz",
            "token": "fz-token",
            "hub_url": "ws://127.0.0.1:9/ws",
            "state_dir": str(tmp_path / "state"),
            "capacity": 4,
            "queue_length": 64,
            "backoff_initial_s": 60.0,
            "kill_grace_s": 0.2,
        },
        base_dir=tmp_path,
    )
    counter = iter(range(10**9))

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(frames(), min_size=FRAMES_PER_EXAMPLE, max_size=FRAMES_PER_EXAMPLE))
    def check(batch: list[str | bytes]) -> None:
        global FRAMES_TRIED
        trio.run(_one_batch, config, batch, next(counter))
        FRAMES_TRIED += len(batch)

    check()
    print(f"fuzzed frames: {FRAMES_TRIED}")
    assert FRAMES_TRIED >= 10_000 or FUZZ_EXAMPLES * FRAMES_PER_EXAMPLE < 10_000
