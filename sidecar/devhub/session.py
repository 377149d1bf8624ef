"""One WebSocket connection to the dev hub, served through raw ASGI.

Each session has a reader (frames in, with the hub's idle timeout) and a writer
(one outbox, so replies and pushes keep their order and the hub's synchronous
logic never blocks on a socket). A session can be stalled (it stops reading and
writing, like a hung hub process) and dropped (its TCP connection is shut down
under hypercorn's feet, so the peer sees the connection end without a close
frame, like a network failure).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import attrs
import psutil
import trio

from ..asgi import ASGIReceive, ASGISend
from ..log import get_logger
from ..messages import wire_json

log = get_logger(__name__)


@attrs.frozen
class _Out:
    data: str | bytes | None  # None: close the socket
    code: int = 1000
    reason: str = ""
    done: trio.Event | None = None


@attrs.define(eq=False)
class Session:
    """State of one connection; the hub's logic reads and writes it synchronously."""

    id: int
    client: tuple[str, int] | None
    server: tuple[str, int] | None
    opened_at: float
    agent_id: str | None = None
    identified: bool = False
    capabilities: list[str] = attrs.field(factory=list)
    # The hub's per-connection validation window (ViolationTracker).
    violation_count: int = 0
    violation_window_start: float | None = None
    closing: bool = False
    ended: bool = False
    close_code: int | None = None
    stalled: bool = False
    _unstalled: trio.Event = attrs.field(factory=trio.Event)
    _read_scope: trio.CancelScope | None = None
    _scope: trio.CancelScope | None = None
    _out_send: trio.MemorySendChannel[_Out] | None = None
    _out_recv: trio.MemoryReceiveChannel[_Out] | None = None
    # The server knows the websocket is closed: we sent websocket.close, or it sent disconnect.
    _asgi_closed: bool = False

    def __attrs_post_init__(self) -> None:
        self._out_send, self._out_recv = trio.open_memory_channel[_Out](math.inf)
        self._unstalled.set()

    # -- called by the hub (synchronous) --------------------------------------

    def push(self, frame: dict[str, Any]) -> None:
        """Queue one frame (encoded as the hub does: plain JSON, a lone surrogate escaped)."""
        self.push_raw(wire_json(frame))

    def push_raw(self, data: str | bytes, done: trio.Event | None = None) -> None:
        if self.closing or self._out_send is None:
            if done is not None:
                done.set()
            return
        self._out_send.send_nowait(_Out(data, done=done))

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame after every queued frame; stop reading now."""
        if self.closing:
            return
        assert self._out_send is not None
        self._out_send.send_nowait(_Out(None, code, reason))
        self.closing = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    def set_stalled(self, on: bool) -> None:
        if on and not self.stalled:
            self.stalled = True
            self._unstalled = trio.Event()
            if self._read_scope is not None:
                self._read_scope.cancel()
        elif not on and self.stalled:
            self.stalled = False
            self._unstalled.set()

    def abort(self) -> None:
        """Drop the connection: shut its TCP socket down, no close frame."""
        _shutdown_tcp(self.server, self.client)
        self.closing = True
        if self._scope is not None:
            self._scope.cancel()

    # -- the connection's tasks -------------------------------------------------

    async def run(
        self,
        receive: ASGIReceive,
        send: ASGISend,
        on_data: Callable[[Session, str | bytes], None],
        on_sent: Callable[[Session, str | bytes], None],
        idle_timeout: float,
    ) -> None:
        """Serve until the peer goes, the hub closes the socket, or it is dropped.

        The app never returns with the websocket still open: hypercorn (0.18) would
        then send a close frame of its own from the app's task, and if its reader is
        closing the connection at that moment (the peer's close frame, a drop), its
        `send_eof` holds the socket and that write raises BusyResourceError, which
        nothing catches: the whole hub ends. So a session that did not close in ASGI
        terms sends `websocket.close` itself (hypercorn marks the socket closed
        before writing; a drop's socket is already shut down, so nothing reaches the
        peer), and a write that collides so ends the session quietly.

        Every such write reads the app's messages meanwhile (`_send_draining`): on a
        dropped socket the write fails, and hypercorn's handler then queues
        `websocket.disconnect` to this app from this very task; with its app queue
        full (10 frames the hub has not read) that would block for ever.
        """
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, send, on_sent, scope)
                    await self._reader(receive, on_data, idle_timeout)
                    if not self.closing:
                        scope.cancel()
                    # else the writer sends the close frame, then cancels the scope
        finally:
            self._release_unwritten()
            if not self._asgi_closed:
                self._asgi_closed = True
                await _send_draining(receive, send, {"type": "websocket.close", "code": 1011})

    def _release_unwritten(self) -> None:
        """The socket is gone: frames still queued will never be written.

        Wake whoever waits for them (`DevHub.send_raw`), or they would wait for ever
        (the writer does the same for the one frame it holds).
        """
        self.closing = True
        assert self._out_recv is not None
        while True:
            try:
                out = self._out_recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            if out.done is not None:
                out.done.set()

    async def _reader(
        self, receive: ASGIReceive, on_data: Callable[[Session, str | bytes], None], idle_timeout: float
    ) -> None:
        while not self.closing:
            await self._unstalled.wait()
            with trio.CancelScope(deadline=trio.current_time() + idle_timeout) as read_scope:
                self._read_scope = read_scope
                message = await receive()
            self._read_scope = None
            if read_scope.cancelled_caught:
                if not self.closing and not self.stalled:
                    log.info("devhub_idle_close", session=self.id, agent_id=self.agent_id)
                    self.close(1001, "idle timeout")
                continue
            if message["type"] == "websocket.disconnect":
                self.close_code = message.get("code")
                self._asgi_closed = True
                return
            if message["type"] == "websocket.receive":
                text = message.get("text")
                on_data(self, text if text is not None else bytes(message.get("bytes") or b""))
        # Closing: the writer still writes (queued frames, then the close frame), and a
        # write that fails makes hypercorn queue `websocket.disconnect` from the
        # writer's task (see `_send_draining`). Keep reading, dropping the frames, so
        # that queue never stays full; the writer cancels this once the close is sent.
        while (await receive())["type"] != "websocket.disconnect":
            pass
        self._asgi_closed = True

    async def _writer(
        self, send: ASGISend, on_sent: Callable[[Session, str | bytes], None], scope: trio.CancelScope
    ) -> None:
        assert self._out_recv is not None
        async for out in self._out_recv:
            try:
                await self._unstalled.wait()
                if out.data is None:
                    self._asgi_closed = True
                    with contextlib.suppress(trio.BusyResourceError):
                        await send({"type": "websocket.close", "code": out.code, "reason": out.reason})
                    self.close_code = out.code
                    scope.cancel()
                    return
                try:
                    if isinstance(out.data, bytes):
                        await send({"type": "websocket.send", "bytes": out.data})
                    else:
                        await send({"type": "websocket.send", "text": out.data})
                except trio.BusyResourceError:
                    # hypercorn is closing the connection under us (see `run`).
                    scope.cancel()
                    return
                on_sent(self, out.data)
            finally:
                # Written, or never to be (the session ended while it waited).
                if out.done is not None:
                    out.done.set()


async def _send_draining(receive: ASGIReceive, send: ASGISend, message: dict[str, Any]) -> None:
    """`send(message)`, reading and dropping what the server delivers meanwhile.

    hypercorn 0.18 writes from the app's own task; when the write fails (the socket
    was shut down, or the peer is gone) it closes the stream and puts
    `websocket.disconnect` on the app's queue (`max_app_queue_size`, 10) from that
    same task. If the hub has left 10 frames unread (the reader has stopped: a drop,
    a close, a lagging or stalled session), that put waits for a reader that is the
    task itself, and the app never returns: `DevHub.drop` timed out (chaos CI).
    A collision with hypercorn's own `send_eof` ends the write quietly (see `run`).
    """
    async with trio.open_nursery() as nursery:

        async def drain() -> None:
            while True:
                await receive()

        nursery.start_soon(drain)
        try:
            with contextlib.suppress(trio.BusyResourceError):
                await send(message)
        finally:
            nursery.cancel_scope.cancel()


def _shutdown_tcp(server: tuple[str, int] | None, client: tuple[str, int] | None) -> None:
    """Shut down the server side of the TCP connection server↔client.

    Hypercorn does not hand the transport to the app, so find the socket by its
    addresses among this process's descriptors. `shutdown` acts on the socket
    itself, not on the duplicated descriptor, so the peer sees the connection
    end at once and hypercorn's own reads hit EOF.
    """
    if server is None or client is None:
        return
    for conn in psutil.Process().net_connections(kind="tcp"):
        if conn.fd < 0 or not conn.laddr or not conn.raddr:
            continue
        if (conn.laddr.ip, conn.laddr.port) == tuple(server) and (conn.raddr.ip, conn.raddr.port) == tuple(
            client
        ):
            try:
                sock = socket.socket(fileno=os.dup(conn.fd))
            except OSError:
                return  # closed since the listing (or its number reused by a file)
            try:
                # The number may have been reused since the listing: only that connection.
                if sock.getsockname()[:2] == tuple(server) and sock.getpeername()[:2] == tuple(client):
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.close()
            return
