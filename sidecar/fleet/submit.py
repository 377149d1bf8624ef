"""`sidecar submit`: post a task to the hub's API and, with `--wait`, follow it to its end.

Exit status as `sidecar exec`: 0 completed, 1 failed (or refused), 124 still
not finished when the wait's time limit passed, 2 bad usage. `--json` prints
one JSON object per line: `{"event":"submitted",…}`, then with `--wait` a
`{"event":"status",…}` per change and `{"event":"result",…,"exit_code":N}`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO

import attrs
import httpx
import trio

from .hubapi import HubAPI, HubError

PRIORITIES = ("low", "normal", "urgent", "critical")
VERIFY_TYPES = ("file_exists", "test_passes", "git_clean", "command_succeeds")
TIERS = ("trivial", "standard", "complex")
# Terminal task statuses: the hub's, and the dev hub's `cancelled`.
SUCCESS_STATUSES = frozenset({"completed"})
FAILED_STATUSES = frozenset({"failed", "dead_letter", "cancelled"})
# Polling `GET /api/tasks/ID`: first after this long, doubling up to the cap.
POLL_FIRST_S = 0.2
POLL_MAX_S = 2.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 124


class UsageError(ValueError):
    """A bad option value; the message names the option."""


@attrs.frozen
class SubmitRequest:
    hub: str
    token: str
    description: str
    priority: str = "normal"
    shell: str | None = None
    metadata: str | None = None  # a JSON object, as typed
    target: str | None = None
    verify: Sequence[str] = ()
    tier: str | None = None
    max_retries: int | None = None
    wait: bool = False
    timeout_s: float = 3600.0
    json: bool = False


def parse_verify(spec: str) -> dict[str, Any]:
    """`TYPE:TARGET` (TARGET may be empty for `git_clean`) → one verification step."""
    kind, _sep, target = spec.partition(":")
    kind = kind.strip()
    if kind not in VERIFY_TYPES:
        raise UsageError(f"--verify {spec!r}: TYPE must be one of {', '.join(VERIFY_TYPES)}")
    if not target and kind != "git_clean":
        raise UsageError(f"--verify {spec!r}: {kind} needs a target (TYPE:TARGET)")
    return {"type": kind, "target": target, "description": f"{kind} {target}".strip()}


def build_body(req: SubmitRequest) -> dict[str, Any]:
    """The `POST /api/tasks` body for the request; raises UsageError."""
    if not req.description.strip():
        raise UsageError("--description must not be empty")
    if req.priority not in PRIORITIES:
        raise UsageError(f"--priority must be one of {', '.join(PRIORITIES)}")
    metadata: dict[str, Any] = {}
    if req.metadata is not None:
        try:
            parsed = json.loads(req.metadata)
        except ValueError as exc:
            raise UsageError(f"--metadata is not JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise UsageError("--metadata must be a JSON object")
        metadata.update(parsed)
    tier = req.tier
    if req.shell is not None:
        if not req.shell.strip():
            raise UsageError("--shell must not be empty")
        metadata["shell_command"] = req.shell
        tier = tier or "trivial"  # the hub's router sends trivial work to the sidecar's shell path
    if tier is not None and tier not in TIERS:
        raise UsageError(f"--tier must be one of {', '.join(TIERS)}")
    if req.target is not None:
        metadata["assign_to"] = req.target
    body: dict[str, Any] = {
        "description": req.description,
        "priority": req.priority,
        "metadata": metadata,
        "verification_steps": [parse_verify(v) for v in req.verify],
    }
    if tier is not None:
        body["complexity_tier"] = tier
    if req.max_retries is not None:
        if req.max_retries < 0:
            raise UsageError("--max-retries must be zero or more")
        body["max_retries"] = req.max_retries
    return body


def exit_code_of(status: str | None) -> int | None:
    """The exit status a finished task gives; None while it runs."""
    if status in SUCCESS_STATUSES:
        return EXIT_OK
    if status in FAILED_STATUSES:
        return EXIT_FAILED
    return None


async def follow(
    api: HubAPI,
    task_id: str,
    timeout_s: float,
    on_change: Callable[[dict[str, Any]], Awaitable[None] | None] | None = None,
) -> dict[str, Any] | None:
    """Poll the task until it ends; its last record, or None if `timeout_s` passed first.

    `on_change` sees the record each time its status (or holder) changes.
    """
    seen: tuple[Any, Any] | None = None
    delay = POLL_FIRST_S
    with trio.move_on_after(timeout_s if math.isfinite(timeout_s) else math.inf):
        while True:
            task = await api.task(task_id)
            key = (task.get("status"), task.get("assigned_to"))
            if key != seen:
                seen = key
                if on_change is not None:
                    maybe = on_change(task)
                    if maybe is not None:
                        await maybe
            if exit_code_of(task.get("status")) is not None:
                return task
            await trio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)
    return None


def _output_of(task: dict[str, Any]) -> str:
    result = task.get("result")
    if isinstance(result, dict) and isinstance(result.get("output"), str):
        return str(result["output"])
    return ""


def describe_delivery(task: dict[str, Any]) -> list[str]:
    """Indented lines for what the task's end carried besides its output: the
    verification (when it ran checks; each check that did not pass), the pull
    request and any git warning."""
    lines: list[str] = []
    report = task.get("verification_report")
    if isinstance(report, dict) and isinstance(report.get("checks"), list) and report["checks"]:
        found = report.get("summary")
        summary: dict[str, Any] = found if isinstance(found, dict) else {}
        lines.append(
            f"  verification {report.get('status')}: {summary.get('passed', '?')}/"
            f"{summary.get('total', len(report['checks']))} checks passed"
        )
        for check in report["checks"]:
            if isinstance(check, dict) and check.get("status") != "pass":
                output = str(check.get("output") or "").strip().splitlines()
                why = f": {output[-1][:200]}" if output else ""
                lines.append(f"    {check.get('status')} {check.get('type')} {check.get('target')}{why}")
    result = task.get("result")
    if isinstance(result, dict):
        if result.get("pr_url"):
            lines.append(f"  pull request: {result['pr_url']}")
        if result.get("git_warning"):
            lines.append(f"  git warning: {str(result['git_warning'])[:500]}")
    return lines


def describe_end(task: dict[str, Any]) -> str:
    """One line for a finished task: its status, and its output or error."""
    status = task.get("status")
    if status in SUCCESS_STATUSES:
        out = _output_of(task).strip()
        return f"completed: {out[:500]}" if out else "completed"
    error = task.get("error") or task.get("last_error") or "no reason given"
    return f"{status}: {str(error)[:500]}"


async def run_submit(
    req: SubmitRequest, out: TextIO, err: TextIO | None = None, http: httpx.AsyncClient | None = None
) -> int:
    """Submit (and follow) the task; progress on `out`, problems on `err` (default stderr)."""
    err = err if err is not None else sys.stderr
    try:
        body = build_body(req)
    except UsageError as exc:
        print(f"sidecar submit: {exc}", file=err)
        return EXIT_USAGE
    if http is None:
        async with httpx.AsyncClient() as client:
            return await _submit(req, body, out, err, HubAPI(client, req.hub, req.token))
    return await _submit(req, body, out, err, HubAPI(http, req.hub, req.token))


def _emit(out: TextIO, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


async def _submit(req: SubmitRequest, body: dict[str, Any], out: TextIO, err: TextIO, api: HubAPI) -> int:
    try:
        answer = await api.submit(body)
    except HubError as exc:
        if req.json:
            _emit(out, {"event": "error", "error": str(exc), "exit_code": EXIT_FAILED})
        else:
            print(f"sidecar submit: {exc}", file=err)
        return EXIT_FAILED
    task_id = str(answer["task_id"])
    if req.json:
        _emit(out, {"event": "submitted", **answer})
    else:
        print(task_id, file=out, flush=True)
    if not req.wait:
        return EXIT_OK

    def on_change(task: dict[str, Any]) -> None:
        if req.json:
            _emit(
                out,
                {
                    "event": "status",
                    "task_id": task_id,
                    "status": task.get("status"),
                    "assigned_to": task.get("assigned_to"),
                },
            )
        else:
            holder = f" ({task['assigned_to']})" if task.get("assigned_to") else ""
            print(f"{task_id}: {task.get('status')}{holder}", file=out, flush=True)

    try:
        task = await follow(api, task_id, req.timeout_s, on_change)
    except HubError as exc:
        if req.json:
            _emit(out, {"event": "error", "task_id": task_id, "error": str(exc), "exit_code": EXIT_FAILED})
        else:
            print(f"sidecar submit: {exc}", file=err)
        return EXIT_FAILED
    if task is None:
        if req.json:
            _emit(
                out, {"event": "result", "task_id": task_id, "status": "timeout", "exit_code": EXIT_TIMEOUT}
            )
        else:
            print(f"{task_id}: not finished after {req.timeout_s:g} s (it stays on the hub)", file=out)
        return EXIT_TIMEOUT
    code = exit_code_of(task.get("status"))
    assert code is not None
    if req.json:
        _emit(
            out,
            {
                "event": "result",
                "task_id": task_id,
                "status": task.get("status"),
                "exit_code": code,
                "result": task.get("result"),
                "verification_report": task.get("verification_report"),
                "error": task.get("error"),
            },
        )
    else:
        print(f"{task_id}: {describe_end(task)}", file=out, flush=True)
        for line in describe_delivery(task):
            print(line, file=out, flush=True)
    return code
