"""The live terminal view of running tasks, for `sidecar exec` and `sidecar demo`.

On a terminal: output lines scroll above a status area that is redrawn in
place, one line per running task (spinner, elapsed time, tokens so far, model,
and the tail of the text being streamed). Elsewhere (a pipe, a file): the same
lines without colours or status area, so logs of a run stay readable.

Hand-rolled ANSI (cursor up, erase to end of screen): four escape sequences are
all it needs, and a dependency for them would be heavier than the code.

Event types (protocol.md `execution_event`): `token` text is a fragment of a
stream and is joined until a newline; `stdout`/`stderr` come as whole lines
(or blocks of them); `status` and `error` are one-line notes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TextIO

import attrs

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

RESET = "\x1b[0m"
_STYLE = {
    "stdout": "",
    "token": "",
    "stderr": "\x1b[33m",
    "status": "\x1b[36m",
    "error": "\x1b[31m",
    "dim": "\x1b[2m",
    "ok": "\x1b[32;1m",
    "fail": "\x1b[31;1m",
    "label": "\x1b[1m",
}
_MARK = {"status": "· ", "error": "! "}


@attrs.define
class _Task:
    label: str
    started: float
    tokens: int | None = None
    model: str | None = None
    partial: str = ""
    events: int = 0
    done: bool = False


class LiveView:
    """Renders progress events of one or more tasks to `out`.

    `labels=True` prefixes every line with its task's label and elapsed time
    (several tasks at once); `tty=None` asks `out.isatty()`.
    """

    def __init__(
        self,
        out: TextIO,
        *,
        tty: bool | None = None,
        labels: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.labels = labels
        self.clock = clock
        self.origin = clock()
        self.tasks: dict[str, _Task] = {}
        self._status_lines = 0
        self._frame = 0

    # -- public ----------------------------------------------------------------

    def add(self, key: str, label: str) -> None:
        self.tasks[key] = _Task(label, self.clock())
        self._redraw()

    def event(
        self,
        key: str,
        event_type: str,
        text: str,
        *,
        tokens_so_far: int | None = None,
        model: str | None = None,
    ) -> None:
        t = self.tasks[key]
        t.events += 1
        if tokens_so_far is not None:
            t.tokens = tokens_so_far
        if model:
            t.model = model
        lines: list[tuple[str, str]] = []
        if event_type == "token":
            t.partial += text
            *whole, t.partial = t.partial.split("\n")
            lines = [("token", line) for line in whole]
        elif event_type in ("stdout", "stderr"):
            lines = [(event_type, line) for line in text.removesuffix("\n").split("\n")]
        else:
            lines = [(event_type, _MARK.get(event_type, "") + line) for line in (text.splitlines() or [""])]
        if lines:
            self._print([self._decorate(key, kind, line) for kind, line in lines])
        else:
            self._redraw()

    def finish(self, key: str, ok: bool, summary: str) -> None:
        """End a task: flush its partial line and print its result line."""
        t = self.tasks[key]
        t.done = True
        lines = [self._decorate(key, "token", t.partial)] if t.partial else []
        t.partial = ""
        lines.append(self._paint(("✔ " if ok else "✘ ") + summary, "ok" if ok else "fail"))
        self._print(lines)

    def note(self, text: str, style: str = "dim") -> None:
        """A line of our own (not task output)."""
        self._print([self._paint(text, style)])

    def tick(self) -> None:
        """Advance the spinner and redraw the status area (terminal only)."""
        self._frame += 1
        self._redraw()

    def close(self) -> None:
        self._erase()
        self.out.flush()

    # -- rendering ---------------------------------------------------------------

    def _paint(self, text: str, style: str) -> str:
        code = _STYLE.get(style, "")
        return f"{code}{text}{RESET}" if self.tty and code else text

    def _decorate(self, key: str, kind: str, line: str) -> str:
        body = self._paint(line, kind)
        if not self.labels:
            return body
        t = self.tasks[key]
        stamp = f"{self.clock() - self.origin:6.1f}s"
        return f"{self._paint(stamp, 'dim')}  {self._paint(f'{t.label:8}', 'label')} {body}"

    def _width(self) -> int:
        try:
            return max(20, os.get_terminal_size(self.out.fileno()).columns)
        except (OSError, ValueError, AttributeError):
            return 80

    def _status(self) -> list[str]:
        width = self._width()
        spin = SPINNER[self._frame % len(SPINNER)]
        rows = []
        for t in self.tasks.values():
            if t.done:
                continue
            parts = [f"{spin} {t.label}", f"{self.clock() - t.started:5.1f}s"]
            if t.tokens is not None:
                parts.append(f"{t.tokens} tokens")
            if t.model:
                parts.append(t.model)
            head = "  ".join(parts)
            tail = t.partial.replace("\t", " ")
            room = width - len(head) - 3
            if tail and room > 8:
                tail = tail[-room:]
                rows.append(f"{_STYLE['status']}{head}{RESET} │ {tail}")
            else:
                rows.append(f"{_STYLE['status']}{head[: width - 1]}{RESET}")
        return rows

    def _erase(self) -> None:
        if self.tty and self._status_lines:
            up = f"\x1b[{self._status_lines - 1}A" if self._status_lines > 1 else ""
            self.out.write(f"\r{up}\x1b[J")
            self._status_lines = 0

    def _redraw(self) -> None:
        if not self.tty:
            return
        self._erase()
        rows = self._status()
        if rows:
            self.out.write("\n".join(rows))
            self._status_lines = len(rows)
        self.out.flush()

    def _print(self, lines: list[str]) -> None:
        self._erase()
        for line in lines:
            self.out.write(line + "\n")
        if self.tty:
            self._redraw()
        else:
            self.out.flush()
