"""Structured logging on structlog: one event per line, key=value on a terminal, JSON elsewhere.

Use `log = get_logger(__name__)` then `log.info("task_accepted", task_id=..., generation=...)`.
Every line carries `ts`, `level`, `logger` and `event`, then the event's fields.
Registered secrets (the hub token) are replaced by `***` in every line, by the
last processor before anything is written. Records of the standard `logging`
module (hypercorn, httpx) go through the same renderers.

Tests read events with `structlog.testing.capture_logs()`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, WrappedLogger

_SECRETS: set[str] = set()

# Fields added to every event logged from the current trio task (and from tasks
# it starts afterwards): the supervisor binds task_id and generation for a
# task's whole life, the dispatcher binds the attempt. A callable value is
# called at log time (the generation can change while a task runs).
_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "sidecar_log_context", default=None
)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def bind_context(**fields: Any) -> None:
    """Add `fields` to every log event of the current trio task from now on."""
    _CONTEXT.set({**(_CONTEXT.get() or {}), **fields})


def context_fields() -> dict[str, Any]:
    """The current task's bound fields, callables resolved."""
    bound = _CONTEXT.get()
    if not bound:
        return {}
    return {k: (v() if callable(v) else v) for k, v in bound.items()}


def register_secret(value: str) -> None:
    """Never print `value`: every rendered log line is scrubbed of it."""
    if value and len(value) >= 3:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


# -- processors ----------------------------------------------------------------


def task_context(_logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
    """The trio task's bound fields first, so that the event's own fields win; `logger` named."""
    event["logger"] = event.pop("logger_name", "sidecar")
    bound = context_fields()
    if bound:
        return {**bound, **event}
    return event


def _ordered(_logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """`ts`, `level`, `logger`, `event` first, then the fields; `exc_info` rendered as `exc`."""
    now = time.time()
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
    out: dict[str, Any] = {
        "ts": ts,
        "level": "warning" if method == "warn" else method,
        "logger": event.pop("logger", "sidecar"),
        "event": event.pop("event", ""),
    }
    exc_info = event.pop("exc_info", None)
    out.update(event)
    if exc_info:
        out["exc"] = _format_exc(exc_info)
    return out


def _format_exc(exc_info: Any) -> str:
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[0] is None:
        return ""
    return logging.Formatter().formatException(exc_info)


def _fmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


def render_json(event: MutableMapping[str, Any]) -> str:
    return scrub(json.dumps(event, default=str, ensure_ascii=False))


def render_kv(event: MutableMapping[str, Any]) -> str:
    fields = dict(event)
    exc = fields.pop("exc", None)
    ts, level, event_name = fields.pop("ts"), fields.pop("level"), fields.pop("event")
    fields.pop("logger", None)
    parts = [ts, f"{level:7}", str(event_name)] + [f"{k}={_fmt_value(v)}" for k, v in fields.items()]
    line = " ".join(parts)
    if exc:
        line += "\n" + exc
    return scrub(line)


# -- outputs -------------------------------------------------------------------


class _Outputs:
    """Where rendered lines go: the main stream (JSON or key=value) and an optional JSON file."""

    def __init__(self) -> None:
        self.stream: TextIO | None = None
        self.json_lines = True
        self.file: TextIO | None = None

    def write(self, event: MutableMapping[str, Any]) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        try:
            stream.write((render_json(event) if self.json_lines else render_kv(event)) + "\n")
            stream.flush()
            if self.file is not None:
                self.file.write(render_json(event) + "\n")
                self.file.flush()
        except (OSError, ValueError):
            # A full disk or a closed stream must not turn a log line into a crash.
            pass


_OUT = _Outputs()


class _Sink:
    """The structlog 'logger': gets the finished event dict as keyword arguments."""

    def _write(self, **event: Any) -> None:
        _OUT.write(event)

    debug = info = warning = warn = error = critical = exception = msg = _write


def _sink_factory(*_args: Any) -> _Sink:
    return _Sink()


def _configure(level: int) -> None:
    structlog.configure(
        processors=[task_context, _ordered],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_sink_factory,
        cache_logger_on_first_use=False,
    )


_configure(logging.WARNING)


def get_logger(name: str, **bound: Any) -> FilteringBoundLogger:
    """A bound logger: `.info(event, **fields)`, `.bind(**fields)`, `.error(..., exc_info=True)`."""
    # A lazy proxy: the level and processors in force are read at each call. Bound as
    # `logger_name` (structlog's own `logger` parameter would clash), shown as `logger`.
    logger: FilteringBoundLogger = structlog.get_logger(logger_name=name, **bound)
    return logger


class _StdlibBridge(logging.Handler):
    """Records of the `logging` module (libraries) rendered like our own events."""

    def emit(self, record: logging.LogRecord) -> None:
        event: dict[str, Any] = {"logger": record.name, "event": record.getMessage()}
        if record.exc_info:
            event["exc_info"] = record.exc_info
        _OUT.write(_ordered(None, record.levelname.lower(), event))


def setup_logging(
    level: str = "info",
    stream: TextIO | None = None,
    json_lines: bool | None = None,
    log_file: str | None = None,
) -> None:
    """Configure logging once, for the CLI."""
    stream = stream or sys.stderr
    _OUT.stream = stream
    _OUT.json_lines = (not stream.isatty()) if json_lines is None else json_lines
    if _OUT.file is not None:
        _OUT.file.close()
        _OUT.file = None
    if log_file:
        _OUT.file = open(log_file, "a", encoding="utf-8")
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    _configure(numeric)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(_StdlibBridge())
    root.setLevel(max(numeric, logging.WARNING))
