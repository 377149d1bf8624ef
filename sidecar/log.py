"""Structured logging: one event per line, key=value on a terminal, JSON elsewhere.

Use `log = get_logger(__name__)` then `log.info("task_accepted", task_id=..., generation=...)`.
Registered secrets (the hub token) are replaced by `***` in every line.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, TextIO

_SECRETS: set[str] = set()

# Fields added to every event logged from the current trio task (and from tasks
# it starts afterwards): the supervisor binds task_id and generation for a
# task's whole life, the dispatcher binds the attempt. A callable value is
# called at log time (the generation can change while a task runs).
_CONTEXT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "sidecar_log_context", default=None
)


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
    """Never print `value`: every formatted log line is scrubbed of it."""
    if value and len(value) >= 3:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _fmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


class StructuredFormatter(logging.Formatter):
    def __init__(self, json_lines: bool) -> None:
        super().__init__()
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if self.json_lines:
            obj: dict[str, Any] = {
                "ts": ts,
                "level": record.levelname.lower(),
                "logger": record.name,
                "event": record.getMessage(),
            }
            obj.update(fields)
            if record.exc_info:
                obj["exc"] = self.formatException(record.exc_info)
            line = json.dumps(obj, default=str, ensure_ascii=False)
        else:
            parts = [ts, f"{record.levelname.lower():7}", record.getMessage()]
            parts += [f"{k}={_fmt_value(v)}" for k, v in fields.items()]
            line = " ".join(parts)
            if record.exc_info:
                line += "\n" + self.formatException(record.exc_info)
        return scrub(line)


class Logger:
    """A thin wrapper so call sites read `log.info("event", key=value)`."""

    def __init__(self, name: str, **bound: Any) -> None:
        self._logger = logging.getLogger(name)
        self._bound = bound

    def bind(self, **fields: Any) -> Logger:
        return Logger(self._logger.name, **{**self._bound, **fields})

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, Any]) -> None:
        if self._logger.isEnabledFor(level):
            merged = {**context_fields(), **self._bound, **fields}
            self._logger.log(level, event, exc_info=exc_info, extra={"fields": merged})

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, *, exc_info: bool = False, **fields: Any) -> None:
        self._log(logging.ERROR, event, exc_info, fields)


def get_logger(name: str, **bound: Any) -> Logger:
    return Logger(name, **bound)


def setup_logging(
    level: str = "info",
    stream: TextIO | None = None,
    json_lines: bool | None = None,
    log_file: str | None = None,
) -> None:
    """Configure the root logger once, for the CLI."""
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = not stream.isatty()
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler = logging.StreamHandler(stream)
    handler.setFormatter(StructuredFormatter(json_lines))
    root.addHandler(handler)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(StructuredFormatter(True))
        root.addHandler(fh)
    root.setLevel(level.upper())
    for noisy in ("trio-websocket", "hypercorn", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
