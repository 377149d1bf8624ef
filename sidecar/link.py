"""The hub link: the only code that touches the WebSocket.

It identifies, heartbeats, reconnects with exponential backoff plus jitter,
honours 1008 cooldown closes and auth refusals, tells the rate budget
(`budget.RateBudget`) of every normal-tier frame it writes and of every
`rate_limited` / `rate_limit_warning`, and hands every inbound frame that is
not link business to its handler. Lifecycle frames never depend on a send
succeeding here: their owners (outbox, accept tracker) resend until acked.
"""

from __future__ import annotations

import functools
import math
import os
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio
import trio_websocket
from wsproto.events import TextMessage
from wsproto.utilities import LocalProtocolError

from .budget import RateBudget
from .config import Config
from .frames import HubError, Identified, InboundFrame, Pong, RateLimited, RateLimitWarning, read_frame
from .log import get_logger
from .messages import FrameError, encode_frame, identify_frame
from .quicklock import QuickLock

log = get_logger("sidecar.link")

_COOLDOWN_RE = re.compile(r"retry in (\d+(?:\.\d+)?)\s*s", re.IGNORECASE)

# Frame types the hub files under its *light* and *heavy* buckets; every other
# type (accepts, progress, results, recovery, reports) draws on the normal one.
LIGHT_TIER = frozenset({"ping", "list_agents", "list_channels", "status", "channel_history"})
HEAVY_TIER = frozenset({"identify"})

# Errors that mean "this connection is gone"; trio-websocket#184 can surface
# wsproto's LocalProtocolError instead of ConnectionClosed.
# How long past `connect_timeout_s` an opening may take before we abandon it.
_OPEN_MARGIN_S = 1.0
# How long a graceful stop waits for the session's closing handshake (`aclose`);
# the close itself is bounded by 2 s within it.
_CLOSE_WAIT_S = 3.0

_LINK_ERRORS = (
    trio_websocket.ConnectionClosed,
    trio_websocket.HandshakeError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    LocalProtocolError,
    OSError,
)


def direct_writer(
    ws: trio_websocket.WebSocketConnection,
) -> tuple[trio.SocketStream, trio.StrictFIFOLock | trio.Lock, Any] | None:
    """What `write_message` writes through, if this connection allows it: plain TCP, open, idle.

    (trio-websocket's stream, its stream lock and its wsproto connection: private
    attributes of trio-websocket 0.12; a version without them is written to the
    public way.)
    """
    stream = getattr(ws, "_stream", None)
    lock = getattr(ws, "_stream_lock", None)
    proto = getattr(ws, "_wsproto", None)
    if (
        type(stream) is not trio.SocketStream
        or not isinstance(lock, trio.StrictFIFOLock | trio.Lock)
        or lock.locked()
        or proto is None
        or getattr(ws, "_close_reason", True) is not None
    ):
        return None
    return stream, lock, proto


def write_at_once(ws: trio_websocket.WebSocketConnection, text: str) -> Callable[[], Awaitable[None]] | None:
    """Write the frame of `text` now if it can go at once; else what finishes sending it.

    trio-websocket's send takes its stream lock (a scheduler round), then trio's
    `send_all` (two more checkpoints and its bookkeeping): ~85 us a small frame on
    this project's VMs, against ~20 us for the write(2) itself, twice on every
    task's path (`task_accepted`, `task_complete`). When the connection is plain
    TCP and nothing else is writing to it, the frame is built by the connection's
    own wsproto object (masked, in the order of every other frame) and written
    with one non-blocking write. None: all of it went, and nothing was awaited.

    Otherwise the function returned must be awaited at once: it sends the rest
    with `send_all` while holding trio-websocket's lock, which it took (so that
    no pong goes in the middle of the frame), or, when the direct way is closed
    (TLS, a closing connection, another writer), it is `send_message`. Errors are
    the socket's own (`OSError`) or wsproto's, as from trio-websocket.
    """
    parts = direct_writer(ws)
    if parts is None:
        return functools.partial(ws.send_message, text)
    stream, lock, proto = parts
    data = proto.send(TextMessage(data=text))
    try:
        written = os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        written = 0
    if written == len(data):
        return None
    lock.acquire_nowait()  # free (checked above, nothing awaited since)
    rest = memoryview(data)[written:]

    async def send_rest() -> None:
        try:
            await stream.send_all(rest)
        finally:
            lock.release()

    return send_rest


