"""Wire messages of the AgentCom hub protocol (see shared/protocol.md).

Inbound `task_assign` frames are structured into attrs classes by one cattrs
converter; a bad frame raises `FrameError` naming the path of the bad field.
Outbound frames are plain dicts built by the `*_frame` helpers, so that field
names match the hub's schema exactly.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, get_origin

import attrs
import cattrs
import cattrs.gen
from cattrs.cols import list_structure_factory
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)

PROTOCOL_VERSION = 1

# String limits the hub's validator enforces (protocol.md, "Hub limits").
LIMITS: dict[str, int] = {
    "agent_id": 128,
    "description": 10_000,
    "error": 2_000,
    "reason": 2_000,
    "status": 256,
    "token": 256,
    "name": 256,
    "repo": 512,
    "ollama_url": 512,
}

# Verification defaults (protocol.md): the hub's cap on corrective retries is 5.
DEFAULT_VERIFICATION_TIMEOUT_MS = 120_000
MAX_TIME_LIMIT_MS = 2**53 - 1
# A task_assign nested deeper than this is refused: the hub's own frames nest
# a few levels, and near 1,000 levels json can read a frame it cannot write back.
MAX_TASK_DEPTH = 64
MAX_VERIFICATION_RETRIES = 5

EVENT_TYPES = frozenset({"token", "stdout", "stderr", "status", "error", "tool_call"})


class FrameError(ValueError):
    """A frame from the hub that cannot be used; `path` names the bad field."""

    def __init__(
        self, path: str, problem: str, task_id: str | None = None, frame_type: str | None = None
    ) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
        self.task_id = task_id
        # The frame's `type`, when it could be read although the frame is bad.
        self.frame_type = frame_type


def now_ms() -> int:
    """Wall-clock milliseconds, for the wire only (`timestamp`, `assigned_at`)."""
    return int(time.time() * 1000)


def truncate(text: str, limit: int) -> str:
    """Cut `text` to at most `limit` characters, marking the cut."""
    if len(text) <= limit:
        return text
    marker = "…[truncated]"
    return text[: max(0, limit - len(marker))] + marker


@attrs.frozen
class Complexity:
    effective_tier: str | None = None
    source: str | None = None
    explicit_tier: str | None = None
    inferred: dict[str, Any] | None = None


@attrs.frozen
class RoutingDecision:
    target_type: str | None = None
    effective_tier: str | None = None
    selected_endpoint: str | None = None
    selected_model: str | None = None
    fallback_used: bool | None = None
    fallback_reason: str | None = None
    classification_reason: str | None = None
    estimated_cost_tier: str | None = None
    # Newer hubs: run the agentic tool loop (docs/agentic.md).
    agentic: bool | None = None


@attrs.frozen
class Task:
    """One `task_assign` from the hub. `raw` keeps the frame as received."""

    task_id: str
    description: str = ""
    metadata: dict[str, Any] = attrs.field(factory=dict)
    generation: int = 0
    assigned_at: int | None = None
    repo: str | None = None
    branch: str | None = None
    file_hints: list[Any] = attrs.field(factory=list)
    success_criteria: list[Any] = attrs.field(factory=list)
    verification_steps: list[Any] = attrs.field(factory=list)
    complexity: Complexity | None = None
    routing_decision: RoutingDecision | None = None
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def shell_command(self) -> str | None:
        cmd = self.metadata.get("shell_command")
        return cmd if isinstance(cmd, str) and cmd.strip() else None

    @property
    def timeout_ms(self) -> int | None:
        value = self.metadata.get("timeout_ms")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            return None
        # Larger than any clock can hold (a 400-digit integer overflowed the float
        # of the supervisor's deadline): a limit of 285,000 years is none.
        return int(min(value, MAX_TIME_LIMIT_MS))

    # Newer hubs send these three beside the task (protocol.md, "Verification").
    # Read leniently: a value of the wrong type means the default, never a
    # refused task.
    @property
    def skip_verification(self) -> bool:
        return self.raw.get("skip_verification") is True

    @property
    def verification_timeout_ms(self) -> int:
        value = self.raw.get("verification_timeout_ms")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 2**53:
            return DEFAULT_VERIFICATION_TIMEOUT_MS
        return int(value)

    @property
    def max_verification_retries(self) -> int:
        value = self.raw.get("max_verification_retries")
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return 0
        return min(value, MAX_VERIFICATION_RETRIES)

    def ignored_fields(self) -> list[tuple[str, Any, str, Any]]:
        """The lenient fields present with a value they cannot have, as (path,
        value, problem, what is used instead): a task is never refused for them,
        but the user should hear why a limit or a skip did not apply."""
        found: list[tuple[str, Any, str, Any]] = []
        value = self.metadata.get("timeout_ms")
        if value is not None and self.timeout_ms is None:
            found.append(("metadata.timeout_ms", value, "not a positive number of milliseconds", None))
        value = self.raw.get("skip_verification")
        if value is not None and not isinstance(value, bool):
            found.append(("skip_verification", value, "not a boolean (true or false)", False))
        value = self.raw.get("verification_timeout_ms")
        if value is not None and value != self.verification_timeout_ms == DEFAULT_VERIFICATION_TIMEOUT_MS:
            found.append(
                (
                    "verification_timeout_ms",
                    value,
                    "not a positive number of milliseconds",
                    DEFAULT_VERIFICATION_TIMEOUT_MS,
                )
            )
        value = self.raw.get("max_verification_retries")
        if value is not None and self.max_verification_retries != value:
            problem = f"not an integer from 0 to {MAX_VERIFICATION_RETRIES}"
            found.append(("max_verification_retries", value, problem, self.max_verification_retries))
        return found

    @property
    def priority(self) -> str:
        value = self.metadata.get("priority")
        return value.strip() if isinstance(value, str) and value.strip() else "normal"


def _strict_str(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _strict_int(value: Any, _type: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


def _strict_float(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _strict_bool(value: Any, _type: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    return value


def _strict_dict(value: Any, _type: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _strict_list(value: Any, _type: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _is_list_type(t: Any) -> bool:
    origin: Any = get_origin(t)
    return origin is list


def make_converter() -> cattrs.Converter:
    """The one converter for messages and config: strict types, detailed errors."""
    conv = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(float, _strict_float)

    # attrs classes only from JSON objects: cattrs would otherwise read a list
    # (or a string) as an object whose every field is missing.
    def _objects_only(cls: type) -> Any:
        inner: Any = cattrs.gen.make_dict_structure_fn(cls, conv)

        def structure(value: Any, _type: Any) -> Any:
            if not isinstance(value, dict):
                raise TypeError(f"expected an object, got {type(value).__name__}")
            return inner(value, _type)

        return structure

    # Lists only from JSON lists: cattrs would read "code" as ["c", "o", "d", "e"].
    def _lists_only(cls: type) -> Any:
        inner = list_structure_factory(cls, conv)

        def structure(value: Any, _type: Any) -> Any:
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            return inner(value, _type)

        return structure

    conv.register_structure_hook_factory(attrs.has, _objects_only)
    conv.register_structure_hook_factory(_is_list_type, _lists_only)
    conv.register_structure_hook_func(lambda t: t == dict[str, Any], _strict_dict)
    conv.register_structure_hook_func(lambda t: t == list[Any], _strict_list)
    return conv


converter = make_converter()


def error_path(exc: BaseException, root: str = "$") -> tuple[str, str]:
    """Find the first leaf error of a cattrs validation error and its field path."""
    if isinstance(exc, ForbiddenExtraKeysError):
        return f"{root}.{sorted(exc.extra_fields)[0]}", "unknown field"
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        for sub in exc.exceptions:
            for note in getattr(sub, "__notes__", []):
                if isinstance(note, IterableValidationNote):
                    return error_path(sub, f"{root}[{note.index!r}]")
                if isinstance(note, AttributeValidationNote):
                    return error_path(sub, f"{root}.{note.name}")
            return error_path(sub, root)
    if isinstance(exc, KeyError):
        return root, "is required"
    field, problem = getattr(exc, "field", None), getattr(exc, "problem", None)
    if isinstance(field, str) and isinstance(problem, str):
        # A check of the field itself (configfields.setting) named it.
        return f"{root}.{field}", problem
    return root, str(exc) or type(exc).__name__


def parse_task(frame: dict[str, Any]) -> Task:
    """Structure a `task_assign` frame; raise FrameError naming the bad field."""
    task_id = frame.get("task_id")
    tid = task_id if isinstance(task_id, str) and task_id else None
    if tid is None:
        problem = "is required" if task_id is None else "must be a non-empty string"
        raise FrameError("task_id", problem)
    fields = {a.name for a in attrs.fields(Task)} - {"raw"}
    data = {k: v for k, v in frame.items() if k in fields and v is not None}
    try:
        task = converter.structure(data, Task)
    except Exception as exc:  # cattrs raises several kinds; all mean "bad frame"
        path, problem = error_path(exc)
        raise FrameError(path.removeprefix("$."), problem, task_id=tid) from exc
    # Each refused below is failed at once under its own id (BadTaskAssign): left
    # unanswered, the hub would take it back after 60 s and send it again, for ever.
    if len(task.task_id) > 512:
        raise FrameError("task_id", "longer than 512 characters", task_id=tid)
    if too_deep(frame, MAX_TASK_DEPTH):
        raise FrameError("$", f"nested deeper than {MAX_TASK_DEPTH} levels", task_id=tid)
    if not is_unicode(task.task_id):
        raise FrameError("task_id", LONE_SURROGATE, task_id=tid)
    if not is_generation(task.generation):
        raise FrameError("generation", GENERATION_RANGE, task_id=tid)
    return attrs.evolve(task, raw=frame)


# SQLite's INTEGER is 64 bits: a larger generation could be neither stored nor compared.
MAX_GENERATION = 2**63 - 1
GENERATION_RANGE = f"out of range (0 to {MAX_GENERATION})"


def is_generation(value: Any) -> bool:
    """Whether `value` is a generation we can hold: an integer from 0 to `MAX_GENERATION`."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_GENERATION


