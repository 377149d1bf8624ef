"""Ollama executor: one streaming `POST /api/chat`, relayed chunk by chunk.

Every content chunk becomes a `token` progress event. Only a final line with
`done: true` makes a success: a stream that just ends is truncated (the
official client raises nothing there, so we check it ourselves). Every
failure says which one it was, in `error` for people and `reason` for code.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import trio

from ..agentic import wants_agentic
from ..agentic.chat import count_of, error_text
from ..agentic.loop import LENGTH_NOTICE
from ..agentic.runner import run_agentic, scratch_workdir
from ..log import get_logger
from ..messages import Outcome, Task
from ..progress import ProgressSender
from ..prompt import build_prompt
from ..taskrun import TaskRun
from . import ExecContext

log = get_logger(__name__)

DEFAULT_PORT = 11434
DEFAULT_URL = f"http://localhost:{DEFAULT_PORT}"
_ERROR_BODY_CAP = 64 * 1024  # bytes of a non-200 body we read to find its error
_json_decode = json.JSONDecoder().decode
_HEADERS = {"Accept": "application/x-ndjson", "Accept-Encoding": "identity"}
# A final line with one of these reasons is the server loading or unloading the
# model, not an answer to the chat.
_NOT_A_REPLY = ("load", "unload")


def resolve_url(endpoint: str | None, configured: str | None) -> str:
    """Base URL of the Ollama server: the hub's choice, else config, else the default.

    The hub sends `selected_endpoint` as `host:port`; a bare host gets Ollama's
    port (11434, not HTTP's 80); a full URL is taken as is.
    """
    for value in (endpoint, configured):
        if value and value.strip():
            value = value.strip().rstrip("/")
            if "://" in value:
                return value
            url = "http://" + value
            try:
                port = urlsplit(url).port
            except ValueError:  # a port that is no number: let the request say so
                return url
            return url if port is not None else f"{url}:{DEFAULT_PORT}"
    return DEFAULT_URL


class _Failure(Exception):
    """A failed run, carried to `__call__` which turns it into an Outcome."""

    def __init__(self, reason: str, error: str, transient: bool) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error
        self.transient = transient


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class OllamaExecutor:
    """Runs LLM tasks against an Ollama server through the shared HTTP client."""

    def __init__(self, ctx: ExecContext) -> None:
        self._ctx = ctx
        self._http = ctx.http_client()
        cfg = ctx.config.ollama
        # httpx's read timeout applies to each socket read. It bounds the wait
        # for the answer to begin (Ollama loads a cold model first, which can
        # take minutes); silence once the stream runs is bounded by `_relay` on
        # Trio's clock (`idle_timeout_s`). Both honour MockClock in tests.
        self._idle_s = cfg.idle_timeout_s
        self._load_s = cfg.load_timeout_s
        self._timeout = httpx.Timeout(
            connect=cfg.connect_timeout_s,
            read=max(cfg.load_timeout_s, cfg.idle_timeout_s),
            write=cfg.idle_timeout_s,
            pool=cfg.connect_timeout_s,
        )

    def target(self, task: Task) -> tuple[str, str]:
        """(base URL, model) this task goes to."""
        rd = task.routing_decision
        url = resolve_url(rd.selected_endpoint if rd else None, self._ctx.config.ollama_url)
        model = (rd.selected_model if rd else None) or self._ctx.config.ollama.default_model
        return url, model

    def request_body(self, task: Task, model: str) -> dict[str, Any]:
        return {"model": model, "messages": build_prompt(task).messages(), "stream": True}

    async def __call__(self, run: TaskRun) -> Outcome:
        task, progress = run.task, run.progress
        url, model = self.target(task)
        if wants_agentic(task, self._ctx.config.ollama.agentic):
            return await self._agentic(run, url, model)
        body = self.request_body(task, model)
        parts: list[str] = []
        try:
            tokens_in, tokens_out, done_reason = await self._stream(url, model, body, parts, progress)
        except _Failure as f:
            log.warning("ollama_failed", task_id=task.task_id, url=url, model=model, reason=f.reason)
            return Outcome(
                ok=False,
                output="".join(parts),
                error=f.error,
                reason=f.reason,
                transient=f.transient,
                model_used=model,
            )
        fields = None
        if done_reason == "length":
            # Not a failure (the text is the model's), but cut short: say so where
            # the user looks, on the dashboard and in the result.
            log.warning("ollama_length_limit", task_id=task.task_id, model=model, tokens_out=tokens_out)
            await progress.emit("status", LENGTH_NOTICE, model=model)
            fields = {"done_reason": done_reason}
        return Outcome(
            ok=True,
            output="".join(parts),
            model_used=model,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            fields=fields,
        )

    async def _agentic(self, run: TaskRun, url: str, model: str) -> Outcome:
        """The tool loop (sidecar/agentic) in the task's working directory; a task
        whose directory is only the default one gets a scratch dir of its own instead."""
        workdir = run.workdir
        if not self._ctx.config.repo_dir and workdir == self._ctx.workdir():
            workdir = await trio.to_thread.run_sync(scratch_workdir, self._ctx.state_dir, run.task_id)
        return await run_agentic(
            self._ctx.config,
            self._http,
            run.task,
            run.progress,
            url=url,
            model=model,
            workdir=workdir,
            marker=run.marker,
            deadline=run.deadline,
            http_timeout=self._timeout,
        )

    async def _stream(
        self,
        url: str,
        model: str,
        body: dict[str, Any],
        parts: list[str],
        progress: ProgressSender,
    ) -> tuple[int, int, str | None]:
        """Stream one chat; append content to `parts`; return (tokens_in, tokens_out,
        done_reason).

        `async with client.stream(...)` closes the connection at once when the
        caller's scope is cancelled; Cancelled then propagates untouched.
        """
        where = f"Ollama at {url}"
        try:
            async with self._http.stream(
                "POST", url + "/api/chat", json=body, headers=_HEADERS, timeout=self._timeout
            ) as response:
                if response.status_code != 200:
                    raw = b""
                    async for data in response.aiter_bytes():
                        raw += data
                        if len(raw) >= _ERROR_BODY_CAP:
                            break
                    status = response.status_code
                    # 4xx (e.g. model not found) will fail again; 5xx, 408, 429 may not.
                    transient = status >= 500 or status in (408, 429)
                    raise _Failure(
                        f"ollama_http_{status}",
                        f"{where} answered HTTP {status}: {error_text(raw)}",
                        transient,
                    )
                # Closed explicitly when we stop early (error line, done line,
                # idle time-out): an async generator left to the garbage
                # collector would be finalized outside any trio task.
                source = response.aiter_bytes() if _encoded(response) else response.aiter_raw()
                async with contextlib.aclosing(cast(AsyncGenerator[bytes, None], source)) as chunks:
                    return await self._relay(chunks, model, where, parts, progress)
        except _Failure:
            raise
        except httpx.ConnectTimeout as exc:
            raise _Failure("ollama_unreachable", f"cannot reach {where}: connect timed out", True) from exc
        except httpx.ConnectError as exc:
            raise _Failure("ollama_unreachable", f"cannot reach {where}: {_describe(exc)}", True) from exc
        except httpx.ReadTimeout as exc:  # only the wait for the answer to begin is this long
            raise _Failure(
                "ollama_load_timeout",
                f"{where} did not begin its answer within {self._load_s:g} s "
                "(a model load that slow? raise ollama.load_timeout_s)",
                True,
            ) from exc
        except httpx.TimeoutException as exc:  # write or pool timeout
            raise _Failure("ollama_timeout", f"{where} timed out: {type(exc).__name__}", True) from exc
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:
            raise _Failure(
                "ollama_connection_lost",
                f"connection to {where} lost mid-stream: {_describe(exc)}",
                True,
            ) from exc
        except httpx.HTTPError as exc:  # any other transport or decoding trouble
            raise _Failure("ollama_transport", f"{where}: {_describe(exc)}", True) from exc

    async def _relay(
        self,
        chunks: AsyncIterator[bytes],
        model: str,
        where: str,
        parts: list[str],
        progress: ProgressSender,
    ) -> tuple[int, int, str | None]:
        """Split the NDJSON body ourselves (cheaper than `aiter_lines`) and relay it.

        The per-line fast path is one JSON decode and two lookups; anything
        unusual (error line, bare final line, junk) goes to `_slow_line`.
        """
        decode = _json_decode
        emit = progress.emit
        try_emit = _nowait_emitter(progress, model)
        append = parts.append
        count = 0
        tail = b""
        ended = False
        final: dict[str, Any] | None = None
        # Idle time-out: one scope for the whole stream whose deadline is pushed
        # on as bytes arrive, at most every `slack` seconds (a scope per read, or
        # a deadline update per read, costs more than the parsing). It fires
        # between `idle` and `idle + slack` after the last bytes, never earlier.
        idle = self._idle_s
        slack = min(idle / 32, 0.25)
        now = trio.current_time
        pushed = now()
        with trio.CancelScope(deadline=pushed + idle + slack) as waited:
            while final is None and not ended:
                try:
                    data = await chunks.__anext__()
                except StopAsyncIteration:
                    # A last line without its newline still counts.
                    ended = True
                    lines = [tail] if tail.strip() else []
                else:
                    t = now()
                    if t - pushed > slack:
                        pushed = t
                        waited.deadline = t + idle + slack
                    lines = (tail + data).split(b"\n") if tail else data.split(b"\n")
                    tail = lines.pop()
                for line in lines:
                    try:
                        obj = decode(line.decode())  # str in: skips json.loads' encoding sniffing
                        content = obj["message"]["content"]
                    except (ValueError, KeyError, TypeError):
                        obj, content = _slow_line(line, where)
                        if obj is None:
                            continue
                    if content:
                        if content.__class__ is not str:
                            raise _Failure(
                                "ollama_bad_json", f"non-text content from {where}: {line[:200]!r}", False
                            )
                        append(content)
                        count += 1
                        if not try_emit(content, count):
                            await emit("token", content, tokens_so_far=count, model=model)
                            # Time spent waiting on our own channel is not the server's silence.
                            pushed = now()
                            waited.deadline = pushed + idle + slack
                    if obj.get("done") is True:
                        final = obj
                        break
        if waited.cancelled_caught:
            raise _Failure("ollama_idle_timeout", f"{where} sent nothing for {idle:g} s (idle timeout)", True)
        if final is not None and not ended:
            await _finish_body(chunks)
        if final is None:
            raise _Failure(
                "ollama_truncated",
                f"truncated stream: {where} ended the response after {count} chunks without done:true",
                True,
            )
        done_reason = final.get("done_reason")
        if not isinstance(done_reason, str):
            done_reason = None
        if done_reason in _NOT_A_REPLY and not count:
            raise _Failure(
                "ollama_no_reply",
                f"{where} ended with done_reason {done_reason!r} and no reply "
                "(a model load or unload, not an answer)",
                True,
            )
        return count_of(final.get("prompt_eval_count")), count_of(final.get("eval_count")), done_reason


def _encoded(response: httpx.Response) -> bool:
    """We ask for no compression; raw bytes then skip httpx's decoder layer."""
    return bool(response.headers.get("content-encoding", "identity") != "identity")


async def _finish_body(chunks: AsyncIterator[bytes]) -> None:
    """Read the few bytes after the done line (the chunked terminator), so the
    connection goes back to the pool instead of being closed. A server that
    keeps talking after done gets its connection closed instead."""
    for _ in range(4):
        try:
            await chunks.__anext__()
        except StopAsyncIteration:
            return


def _nowait_emitter(progress: ProgressSender, model: str) -> Callable[[str, int], bool]:
    """A synchronous `token` emit: True if queued, False when the channel is full
    and the caller must `await progress.emit(...)` to wait for room.

    Why: `await emit` is a full Trio checkpoint per chunk, one scheduler pass
    each, which halves relay throughput (bench/ollama_relay.py). Without it the
    task still checkpoints at every socket read (~64 KiB of chunks at most),
    and still waits whenever the channel is full.
    """
    emit_nowait = progress.emit_nowait

    def emit(text: str, count: int) -> bool:
        return emit_nowait("token", text, tokens_so_far=count, model=model)

    return emit


def _slow_line(line: bytes, where: str) -> tuple[dict[str, Any] | None, str]:
    """A line the fast path could not take: blank (skipped), error, bare final, or junk."""
    if not line.strip():
        return None, ""
    shown = line[:200].decode("utf-8", "replace")
    try:
        obj = json.loads(line)
    except ValueError:
        raise _Failure("ollama_bad_json", f"malformed JSON line from {where}: {shown!r}", False) from None
    if not isinstance(obj, dict):
        raise _Failure("ollama_bad_json", f"JSON line from {where} is not an object: {shown!r}", False)
    if "error" in obj:
        raise _Failure("ollama_error", f"{where} reported an error mid-stream: {obj['error']}", True)
    msg = obj.get("message")
    if msg is None and obj.get("done") is True:
        return obj, ""
    if not isinstance(msg, dict) or not isinstance(msg.get("content", ""), str):
        raise _Failure("ollama_bad_json", f"unexpected line from {where}: {shown!r}", False)
    return obj, msg.get("content", "")