async def write_message(ws: trio_websocket.WebSocketConnection, text: str) -> None:
    """`ws.send_message(text)`, by `write_at_once`."""
    finish = write_at_once(ws, text)
    if finish is not None:
        await finish()


class AuthRefused(Exception):
    """The hub refused our token (invalid_token / token_agent_mismatch)."""


class LinkHandler(Protocol):
    async def on_identified(self, link: HubLink) -> None:
        """Runs (in the session nursery) after every successful identify."""

    async def on_frame(self, frame: InboundFrame) -> None:
        """Every inbound frame that is not link business (pong, identified, ...)."""

    def on_disconnected(self) -> None:
        """The session ended; owners of unacked frames should plan to resend."""

    def on_bad_frame(self, error: FrameError, raw: str | bytes) -> None:
        """An inbound frame that cannot be used: not JSON, no type, or a bad field."""

    def busy(self) -> bool:
        """True while tasks are held (the half-open remedy reconnects only when idle)."""


class HubLink:
    def __init__(
        self,
        config: Config,
        handler: LinkHandler,
        *,
        budget: RateBudget | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.handler = handler
        # The one owner of "the hub said wait": normal-tier frames go by it.
        self.budget = budget if budget is not None else RateBudget.from_config(config)
        self.rng = rng or random.Random()
        self.connected = False
        self.identified = False
        self.last_pong_at: float | None = None
        self.reconnects = 0
        self.rate_limited_hits = 0
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._send_lock = QuickLock()  # a free lock is taken without a scheduler round
        self._identified_event = trio.Event()
        self._state_changed = trio.Event()
        self._pong = trio.Event()
        self._closing = False
        self._session_scope: trio.CancelScope | None = None
        self._unclean_drop_at: float | None = None
        # The cooldown of a 1008 close that ended the current session, for `run()`.
        self._close_cooldown: float | None = None

    # -- public ------------------------------------------------------------

    def can_send(self) -> bool:
        return self.identified and self._ws is not None

    async def wait_ready(self) -> None:
        """Wait until identified and the budget lets a lifecycle frame go (token, no pause)."""
        while True:
            if not self.identified:
                await self._identified_event.wait()
                continue
            now = trio.current_time()
            delay = self.budget.lifecycle_at(now) - now
            if delay > 0:
                await trio.sleep(delay)
                continue
            return

    async def wait_state_change(self) -> None:
        await self._state_changed.wait()

    async def send(self, frame: dict[str, Any]) -> bool:
        """Send one frame if identified; False if the link is down or the send failed.

        The send is shielded and bounded: a cancelled send could leave half a
        frame on the wire, so on time-out the connection is declared dead.
        """
        ws = self._ws
        kind = frame.get("type")
        if ws is None or (not self.identified and kind != "identify"):
            return False
        text = encode_frame(frame)
        if kind not in LIGHT_TIER and kind not in HEAVY_TIER and kind != "task_progress":
            # Taken before the first checkpoint, so that the caller's check of the
            # budget and this spend are one step (progress: the batcher's own).
            self.budget.spend_lifecycle(trio.current_time())
        finish: Callable[[], Awaitable[None]] | None = None
        if not self._send_lock.locked():
            # Most frames go in one write, with nothing awaited: no scope is needed.
            try:
                finish = write_at_once(ws, text)
            except _LINK_ERRORS as exc:
                return self._send_failed(kind, exc)
            if finish is None:
                return True
        # Entered without a checkpoint when free, so a frame begun above is finished here.
        async with self._send_lock:
            # One scope: shielded from the caller's cancellation, bounded by its own deadline.
            deadline = trio.current_time() + self.config.pong_timeout_s
            with trio.CancelScope(shield=True, deadline=deadline) as timeout:
                try:
                    if finish is None:
                        finish = write_at_once(ws, text)
                    if finish is not None:
                        await finish()
                    return True
                except _LINK_ERRORS as exc:
                    return self._send_failed(kind, exc)
            if timeout.cancelled_caught:
                log.warning("send_stalled", type=kind, timeout_s=self.config.pong_timeout_s)
                self._drop_session()
        return False

    def _send_failed(self, kind: object, exc: BaseException) -> bool:
        log.info("send_failed", type=kind, error=type(exc).__name__)
        self._drop_session()
        return False

    async def send_when_ready(self, frame: dict[str, Any]) -> bool:
        """`send` once the budget has a token for it. It waits: never on the reader's path."""
        await self.wait_ready()
        return await self.send(frame)

    async def send_progress(self, frame: dict[str, Any]) -> bool:
        if self.budget.paused(trio.current_time()):
            return False
        return await self.send(frame)

    def close(self) -> None:
        """Stop reconnecting and end the current session (shutdown)."""
        self._closing = True
        self._drop_session()

    async def aclose(self) -> None:
        """`close()`, then wait (at most `_CLOSE_WAIT_S`) until the session is closed.

        So the hub sees our close frame (1001, going away) at a graceful stop: the
        daemon's nursery is cancelled next, and a session cancelled from outside
        is dropped without one (1006), which reads like a crash.
        """
        self.close()
        with trio.move_on_after(_CLOSE_WAIT_S):
            while self._ws is not None:
                await self._state_changed.wait()

    def force_reconnect(self) -> None:
        self._drop_session()

    # -- main loop ---------------------------------------------------------

    async def run(self) -> None:
        """Connect, identify and serve until `close()`; reconnect with backoff."""
        backoff = self.config.backoff_initial_s
        while not self._closing:
            delay: float | None = None
            try:
                delay = await self._connect_once()
            except* AuthRefused as group:
                delay = self.config.auth_backoff_s
                log.error(
                    "auth_refused",
                    error=str(group.exceptions[0]),
                    retry_in_s=delay,
                    hint="check token and agent_id in the config",
                )
            except* trio.TooSlowError:
                log.warning("identify_timeout", timeout_s=self.config.connect_timeout_s)
            except* _LINK_ERRORS as group:
                exc0 = group.exceptions[0]
                cooldown = _cooldown_of(exc0)
                if cooldown is not None:
                    delay = cooldown
                    log.warning("hub_cooldown", retry_in_s=cooldown)
                else:
                    log.info("link_down", url=self.config.hub_url, error=_describe(exc0))
            finally:
                # Not `self.identified` alone: `_drop_session()` (a failed send,
                # force_reconnect) clears it first, and the owners of unacked
                # frames must hear of every session that ended under them
                # (a close() for shutdown is no news to them).
                was_identified = self.identified or (self._last_session_identified and not self._closing)
                self._ws = None
                self.connected = False
                self.identified = False
                # A fresh event only if the old one fired: waiters parked on an
                # unset one (since an earlier failed attempt) must be woken by the
                # next successful identify, not stranded on a replaced event.
                if self._identified_event.is_set():
                    self._identified_event = trio.Event()
                self._wake()
                if was_identified:
                    self.handler.on_disconnected()
            if self._closing:
                break
            if self._last_session_identified:
                backoff = self.config.backoff_initial_s
            if delay is None:
                # Full jitter over [backoff/2, backoff], then double up to the cap.
                delay = backoff * (0.5 + 0.5 * self.rng.random())
                backoff = min(backoff * 2, self.config.backoff_max_s)
            self.reconnects += 1
            log.info("reconnect_wait", delay_s=round(delay, 3))
            await trio.sleep(delay)

    _last_session_identified = False

    async def _connect_once(self) -> float | None:
        cfg = self.config
        self._last_session_identified = False
        self._close_cooldown = None
        # Our own bound on the opening: trio-websocket's `connect_timeout` raises
        # but leaves its reader task waiting on a peer that accepted the TCP
        # connection and never answers the upgrade, so `open_websocket_url`
        # would never return. Lifted as soon as the socket is open.
        opening = trio.CancelScope(deadline=trio.current_time() + cfg.connect_timeout_s + _OPEN_MARGIN_S)
        with opening:
            return await self._session(opening)
        log.warning(
            "connect_timeout",
            timeout_s=cfg.connect_timeout_s,
            detail="the hub accepted the connection but never completed the WebSocket handshake",
        )
        return None

    async def _session(self, opening: trio.CancelScope) -> float | None:
        cfg = self.config
        async with trio_websocket.open_websocket_url(
            cfg.hub_url,
            connect_timeout=cfg.connect_timeout_s,
            disconnect_timeout=2,
            max_message_size=cfg.max_frame_bytes,
            message_queue_size=64,
            receive_buffer_size=65536,
        ) as ws:
            opening.deadline = math.inf
            self._ws = ws
            self.connected = True
            log.info("connected", url=cfg.hub_url)
            delay = await self._handshake(ws)
            if delay is not None:
                return delay
            self._last_session_identified = True
            with trio.CancelScope() as scope:
                self._session_scope = scope
                if self._closing:
                    scope.cancel()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, ws, scope)
                    nursery.start_soon(self._heartbeat, scope)
                    nursery.start_soon(self.handler.on_identified, self)
                    if self._unclean_drop_at is not None:
                        nursery.start_soon(self._half_open_remedy, self._unclean_drop_at)
                        self._unclean_drop_at = None
            self._session_scope = None
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await ws.aclose(*((1001, "sidecar stopping") if self._closing else (1000, None)))
                except _LINK_ERRORS:
                    pass
        # A cooldown close of the identified session: the next attempt waits it
        # out, as one during the handshake does (the delay `run()` sleeps).
        return self._close_cooldown

    async def _handshake(self, ws: trio_websocket.WebSocketConnection) -> float | None:
        cfg = self.config
        frame = identify_frame(cfg.agent_id, cfg.token, cfg.display_name, cfg.capabilities, cfg.ollama_url)
        await ws.send_message(encode_frame(frame))
        with trio.fail_after(cfg.connect_timeout_s):
            while True:
                match await self._next_frame(ws):
                    case Identified():
                        self.identified = True
                        self.last_pong_at = trio.current_time()
                        self._identified_event.set()
                        self._wake()
                        log.info("identified", agent_id=cfg.agent_id)
                        return None
                    case HubError(error=("invalid_token" | "token_agent_mismatch") as error):
                        raise AuthRefused(error)
                    case RateLimited() as limited:
                        # The heavy bucket (identify): a reconnect delay, not a pause of ours.
                        asked = _retry_after_s(limited)
                        retry = 1.0 if asked is None else min(asked, self.budget.max_pause_s)
                        log.warning("identify_rate_limited", retry_in_s=retry)
                        return retry
                    case HubError(error=error):
                        log.warning("identify_error", error=error[:200])
                        return None
                    case _:
                        pass  # anything else before `identified` (chat traffic) is ignored

    async def _next_frame(self, ws: trio_websocket.WebSocketConnection) -> InboundFrame:
        """The next usable inbound frame, typed; anything else goes to on_bad_frame."""
        while True:
            raw = await ws.get_message()
            try:
                return read_frame(raw)
            except FrameError as exc:
                self.handler.on_bad_frame(exc, raw)

    async def _reader(self, ws: trio_websocket.WebSocketConnection, scope: trio.CancelScope) -> None:
        try:
            while True:
                await self._dispatch(await self._next_frame(ws))
        except _LINK_ERRORS as exc:
            log.info("link_closed", error=_describe(exc))
            cooldown = _cooldown_of(exc)
            if cooldown is not None:
                self._close_cooldown = cooldown
                log.warning("hub_cooldown", retry_in_s=cooldown)
        scope.cancel()

    async def _dispatch(self, frame: InboundFrame) -> None:
        match frame:
            case Pong():
                self.last_pong_at = trio.current_time()
                self._pong.set()
                return
            case RateLimited(tier=tier):
                self.rate_limited_hits += 1
                if tier not in ("light", "heavy"):
                    asked = _retry_after_s(frame)
                    pause = self.budget.on_rate_limited(trio.current_time(), asked)
                    log.warning("rate_limited", tier=tier, retry_after_s=pause, asked_s=asked)
                self._wake()
            case RateLimitWarning(tier=tier, remaining=remaining) if tier not in ("light", "heavy"):
                now = trio.current_time()
                count = int(remaining) if remaining is not None else None
                if self.budget.on_warning(now, count):
                    log.info("rate_budget_corrected", remaining=count, factor=self.budget.factor(now))
        await self.handler.on_frame(frame)

    async def _heartbeat(self, scope: trio.CancelScope) -> None:
        cfg = self.config
        while True:
            await trio.sleep(cfg.ping_interval_s)
            self._pong = trio.Event()
            sent_at = trio.current_time()
            if not await self.send({"type": "ping"}):
                break
            with trio.move_on_after(cfg.pong_timeout_s):
                await self._pong.wait()
            if not self._pong.is_set():
                log.warning("pong_timeout", waited_s=round(trio.current_time() - sent_at, 3))
                self._unclean_drop_at = trio.current_time()
                break
        scope.cancel()

    async def _half_open_remedy(self, dropped_at: float) -> None:
        """Reconnect cleanly once the hub's half-open socket must be gone.

        Known hub bug (protocol.md): after an unclean drop, the hub may keep the
        old socket and never register the new one. It closes idle sockets at
        60 s, so a clean reconnect after that registers us for sure. Done only
        while idle, so no running task is reclaimed by it.
        """
        await trio.sleep_until(dropped_at + 65)
        if self.handler.busy():
            log.info("half_open_remedy_skipped", reason="tasks running")
            return
        log.info("half_open_remedy", detail="clean reconnect after an unclean drop")
        self._drop_session()

    def _drop_session(self) -> None:
        self.identified = False
        if self._identified_event.is_set():  # else wait_ready would spin until run() notices
            self._identified_event = trio.Event()
        if self._session_scope is not None:
            self._session_scope.cancel()

    def _wake(self) -> None:
        self._state_changed.set()
        self._state_changed = trio.Event()


def _retry_after_s(frame: RateLimited) -> float | None:
    """`retry_after_ms` in seconds, or None when absent or negative.

    Not capped here: the budget caps every pause (`RateBudget.max_pause_s`).
    The frame's numbers are finite (`read_frame` refuses the others).
    """
    value = frame.retry_after_ms
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return float(value) / 1000.0


def _cooldown_of(exc: BaseException) -> float | None:
    reason = getattr(exc, "reason", None)
    code = getattr(reason, "code", None)
    text = getattr(reason, "reason", None) or ""
    if code == 1008 and isinstance(text, str):
        m = _COOLDOWN_RE.search(text)
        if m:
            return float(m.group(1)) + 0.5
    return None


def _describe(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    if reason is not None and hasattr(reason, "code"):
        return f"closed code={reason.code} reason={getattr(reason, 'reason', '')!r}"
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    if not text and cause is not None:
        # trio-websocket's HandshakeError says nothing itself: the cause is the news
        # ("all attempts to connect to 127.0.0.1:9 failed", a refused upgrade).
        text = f"{type(cause).__name__}: {cause}"
    return f"{type(exc).__name__}: {text}"[:300]
