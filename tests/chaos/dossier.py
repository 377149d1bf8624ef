"""What a chaos violation says about its task, so it can be diagnosed without a replay.

A replay reproduces an episode's schedule and faults, not its interleaving, so
a violation that depends on timing may not come back (issue 9: a shell task's
empty output). The report therefore carries, for each task a violation names:
the hub's record of it (status, generation, history), every frame any of the
episode's hubs received or sent that names it, in time order, and each
sidecar's log lines about it (by `task_id`, or by the task's process marker).

Times are given twice: seconds on the episode's Trio clock (`+12.345s`, from the
episode's start) and UTC wall-clock (`08:12:01.123`), so hub frames line up
with the sidecars' log `ts`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from sidecar.devhub import DevHub, FrameRecord, HubState

# Longest run of task_progress frames shown in full; longer runs are folded.
PROGRESS_RUN_SHOWN = 8
FRAME_LINES_MAX = 200
LOG_LINES_MAX = 150
TEXT_MAX = 120
_LOG_SKIP = ("ts", "level", "logger", "event", "task_id")


@attrs.frozen
class Clock:
    """Converts the episode's Trio times to printable ones."""

    start: float  # Trio time of the episode's start
    wall_offset: float  # time.time() - trio.current_time()

    def stamp(self, at: float) -> str:
        wall = at + self.wall_offset
        ms = int((wall % 1) * 1000)
        return f"+{at - self.start:.3f}s {time.strftime('%H:%M:%S', time.gmtime(wall))}.{ms:03d}"


def _short(value: Any, limit: int = TEXT_MAX) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return repr(text[:limit]) + (f"…(+{len(text) - limit})" if len(text) > limit else "")


def frame_summary(frame: Mapping[str, Any]) -> str:
    """The fields of a frame that matter for a task's lifecycle, on one line."""
    parts: list[str] = []
    for key in ("generation", "status", "action", "last_status", "reason"):
        if key in frame:
            parts.append(f"{key}={frame[key]}")
    event = frame.get("execution_event")
    if isinstance(event, Mapping):
        parts.append(f"seq={event.get('seq')} {event.get('event_type')} {_short(event.get('text', ''), 60)}")
        for key in ("dropped_events", "dropped_bytes"):
            if event.get(key):
                parts.append(f"{key}={event[key]}")
    result = frame.get("result")
    if isinstance(result, Mapping):
        parts.append(f"output={_short(result.get('output', ''))}")
        for key in ("exit_code", "attempts", "output_truncated", "execution_ms"):
            if key in result:
                parts.append(f"{key}={result[key]}")
    if "error" in frame:
        parts.append(f"error={_short(frame['error'])}")
    return " ".join(parts)


def _frame_lines(task_id: str, hubs: Sequence[DevHub], clock: Clock) -> list[str]:
    found: list[tuple[float, int, str, FrameRecord]] = []
    for hi, hub in enumerate(hubs, start=1):
        for arrow, records in (("<-", hub.frames()), ("->", hub.sent())):
            for rec in records:
                if rec.frame is not None and rec.frame.get("task_id") == task_id:
                    found.append((rec.at, hi, arrow, rec))
    found.sort(key=lambda item: item[0])
    lines: list[str] = []
    run: list[str] = []

    def flush_progress() -> None:
        if len(run) > PROGRESS_RUN_SHOWN:
            keep = PROGRESS_RUN_SHOWN // 2
            lines.extend(run[:keep])
            lines.append(f"    … {len(run) - 2 * keep} more task_progress frames …")
            lines.extend(run[-keep:])
        else:
            lines.extend(run)
        run.clear()

    for at, hi, arrow, rec in found:
        verdict = "" if rec.verdict in ("ok", "sent") else f" [{rec.verdict}]"
        assert rec.frame is not None
        line = (
            f"  {clock.stamp(at)} hub{hi} s{rec.session} {arrow} {rec.agent_id} "
            f"{rec.type} {frame_summary(rec.frame)}{verdict}"
        )
        if rec.type == "task_progress":
            run.append(line)
            continue
        flush_progress()
        lines.append(line)
    flush_progress()
    if len(lines) > FRAME_LINES_MAX:
        half = FRAME_LINES_MAX // 2
        lines = [*lines[:half], f"    … {len(lines) - 2 * half} more frames …", *lines[-half:]]
    return lines or ["  (no frame names this task)"]


