"""Field helpers for the config classes: each field carries its doc text and its validator.

`setting(default, doc, check)` is an `attrs.field` whose metadata holds the
reference text (`configdoc` renders the table from it) and whose validator
raises `ConfigError` naming the field, so that a bad value is reported with
its path (`ollama.idle_timeout_s`) by the loader.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import attrs


class ConfigError(ValueError):
    """A config problem; `field` is the dotted path of the bad key."""

    def __init__(self, field: str, problem: str, source: str | None = None) -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}config field '{field}': {problem}")
        self.field = field
        self.problem = problem


Check = Callable[[Any], str | None]  # a problem, or None when the value is fine

_NO_DEFAULT: Any = attrs.NOTHING


def setting(
    default: Any = _NO_DEFAULT, doc: str = "", check: Check | None = None, *, factory: Any = None
) -> Any:
    """An attrs field with reference text and a check (see the module doc)."""

    def validate(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if check is not None and value is not None:
            problem = check(value)
            if problem is not None:
                raise ConfigError(attribute.name, f"{problem}, got {value!r}")

    if factory is not None:
        return attrs.field(factory=factory, validator=validate, metadata={"doc": doc})
    return attrs.field(default=default, validator=validate, metadata={"doc": doc})


def _infinite(value: Any) -> bool:
    # `inf` is a float TOML and JSON-with-extensions read: a grace, a time-out or a
    # rate that never ends would turn a stuck child into a daemon that never stops.
    return isinstance(value, float) and math.isinf(value)


def positive(value: Any) -> str | None:
    if _infinite(value):
        return "must be a finite number"
    return None if value > 0 else "must be positive"


def positive_or_unbounded(value: Any) -> str | None:
    """Positive, `inf` allowed: a limit inside another that always applies."""
    return None if value > 0 else "must be positive"


def non_negative(value: Any) -> str | None:
    if _infinite(value):
        return "must be a finite number"
    return None if value >= 0 else "must be zero or more"


def at_least(n: int) -> Check:
    def check(value: Any) -> str | None:
        if _infinite(value):
            return "must be a finite number"
        return None if value >= n else f"must be at least {n}"

    return check


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def hub_string(limit: int) -> Check:
    def check(value: Any) -> str | None:
        if not value:
            return "must not be empty"
        if len(value) > limit:
            return f"longer than the hub's limit of {limit} characters"
        return None

    return check


def ws_url(value: Any) -> str | None:
    url = urlparse(value)
    return None if url.scheme in ("ws", "wss") and url.hostname else "must be a ws:// or wss:// URL"


def http_url(value: Any) -> str | None:
    o = urlparse(value if "://" in value else "http://" + value)
    return None if o.scheme in ("http", "https") and o.hostname else "must be an http(s) URL"


def host_port(value: Any) -> str | None:
    host, sep, port = value.rpartition(":")
    ok = sep and host and port.isdigit() and int(port) <= 65535
    return None if ok else "must be host:port"
