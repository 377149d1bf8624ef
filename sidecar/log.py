"""Structured logging on structlog: one event per line, key=value on a terminal, JSON elsewhere.

Use `log = get_logger(__name__)` then `log.info("task_accepted", task_id=..., generation=...)`.
Every line carries `ts`, `level`, `logger` and `event`, then the event's fields.
Registered secrets (the hub token) are replaced by `***` in every line, by the
last processor before anything is written. Records of the standard `logging`
module (hypercorn, httpx) go through the same renderers.

Tests read events with `structlog.testing.capture_logs()`.

A call goes straight to our two processors and the sink while structlog is
configured as `setup_logging` left it (checked at each call: ~1 us); any other
configuration (`capture_logs`, a test's level) gets structlog's own path and
its lazy proxy, which rebinds on every call. The events are the same either way.
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
    ts = _second_text(int(now)) + f".{int(now * 1000) % 1000:03d}Z"
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


_last_second: tuple[int, str] = (-1, "")


def _second_text(second: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS` of a Unix second (the last one is kept: lines come in runs)."""
    global _last_second
    if _last_second[0] != second:
        _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return _last_second[1]


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


# structlog's filtering logger classes (one per level), and the level of each.
_WRAPPER_LEVELS = {structlog.make_filtering_bound_logger(n): n for n in (*_LEVELS.values(), logging.CRITICAL)}


def _configure(level: int) -> None:
    structlog.configure(
        processors=[task_context, _ordered],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=_sink_factory,
        cache_logger_on_first_use=False,
    )


_configure(logging.WARNING)


def _direct_level() -> int | None:
    """The level in force if structlog is configured as `_configure` does; else None."""
    config = structlog.get_config()
    processors = config["processors"]
    if (
        config["logger_factory"] is not _sink_factory
        or len(processors) != 2
        or processors[0] is not task_context
        or processors[1] is not _ordered
    ):
        return None
    return _WRAPPER_LEVELS.get(config["wrapper_class"])


class Logger:
    """What `get_logger` returns: `.info(event, **fields)` and the other levels, `.bind(**fields)`.

    The events structlog's bound logger would make, through the same two
    processors, without its per-call proxy and dispatch (see the module doc).
    """

    __slots__ = ("_context",)

    def __init__(self, context: dict[str, Any]) -> None:
        self._context = context

    def bind(self, **fields: Any) -> Logger:
        return Logger({**self._context, **fields})

    def _log(
        self, number: int, method: str, event: str, args: tuple[Any, ...], fields: dict[str, Any]
    ) -> None:
        level = _direct_level()
        if level is None or args:
            proxy: FilteringBoundLogger = structlog.get_logger(**self._context)
            getattr(proxy, method)(event, *args, **fields)
        elif number >= level:
            name = method
            if method == "exception":
                name = "error"
                fields.setdefault("exc_info", True)
            fields = {**self._context, **fields, "event": event}
            _OUT.write(_ordered(None, name, task_context(None, name, fields)))

    def debug(self, event: str, *args: Any, **fields: Any) -> None:
        self._log(logging.DEBUG, "debug", event, args, fields)

    def info(self, event: str, *args: Any, **fields: Any) -> None:
        self._log(logging.INFO, "info", event, args, fields)

    def warning(self, event: str, *args: Any, **fields: Any) -> None:
        self._log(logging.WARNING, "warning", event, args, fields)

    def error(self, event: str, *args: Any, **fields: Any) -> None:
        self._log(logging.ERROR, "error", event, args, fields)

    def exception(self, event: str, *args: Any, **fields: Any) -> None:
        self._log(logging.ERROR, "exception", event, args, fields)

    def critical(self, event: str, *args: Any, **fields: Any) -> None:
        self._log(logging.CRITICAL, "critical", event, args, fields)


def get_logger(name: str, **bound: Any) -> Logger:
    """A bound logger: `.info(event, **fields)`, `.bind(**fields)`, `.error(..., exc_info=True)`."""
    # Bound as `logger_name` (structlog's own `logger` parameter would clash), shown as `logger`.
    return Logger({"logger_name": name, **bound})


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
