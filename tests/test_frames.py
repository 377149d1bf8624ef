"""Inbound frames: decoded once, typed strictly, bad fields named by path."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from sidecar.frames import (
    BadTaskAssign,
    HubError,
    Identified,
    Ignored,
    Pong,
    RateLimited,
    RateLimitWarning,
    RestartSidecar,
    StateReportAck,
    TaskAck,
    TaskAssign,
    TaskCancelled,
    TaskContinue,
    TaskReassign,
    parse_inbound,
    read_frame,
)
from sidecar.messages import FrameError, decode_frame, encode_frame


def parse(text: str) -> object:
    return parse_inbound(decode_frame(text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"identified","agent_id":"a1"}', Identified("a1")),
        ('{"type":"task_ack","task_id":"t","status":"complete"}', TaskAck("t", "complete")),
        ('{"type":"task_cancelled","task_id":"t","timestamp":5}', TaskCancelled("t")),
        ('{"type":"task_continue","task_id":"t","generation":3}', TaskContinue("t", 3)),
        ('{"type":"task_continue","task_id":"t"}', TaskContinue("t", None)),
        ('{"type":"task_continue","task_id":"t","generation":null}', TaskContinue("t", None)),
        ('{"type":"task_reassign","task_id":"t"}', TaskReassign("t")),
        ('{"type":"state_report_ack","task_id":"t","action":"abort"}', StateReportAck("t", "abort")),
        ('{"type":"restart_sidecar","reason":"upgrade"}', RestartSidecar("upgrade")),
        ('{"type":"pong","timestamp":1733000000000}', Pong(1733000000000.0)),
        ('{"type":"error","error":"not_identified"}', HubError("not_identified")),
        (
            '{"type":"error","error":"validation_failed","message_type":"state_report","errors":["x"]}',
            HubError("validation_failed", "state_report", ["x"]),
        ),
        (
            '{"type":"rate_limit_warning","tier":"normal","remaining":5,"capacity":60}',
            RateLimitWarning("normal", 5, 60),
        ),
        ('{"type":"rate_limited","retry_after_ms":1500,"tier":"normal"}', RateLimited(1500.0, "normal")),
        ('{"type":"room_message","text":"hi"}', Ignored("room_message")),
        ('{"type":"something_new"}', Ignored("something_new")),
    ],
)
def test_known_frames(text: str, expected: object) -> None:
    assert parse(text) == expected


def test_task_assign_is_a_task() -> None:
    frame = parse('{"type":"task_assign","task_id":"t1","generation":2,"metadata":{"shell_command":"true"}}')
    assert isinstance(frame, TaskAssign)
    assert frame.task.task_id == "t1" and frame.task.generation == 2 and frame.task.shell_command == "true"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ('{"type":"task_ack","task_id":"t","status":["complete"]}', "status"),
        ('{"type":"task_ack","status":"complete"}', "task_id"),
        ('{"type":"task_continue","task_id":"t","generation":"3"}', "generation"),
        ('{"type":"task_continue","task_id":"t","generation":true}', "generation"),
        ('{"type":"error","error":{"nested":1}}', "error"),
        ('{"type":"rate_limited","retry_after_ms":"soon"}', "retry_after_ms"),
        ('{"type":"task_cancelled","task_id":7}', "task_id"),
    ],
)
def test_bad_fields_are_named(text: str, path: str) -> None:
    with pytest.raises(FrameError) as info:
        parse(text)
    assert info.value.path == path


def test_a_bad_task_assign_that_names_its_task_is_a_value_not_an_error() -> None:
    frame = parse('{"type":"task_assign","task_id":"t9","generation":4,"metadata":[]}')
    assert frame == BadTaskAssign("t9", 4, "metadata", "expected an object, got list")


def test_a_task_assign_without_a_task_id_is_an_error() -> None:
    with pytest.raises(FrameError) as info:
        parse('{"type":"task_assign","metadata":{}}')
    assert info.value.path == "task_id"


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "1E999"])
def test_non_finite_numbers_make_a_frame_bad(number: str) -> None:
    text = '{"type":"rate_limited","retry_after_ms":' + number + ',"tier":"normal"}'
    with pytest.raises(FrameError) as info:
        decode_frame(text)
    assert "non-finite" in info.value.problem and info.value.frame_type == "rate_limited"


def test_a_non_finite_task_assign_still_names_its_task() -> None:
    with pytest.raises(FrameError) as info:
        decode_frame('{"type":"task_assign","task_id":"t5","metadata":{"timeout_ms":1e400}}')
    assert info.value.task_id == "t5" and info.value.frame_type == "task_assign"


def test_big_finite_numbers_are_fine() -> None:
    obj: dict[str, Any] = decode_frame('{"type":"rate_limited","retry_after_ms":1e300}')
    assert parse_inbound(obj) == RateLimited(1e300, None)


def test_a_task_id_with_a_lone_surrogate_is_a_bad_assign_naming_it() -> None:
    # Valid JSON (an escape), no valid Unicode: neither UTF-8 nor SQLite can hold it.
    frame = parse(
        '{"type":"task_assign","task_id":"t\\ud800x","generation":2,'
        '"metadata":{"shell_command":"true"},"routing_decision":{"target_type":"sidecar"}}'
    )
    assert isinstance(frame, BadTaskAssign)
    assert (frame.task_id, frame.generation, frame.path) == ("t\ud800x", 2, "task_id")
    assert "surrogate" in frame.problem
    # In its text it is only text: the task is as good as any.
    ok = parse(
        '{"type":"task_assign","task_id":"t","description":"a \\udcff b",'
        '"metadata":{"shell_command":"true"},"routing_decision":{"target_type":"sidecar"}}'
    )
    assert isinstance(ok, TaskAssign) and ok.task.description == "a \udcff b"


def test_an_answer_under_a_lone_surrogate_id_goes_out_as_the_same_json_string() -> None:
    text = encode_frame({"type": "task_failed", "task_id": "t\ud800x", "generation": 1})
    text.encode("utf-8")  # a text frame: must be UTF-8
    assert "\\ud800" in text and json.loads(text)["task_id"] == "t\ud800x"
    # Everything else still goes out as UTF-8, not as escapes.
    assert encode_frame({"type": "x", "note": "héllo 💥"}) == (
        '{"type":"x","note":"héllo 💥","protocol_version":1}'
    )


@pytest.mark.parametrize(
    ("x", "problem"),
    [
        ("1" * 5000, "4300 digits"),  # json's own limit on integers
        ("[" * 3000 + "]" * 3000, "RecursionError"),  # deeper than json can follow
        ("[" * 500 + "]" * 500, "deeper than 64"),  # json reads it (near 1,000 it could not write it)
        ("[" * 65 + "]" * 65, "deeper than 64"),
    ],
)
def test_a_task_assign_json_cannot_take_is_still_failed_under_its_id(x: str, problem: str) -> None:
    """Left unanswered, such a task comes back from the hub every 60 s for ever."""
    text = (
        '{"type":"task_assign","task_id":"odd","generation":3,'
        f'"metadata":{{"shell_command":"true","x":{x}}},"routing_decision":{{"target_type":"sidecar"}}}}'
    )
    frame = read_frame(text)
    assert isinstance(frame, BadTaskAssign), frame
    assert (frame.task_id, frame.generation) == ("odd", 3) and problem in frame.problem
    # The task id is read from the top level only, wherever it stands and however escaped.
    later = '{"generation":2,"metadata":{"x":[' + "[" * 3000 + "]" * 3000 + '],"task_id":"inner"},'
    later += '"type":"task_assign","task_id":"out\\"er"}'
    frame = read_frame(later)
    assert isinstance(frame, BadTaskAssign) and (frame.task_id, frame.generation) == ('out"er', 2)


def test_a_task_assign_cut_short_or_with_a_long_id_is_failed_under_its_id() -> None:
    cut = read_frame('{"type":"task_assign","task_id":"cut","generation":4,"metadata":{"shell_com')
    assert isinstance(cut, BadTaskAssign) and (cut.task_id, cut.generation) == ("cut", 4)
    long_id = read_frame(json.dumps({"type": "task_assign", "task_id": "t" * 513, "generation": 1}))
    assert isinstance(long_id, BadTaskAssign) and long_id.path == "task_id"
    # Not a task_assign, or no id before the cut: only logged (FrameError), nothing to fail.
    ack = '{"type":"task_ack","task_id":"a","x":' + "1" * 5000 + "}"
    for text in (ack, '{"task_id":"a","type":"task_as'):
        with pytest.raises(FrameError):
            read_frame(text)


def test_a_time_limit_no_clock_can_hold_is_no_limit_not_an_overflow() -> None:
    # 10**400 ms overflowed the float of the supervisor's deadline: exit 1 at every start.
    frame = parse(
        '{"type":"task_assign","task_id":"t","metadata":{"shell_command":"true","timeout_ms":1'
        + "0" * 400
        + '},"routing_decision":{"target_type":"sidecar"}}'
    )
    assert isinstance(frame, TaskAssign)
    assert frame.task.timeout_ms == 2**53 - 1
    assert frame.task.timeout_ms / 1000.0 < math.inf
