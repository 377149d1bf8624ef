"""Log lines through `get_logger`: the direct path makes exactly the lines structlog's path does.

What must hold: the same fields in the same order (the trio task's bound
context, the logger's bound fields, the call's), the level filter in force,
`exception` with its traceback, and structlog's own path for any other
configuration (`capture_logs`, which the test suite's `logs` fixture uses).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import structlog.testing

from sidecar import log as sidecar_log
from sidecar.log import bind_context, get_logger, setup_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    setup_logging("debug", stream=out, json_lines=True)
    try:
        yield out
    finally:
        sidecar_log._OUT.stream = None
        sidecar_log._configure(logging.WARNING)
        for handler in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(handler)


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def without_ts(line: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(k, v) for k, v in line.items() if k != "ts"]


async def test_the_direct_path_writes_what_structlogs_path_writes(stream: io.StringIO) -> None:
    bind_context(task_id="t1", generation=lambda: 7)
    direct = get_logger("sidecar.x", part="a").bind(step=2)
    direct.info("did_it", n=1, task_id="own", text="a b")
    via_structlog = structlog.get_logger(logger_name="sidecar.x", part="a").bind(step=2)
    via_structlog.info("did_it", n=1, task_id="own", text="a b")
    first, second = lines(stream)
    assert without_ts(first) == without_ts(second)
    assert list(first)[:4] == ["ts", "level", "logger", "event"]
    assert first["task_id"] == "own" and first["generation"] == 7 and first["step"] == 2
    assert first["ts"].endswith("Z") and first["ts"][10] == "T"


async def test_exception_carries_the_traceback_as_structlogs_does(stream: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger("sidecar.x").exception("failed", what="it")
        structlog.get_logger(logger_name="sidecar.x").exception("failed", what="it")
    first, second = lines(stream)
    assert without_ts(first) == without_ts(second)
    assert first["level"] == "error" and "ValueError: boom" in first["exc"]


def test_the_level_in_force_filters(stream: io.StringIO) -> None:
    setup_logging("warning", stream=stream, json_lines=True)
    log = get_logger("sidecar.x")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line["event"] for line in lines(stream)] == ["w", "e"]


def test_positional_arguments_take_structlogs_path(stream: io.StringIO) -> None:
    get_logger("sidecar.x").info("count %d", 3)
    assert lines(stream)[0]["event"] == "count 3"


def test_a_capture_sees_every_event_through_structlog() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as entries:
            get_logger("sidecar.x", part="a").debug("seen", n=1)
    finally:
        sidecar_log._configure(logging.WARNING)
    assert entries == [
        {"event": "seen", "n": 1, "logger_name": "sidecar.x", "part": "a", "log_level": "debug"}
    ]