def _log_line(agent: str, event: Mapping[str, Any]) -> str:
    rest = " ".join(
        f"{k}={_short(v, 200) if isinstance(v, str) and (' ' in v or len(v) > 200) else v}"
        for k, v in event.items()
        if k not in _LOG_SKIP
    )
    ts = str(event.get("ts", "?"))[11:23]
    return f"  {ts} {agent} {event.get('level', '?'):7} {event.get('event')} {rest}"


def _log_lines(task_id: str, logs: Mapping[str, tuple[str, Sequence[Mapping[str, Any]]]]) -> list[str]:
    lines: list[str] = []
    for agent, (marker, events) in logs.items():
        mine = [e for e in events if e.get("task_id") == task_id or e.get("marker") == marker]
        if len(mine) > LOG_LINES_MAX:
            lines.append(f"  … {agent}: {len(mine) - LOG_LINES_MAX} earlier lines …")
            mine = mine[-LOG_LINES_MAX:]
        lines.extend(_log_line(agent, e) for e in mine)
    return lines or ["  (no sidecar logged this task)"]


def _session_lines(agents: Sequence[str], hubs: Sequence[DevHub], clock: Clock) -> list[str]:
    """Every connection of the agents that held the task: when the hub first and last heard on it,
    how many frames went each way, and the last frame it read. An agent that went quiet (a
    session the hub stopped reading, a reconnect that never came) shows here, whatever task its
    silence concerned."""
    lines: list[str] = []
    for agent in agents:
        for hi, hub in enumerate(hubs, start=1):
            sessions: dict[int, tuple[list[FrameRecord], list[FrameRecord]]] = {}
            for records, side in ((hub.frames(agent), 0), (hub.sent(agent), 1)):
                for rec in records:
                    sessions.setdefault(rec.session, ([], []))[side].append(rec)
            for sid, (received, sent) in sorted(sessions.items()):
                times = [r.at for r in received + sent]
                last_in = max(received, key=lambda r: r.at).type if received else None
                lines.append(
                    f"  hub{hi} s{sid} {agent}: {clock.stamp(min(times))} .. {clock.stamp(max(times))},"
                    f" {len(received)} in, {len(sent)} out, last in: {last_in}"
                )
    return lines or ["  (no session of these agents reached a hub)"]


def task_dossier(
    task_id: str,
    *,
    kind: str,
    state: HubState,
    hubs: Sequence[DevHub],
    logs: Mapping[str, tuple[str, Sequence[Mapping[str, Any]]]],
    clock: Clock,
) -> str:
    """Everything the episode knows of one task, as indented text.

    `logs` maps each agent to (the task's marker on that agent, the agent's
    JSON log events).
    """
    rec = state.tasks.get(task_id)
    out = [f"task {task_id} ({kind})"]
    if rec is None:
        out.append("  unknown to the hub")
    else:
        out.append(
            f"  hub record: status {rec.status}, generation {rec.generation}, "
            f"assigned to {rec.assigned_to}, retries {rec.retry_count}/{rec.max_retries}"
        )
        out.append(" hub history:")
        out.extend(f"  {clock.stamp(at)} {event} {info}" for event, at, info in rec.history)
    out.append(" frames at the hubs (<- received, -> sent):")
    out.extend(_frame_lines(task_id, hubs, clock))
    out.append(" sidecar log lines:")
    out.extend(_log_lines(task_id, logs))
    history = [] if rec is None else rec.history
    holders = [str(info["agent_id"]) for *_, info in history if info.get("agent_id")]
    out.append(" sessions of the agents that held it:")
    out.extend(_session_lines(list(dict.fromkeys(holders)), hubs, clock))
    return "\n".join(out)
