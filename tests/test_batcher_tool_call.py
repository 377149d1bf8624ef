"""The batcher passes `tool_call` events through whole: never merged, extras kept.

Kept apart from test_batcher.py so the batcher's own rework and this small
hook stay independent.
"""

from __future__ import annotations

import trio

from sidecar.batcher import Batcher
from sidecar.messages import ProgressEvent

from .test_batcher import RecordingSink, ev


async def test_tool_call_events_keep_their_fields_and_are_never_coalesced(
    autojump_clock: trio.abc.Clock,
) -> None:
    b = Batcher()
    sink = RecordingSink()
    send, recv = trio.open_memory_channel[ProgressEvent](64)
    before = {"tool_name": "read_file", "args_summary": "path=a.txt", "iteration": 0}
    after = {"tool_name": "read_file", "result_summary": "ok: 3 lines", "iteration": 0}
    for e in [
        ev("A", "thinking ", "token", tokens_so_far=1),
        ev("A", "→ read_file", "tool_call", extra=before),
        ev("A", "← ok", "tool_call", extra=after),
        ev("A", "more", "token", tokens_so_far=2),
        ev("A", "plain ", "tool_call"),
        ev("A", "merged", "tool_call"),
    ]:
        send.send_nowait(e)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run, recv, sink)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    events = sink.of("A")
    assert [(e["event_type"], e["text"]) for e in events] == [
        ("token", "thinking "),
        ("tool_call", "→ read_file"),
        ("tool_call", "← ok"),
        ("token", "more"),
        ("tool_call", "plain merged"),  # without extras, the usual coalescing
    ]
    assert {k: events[1][k] for k in before} == before
    assert {k: events[2][k] for k in after} == after
    assert events[1]["iteration"] == 0 and "result_summary" not in events[1]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]


async def test_extras_never_override_the_standard_fields(autojump_clock: trio.abc.Clock) -> None:
    b = Batcher()
    sink = RecordingSink()
    send, recv = trio.open_memory_channel[ProgressEvent](8)
    send.send_nowait(ev("A", "x", "tool_call", extra={"seq": 99, "text": "forged", "tool_name": "t"}))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run, recv, sink)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    [event] = sink.of("A")
    assert event["seq"] == 1 and event["text"] == "x" and event["tool_name"] == "t"