def lenient_generation(value: Any) -> int:
    """A frame's `generation` if it is one we can hold, else 0 (for the answer to a bad frame)."""
    return value if is_generation(value) else 0


LONE_SURROGATE = "holds a lone surrogate escape (not valid Unicode)"


def too_deep(value: Any, limit: int) -> bool:
    """Whether lists and objects in `value` nest more than `limit` levels (read without recursion)."""
    level = [value] if isinstance(value, (dict, list)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[Any] = []
        for item in level:
            for child in item.values() if isinstance(item, dict) else item:
                if isinstance(child, (dict, list)):
                    below.append(child)
        level = below
    return False


def is_unicode(text: str) -> bool:
    """Whether `text` is valid Unicode, i.e. holds no lone surrogate (which JSON
    escapes can carry, but neither UTF-8 nor SQLite can)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _NonFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"number {text[:40]} is out of range")
    return value


def _no_constant(name: str) -> float:
    raise _NonFinite(f"{name} is not a JSON number")


def lenient_head(text: str) -> dict[str, Any]:
    """`type`, `task_id` and `generation` of a frame json refused, those that can be read.

    For the answer to a bad frame: a task_assign that names its task is failed
    under that id, whatever else is wrong with it. First json with every float
    and every integer over 19 digits read as 0 (a 1e400, a 5,000-digit integer:
    a generation has at most 19); if that fails too (nesting json cannot follow,
    a frame cut short), the top level alone, without recursion.
    """
    try:
        obj = json.loads(text, parse_int=_short_int, parse_float=_zero, parse_constant=_zero)
    except (ValueError, RecursionError):
        obj = _top_level(text, {"type", "task_id", "generation"})
    if not isinstance(obj, dict):
        return {}
    head: dict[str, Any] = {}
    kind, tid, gen = obj.get("type"), obj.get("task_id"), obj.get("generation")
    if isinstance(kind, str):
        head["type"] = kind
    if isinstance(tid, str) and tid:
        head["task_id"] = tid
    if isinstance(gen, int) and not isinstance(gen, bool):
        head["generation"] = gen
    return head


def _zero(_text: str) -> int:
    return 0


def _short_int(text: str) -> int:
    return int(text) if len(text) <= 19 else 0


_JSON_SPACE = " \t\n\r"
_SHORT_INT = re.compile(r"-?\d{1,19}")


def _top_level(text: str, keys: set[str]) -> dict[str, Any]:
    """The string and integer values of `keys` at the top level of a JSON object's text,
    read up to the first thing that is not JSON; other values are skipped unread."""
    out: dict[str, Any] = {}
    n = len(text)

    def space(i: int) -> int:
        while i < n and text[i] in _JSON_SPACE:
            i += 1
        return i

    i = space(0)
    if i >= n or text[i] != "{":
        return out
    try:
        i += 1
        while True:
            i = space(i)
            if i >= n or text[i] != '"':
                return out
            key, i = _string_at(text, i)
            i = space(i)
            if i >= n or text[i] != ":":
                return out
            i = space(i + 1)
            if i < n and text[i] == '"':
                value, i = _string_at(text, i)
                if key in keys:
                    out[key] = value
            else:
                begin, i = i, _skip_value(text, i)
                if i < 0:
                    return out
                if key in keys and _SHORT_INT.fullmatch(text[begin:i]):
                    out[key] = int(text[begin:i])
            i = space(i)
            if i >= n or text[i] != ",":
                return out
            i += 1
    except ValueError:  # a broken string
        return out


_DECODER = json.JSONDecoder()


def _string_at(text: str, i: int) -> tuple[str, int]:
    """The JSON string starting at `text[i]` (a quote) and the index past it; ValueError if broken."""
    value, end = _DECODER.raw_decode(text, i)
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value, end


def _skip_value(text: str, i: int) -> int:
    """Index just past the JSON value at `i` (brackets counted, strings skipped), or -1."""
    n = len(text)
    if i >= n:
        return -1
    if text[i] == '"':
        return _string_at(text, i)[1]
    if text[i] not in "[{":
        j = i
        while j < n and text[j] not in ",]} \t\n\r":
            j += 1
        return j if j > i else -1
    depth = 0
    while i < n:
        c = text[i]
        if c == '"':
            i = _string_at(text, i)[1]
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def decode_frame(text: str | bytes) -> dict[str, Any]:
    """Decode one inbound frame into a JSON object with a string `type`.

    Python's json module reads `NaN`, `Infinity` and `1e400` (as inf); none is
    JSON a hub should send, and any of them as a delay or count is absurd, so
    each makes the whole frame bad.
    """
    if isinstance(text, bytes):
        raise FrameError("$", "binary frame (the protocol uses text frames)")
    try:
        obj = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # _NonFinite is a ValueError
        if isinstance(exc, _NonFinite):
            problem = f"non-finite number: {exc}"
        else:
            problem = f"not JSON ({type(exc).__name__}: {str(exc)[:120]})"
        head = lenient_head(text)
        raise FrameError("$", problem, task_id=head.get("task_id"), frame_type=head.get("type")) from exc
    if not isinstance(obj, dict):
        raise FrameError("$", f"not a JSON object ({type(obj).__name__})")
    if not isinstance(obj.get("type"), str):
        raise FrameError("type", "missing or not a string")
    return obj


def encode_frame(frame: dict[str, Any]) -> str:
    """Encode an outbound frame, adding `protocol_version` as the original does."""
    out = dict(frame)
    out.setdefault("protocol_version", PROTOCOL_VERSION)
    return wire_json(out)


def wire_json(obj: Any) -> str:
    """Compact JSON for a text frame: UTF-8 as it is, except in a frame holding a lone surrogate.

    A hub may send one as a JSON escape (`"t\\ud800"` is valid JSON, though no
    valid Unicode), and it then comes back in our frames (the task id of every
    answer). UTF-8 cannot carry it, so such a frame is written with ASCII
    escapes, which give the hub back exactly the string it sent (as
    JavaScript's `JSON.stringify` does).
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return text if is_unicode(text) else json.dumps(obj, separators=(",", ":"))


@attrs.frozen
class ProgressEvent:
    """One `execution_event` before batching. `seq` is assigned by the batcher."""

    task_id: str
    event_type: str
    text: str
    timestamp: int = attrs.field(factory=now_ms)
    tokens_so_far: int | None = None
    model: str | None = None
    # Fields sent beside the standard ones in `execution_event` (tool_call's
    # tool_name, args_summary, …). An event with extras is never coalesced.
    extra: dict[str, Any] | None = None


@attrs.frozen
class Outcome:
    """What an executor returns; the dispatcher turns it into a result frame.

    `transient` marks a failure worth retrying (per the dispatcher's tier policy).
    `cost_usd` is an authoritative cost reported by the tool itself (Claude CLI).
    `result` overrides the whole result object (the wake path reports the woken
    agent's own result file). `fields` are added to the dispatcher's result
    (the agentic loop's `termination_reason`, `iterations_used`).
    """

    ok: bool
    output: str = ""
    error: str | None = None
    reason: str | None = None
    transient: bool = False
    model_used: str = "none"
    tokens_in: int = 0
    tokens_out: int = 0
    cost_usd: float | None = None
    exit_code: int | None = None
    output_truncated: bool = False
    result: dict[str, Any] | None = None
    fields: dict[str, Any] | None = None


def identify_frame(
    agent_id: str,
    token: str,
    name: str,
    capabilities: list[str],
    ollama_url: str | None,
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "identify",
        "agent_id": truncate(agent_id, LIMITS["agent_id"]),
        "token": token,
        "name": truncate(name, LIMITS["name"]),
        "status": "idle",
        "capabilities": list(capabilities),
        "client_type": "sidecar",
    }
    if ollama_url:
        frame["ollama_url"] = truncate(ollama_url, LIMITS["ollama_url"])
    return frame


def complete_frame(
    task_id: str,
    generation: int,
    result: dict[str, Any],
    tokens_used: int,
    verification_report: dict[str, Any] | None = None,
    verification_history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`task_complete`; the verification report travels top level, not inside `result`."""
    frame: dict[str, Any] = {
        "type": "task_complete",
        "task_id": task_id,
        "generation": generation,
        "result": result,
        "tokens_used": tokens_used,
    }
    if verification_report is not None:
        frame["verification_report"] = verification_report
        frame["verification_history"] = list(verification_history or [verification_report])
    return frame


def failed_frame(task_id: str, generation: int, error: str, reason: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "task_failed",
        "task_id": task_id,
        "generation": generation,
        "error": truncate(error, LIMITS["error"]),
    }
    if reason is not None:
        frame["reason"] = truncate(reason, LIMITS["reason"])
    return frame
