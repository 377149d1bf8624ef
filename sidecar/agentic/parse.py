"""Tool calls out of a model's reply, in three layers, and schema-driven coercion.

1. native `message.tool_calls` (Ollama's function calling);
2. a JSON object `{"name": …, "arguments": {…}}` in the content once
   `<think>…</think>` blocks are gone, read with `JSONDecoder.raw_decode`, so
   arguments may hold any braces;
3. `<tool_call>{json}</tool_call>` blocks, the JSON again read by the decoder
   (never cut at the first `</tool_call>`, which a file's content may hold).

The first layer that finds a call wins. Arguments are coerced only where the
tool's schema asks for a boolean or an integer; a string is never touched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import attrs

_decoder = json.JSONDecoder()
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
_TOOL_CALL_OPEN = "<tool_call>"
_INT = re.compile(r"[+-]?\d+")


@attrs.frozen
class ToolCall:
    """One call the model asked for. `arguments` as given (coerce later)."""

    name: str
    arguments: dict[str, Any]
    layer: str = "native"  # native | json | tag: where it was found

    def key(self) -> str:
        """A canonical text of the call, to compare turns (repetition)."""
        return json.dumps([self.name, self.arguments], sort_keys=True, default=str)


def strip_think(text: str) -> str:
    """The content without `<think>…</think>` blocks (an unclosed one runs to the end)."""
    return _THINK.sub("", text) if "<think>" in text else text


def _arguments(value: Any) -> dict[str, Any] | None:
    """Arguments as an object; a JSON text of an object (OpenAI's style) is read too."""
    if isinstance(value, dict):
        return value
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            obj = json.loads(value)
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None
    return None


def native_calls(tool_calls: Any) -> list[ToolCall]:
    """Layer 1: Ollama's `message.tool_calls` list (`[{"function": {name, arguments}}]`)."""
    out: list[ToolCall] = []
    if not isinstance(tool_calls, list):
        return out
    for item in tool_calls:
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            continue
        args = _arguments(fn.get("arguments"))
        out.append(ToolCall(fn["name"], args if args is not None else {"__invalid__": fn.get("arguments")}))
    return out


def _as_call(obj: Any, layer: str, *, strict: bool) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if "arguments" in obj:
        raw = obj["arguments"]
    elif not strict and "parameters" in obj:
        raw = obj["parameters"]
    else:
        return None
    args = raw if strict else _arguments(raw)
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], args, layer)


def json_calls(content: str) -> list[ToolCall]:
    """Layer 2: every `{"name": str, "arguments": {…}}` object in the text, in order."""
    out: list[ToolCall] = []
    pos = content.find("{")
    while pos != -1:
        try:
            obj, end = _decoder.raw_decode(content, pos)
        except ValueError:
            pos = content.find("{", pos + 1)
            continue
        call = _as_call(obj, "json", strict=True)
        if call is not None:
            out.append(call)
            pos = content.find("{", end)
        else:
            # Not a call: one nested inside it may still be (`{"tool": {"name": …}}`).
            pos = content.find("{", pos + 1)
    return out


def tag_calls(content: str) -> list[ToolCall]:
    """Layer 3: `<tool_call>{json}</tool_call>` blocks; `parameters` and JSON-text arguments accepted."""
    out: list[ToolCall] = []
    pos = content.find(_TOOL_CALL_OPEN)
    while pos != -1:
        start = content.find("{", pos + len(_TOOL_CALL_OPEN))
        if start == -1:
            break
        try:
            obj, end = _decoder.raw_decode(content, start)
        except ValueError:
            pos = content.find(_TOOL_CALL_OPEN, start)
            continue
        call = _as_call(obj, "tag", strict=False)
        if call is not None:
            out.append(call)
        pos = content.find(_TOOL_CALL_OPEN, end)
    return out


def parse_calls(tool_calls: Any, content: str) -> list[ToolCall]:
    """The calls of one reply: the first of the three layers that finds any."""
    native = native_calls(tool_calls)
    if native:
        return native
    text = strip_think(content)
    return json_calls(text) or tag_calls(text)


# -- coercion ---------------------------------------------------------------------


class ArgumentError(ValueError):
    """Arguments that do not fit the tool's schema; the message names the parameter."""


def coerce_arguments(schema: Mapping[str, Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """Check `args` against a JSON-schema object (`properties`, `required`) and coerce.

    A boolean parameter takes "true"/"false" (any case), an integer parameter a
    string of digits; nothing else is converted, and a string parameter's value
    is passed exactly as it came. Unknown parameters are refused.
    """
    if "__invalid__" in args:
        raise ArgumentError("arguments are not a JSON object")
    props: Mapping[str, Any] = schema.get("properties", {})
    out: dict[str, Any] = {}
    for name, value in args.items():
        spec = props.get(name)
        if spec is None:
            raise ArgumentError(f"unknown parameter {name!r} (known: {', '.join(props) or 'none'})")
        out[name] = _coerce(name, spec.get("type"), value)
    missing = [n for n in schema.get("required", []) if n not in out]
    if missing:
        raise ArgumentError(f"missing required parameter {missing[0]!r}")
    return out


def _coerce(name: str, kind: Any, value: Any) -> Any:
    if kind == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ArgumentError(f"parameter {name!r} must be a boolean")
    if kind == "integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value.strip())
        raise ArgumentError(f"parameter {name!r} must be an integer")
    if kind == "string":
        if isinstance(value, str):
            return value
        raise ArgumentError(f"parameter {name!r} must be a string, got {type(value).__name__}")
    return value
