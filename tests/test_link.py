"""The hub link and delivery under a virtual clock: auth back-off, reconnect backoff
with jitter, 1008 cooldowns, pong time-outs, rate limits and result resends.

The dev hub and the sidecar run in one Trio run on real loopback sockets with a
MockClock that jumps only after 10 ms of real idleness, so socket I/O is never
mistaken for idleness while minutes of backoff pass in milliseconds.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

import trio
import trio.testing
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from sidecar.app import open_sidecar
from sidecar.config import Config
from sidecar.devhub import DevHub, RateLimits, TierLimit, open_dev_hub
from sidecar.frames import RateLimited
from sidecar.link import direct_writer, write_message
from tests.conftest import Logs
from tests.harness import running_link

AGENT, TOKEN = "agent-1", "link-test-token-9"


def identify_times(hub: DevHub) -> list[float]:
    return [f.at for f in hub.frames(AGENT, type="identify")]


async def test_wrong_token_is_logged_clearly_and_retried_slowly(
    clock: trio.testing.MockClock, make_config: Any, logs: Logs
) -> None:
    async with open_dev_hub(tokens={AGENT: "the-right-one"}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, auth_backoff_s=300.0)
        async with running_link(cfg):
            await hub.wait_until(lambda: len(identify_times(hub)) >= 3, timeout=2000)
        times = identify_times(hub)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= 300 for gap in gaps), gaps
    refusals = logs.named("auth_refused")
    assert refusals and refusals[0]["error"] == "invalid_token"
    assert "token" in refusals[0]["hint"]
    assert TOKEN not in logs.text


async def test_reconnect_backoff_doubles_with_jitter_to_cap(
    clock: trio.testing.MockClock, make_config: Any, logs: Logs
) -> None:
    # A port with nothing listening: every connect fails at once.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = make_config(hub_url=f"ws://127.0.0.1:{port}/ws", backoff_initial_s=1.0, backoff_max_s=16.0)
    async with running_link(cfg):
        await trio.sleep(200)
    delays = [e["delay_s"] for e in logs.named("reconnect_wait")]
    assert len(delays) >= 8
    for i, delay in enumerate(delays[:8]):
        base = min(1.0 * 2**i, 16.0)
        assert base / 2 <= delay <= base, (i, delay)
    assert len(set(delays[4:8])) > 1  # jitter: capped delays still differ
    # Each failure says why and where, not only "HandshakeError: " (its text is empty).
    down = logs.named("link_down")[0]
    assert down["url"] == cfg.hub_url and f"connect to 127.0.0.1:{port} failed" in down["error"]


async def test_cooldown_close_is_honoured(clock: trio.testing.MockClock, make_config: Any) -> None:
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        hub.state.cooldowns.record_disconnect(AGENT, trio.current_time())  # as after 10 validation failures
        start = trio.current_time()
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, backoff_initial_s=0.1)
        async with running_link(cfg) as (_link, rec):
            await rec.wait(lambda: rec.identified)
            identified_at = trio.current_time()
        refused = [f for f in hub.frames(AGENT, type="identify") if f.verdict == "cooldown"]
    assert len(refused) == 1  # no tight loop against the cooldown
    assert identified_at - start >= 30
    assert rec.identified == 1


async def test_cooldown_close_of_an_identified_session_delays_the_reconnect(
    clock: trio.testing.MockClock, make_config: Any, logs: Logs
) -> None:
    """A 1008 cooldown close that ends an identified session (not the handshake)
    is honoured too: the link waits the N seconds of "retry in Ns" before its
    next attempt instead of its normal backoff (it came back after 0.6 s)."""
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, backoff_initial_s=0.1)
        async with running_link(cfg) as (_link, rec):
            await rec.wait(lambda: rec.identified == 1)
            # As after 10 validation failures: the hub puts the agent in cooldown and
            # closes its session with the protocol's wording.
            hub.state.cooldowns.record_disconnect(AGENT, hub.now())
            remaining = hub.state.cooldowns.remaining_s(AGENT, hub.now())
            closed_at = trio.current_time()
            await hub.disconnect(AGENT, 1008, f"cooldown active: retry in {remaining}s")
            with trio.fail_after(120):
                await rec.wait(lambda: rec.identified == 2)
        identifies = hub.frames(AGENT, type="identify")
    assert remaining is not None
    assert [f.verdict for f in identifies] == ["ok", "ok"]  # no attempt knocked on the cooldown
    assert identifies[1].at - closed_at >= remaining
    assert logs.named("hub_cooldown")[0]["retry_in_s"] == remaining + 0.5
    assert logs.named("reconnect_wait")[-1]["delay_s"] == remaining + 0.5
    assert rec.disconnects == 1


async def test_pong_timeout_declares_link_dead_and_reconnects(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, ping_interval_s=30.0, pong_timeout_s=10.0)
        async with running_link(cfg) as (_link, rec):
            await rec.wait(lambda: rec.identified == 1)
            hub.stall(AGENT)
            stalled_at = trio.current_time()
            with trio.fail_after(300):
                await rec.wait(lambda: rec.identified == 2)
            reconnected_at = trio.current_time()
    assert rec.disconnects == 1
    # The last ping before the stall may be up to 30 s old: dead within 30 + 10 s.
    assert 10 <= reconnected_at - stalled_at <= 30 + 10 + 5


async def test_rate_limited_pauses_normal_frames(clock: trio.testing.MockClock, make_config: Any) -> None:
    limits = RateLimits(normal=TierLimit(2, 6))  # 2 frames, then one every 10 s
    async with open_dev_hub(tokens={AGENT: TOKEN}, limits=limits) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN)
        async with running_link(cfg) as (link, rec):
            await rec.wait(lambda: rec.identified == 1)
            for _ in range(3):
                assert await link.send({"type": "task_progress", "task_id": "t"})
            limited = await rec.wait(
                lambda: next((f for f in rec.frames if isinstance(f, RateLimited)), None)
            )
            assert link.budget.paused(trio.current_time())
            before = trio.current_time()
            await link.wait_ready()
            assert trio.current_time() - before >= (limited.retry_after_ms or 0) / 1000 - 0.01


async def test_result_dropped_by_rate_limit_is_resent_until_acked(
    clock: trio.testing.MockClock, make_config: Any, tmp_path: Path
) -> None:
    # A tight bucket: accept + some progress exhaust it, so the result is dropped once.
    limits = RateLimits(normal=TierLimit(3, 6))
    async with open_dev_hub(tokens={AGENT: TOKEN}, limits=limits) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, progress_budget_per_min=4)
        async with open_sidecar(cfg):
            tid = hub.submit(
                metadata={"shell_command": "for i in 1 2 3 4 5 6; do echo $i; done"},
                routing_decision={"target_type": "sidecar"},
            )
            rec = await hub.wait_until(
                lambda: hub.task(tid) if hub.task(tid).status == "completed" else None, 600
            )
    completes = hub.frames(AGENT, type="task_complete")
    assert rec.ack_statuses[-1] == "complete"
    assert completes[-1].verdict == "ok"
    # Every dropped result was sent again; nothing other than rate limits was refused.
    assert all(v.kind == "rate_limited" for v in hub.violations)


async def test_half_open_hub_bug_remedied_by_a_clean_reconnect(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    """protocol.md's known hub bug: after an unclean drop, the reconnected socket is
    identified but never registered while the hub still holds the old one. The
    old one dies at the hub's 60 s idle limit; a clean reconnect after that heals it."""
    async with open_dev_hub(tokens={AGENT: TOKEN}, registry_bug=True) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN)
        async with open_sidecar(cfg):
            # Fully up (it reports 5 s after identify), then the hub hangs.
            await hub.wait_until(lambda: hub.frames(AGENT, type="resource_report"), timeout=60)
            hub.stall(AGENT)  # the hub keeps the socket but answers nothing: pong time-out
            stalled_at = trio.current_time()
            await hub.wait_until(lambda: len(hub.frames(AGENT, type="identify")) >= 2, timeout=120)
            # The hub notices the old socket is gone only later (the dev hub's stall
            # also stops its idle clock): resume it so it sees the close.
            hub.stall(AGENT, False)
            tid = hub.submit(
                metadata={"shell_command": "echo healed"}, routing_decision={"target_type": "sidecar"}
            )
            rec = await hub.wait_until(
                lambda: hub.task(tid) if hub.task(tid).status == "completed" else None, timeout=600
            )
    assert rec.result is not None and "healed" in rec.result["output"]
    identifies = [f.at for f in hub.frames(AGENT, type="identify")]
    assert len(identifies) >= 3  # the first, the one after the pong time-out, the clean one
    assert identifies[2] - stalled_at >= 60


async def test_waiter_from_before_failed_reconnects_wakes_on_identify(
    clock: trio.testing.MockClock, make_config: Any
) -> None:
    """Regression (chaos seed 63323872): every failed connect attempt replaced the
    `identified` event, so a result waiting since the first attempt was never woken
    by the later successful identify; the outbox stalled and the hub reclaimed."""
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cfg = make_config(
        hub_url=f"ws://127.0.0.1:{port}/ws", token=TOKEN, backoff_initial_s=0.5, backoff_max_s=1.0
    )
    ready = trio.Event()
    async with running_link(cfg) as (link, _rec):

        async def waiter() -> None:
            await link.wait_ready()
            ready.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(5)  # several failed attempts while the waiter waits
            assert not ready.is_set()
            async with open_dev_hub(tokens={AGENT: TOKEN}, port=port):
                with trio.fail_after(30):
                    await ready.wait()


async def test_hub_that_accepts_tcp_but_never_answers_the_upgrade_is_retried(
    clock: trio.testing.MockClock, make_config: Any, logs: Logs
) -> None:
    """Regression (found by the chaos soak: an agent went silent for 27 s until
    SIGTERM). trio-websocket 0.12's `connect_timeout` raises, but its reader
    task stays in the connection's nursery, so `open_websocket_url` never
    returns against a peer that accepted the TCP connection and then says
    nothing (a hub restarting behind its listening socket, a proxy whose
    backend is down). The link must give up on that attempt and try again."""
    accepted: list[trio.SocketStream] = []
    changed = trio.Event()

    async def mute(stream: trio.SocketStream) -> None:
        nonlocal changed
        accepted.append(stream)
        changed.set()
        changed = trio.Event()
        await trio.sleep_forever()  # read nothing, answer nothing

    async with trio.open_nursery() as servers:
        listeners = await servers.start(trio.serve_tcp, mute, 0)
        port = listeners[0].socket.getsockname()[1]
        cfg = make_config(hub_url=f"ws://127.0.0.1:{port}/ws", connect_timeout_s=5.0, backoff_initial_s=1.0)
        async with running_link(cfg):
            start = trio.current_time()
            with trio.fail_after(120):
                while len(accepted) < 3:
                    await changed.wait()
            took = trio.current_time() - start
        servers.cancel_scope.cancel()
    # Each attempt ends about connect_timeout_s (plus a margin) after it began.
    assert took < 3 * (5.0 + 2.0 + 2.0), took
    assert len(logs.named("connect_timeout")) >= 2


async def test_a_session_ended_by_our_side_reports_the_disconnect(make_config: Any) -> None:
    """Every session that ends under the owners of unacknowledged frames is reported
    to them, also one ended by our own side (a failed or stalled send,
    `force_reconnect`, the half-open remedy): the outbox resends at once instead
    of waiting out its answer time-out."""
    async with open_dev_hub(tokens={"agent-1": "secret-token-123"}) as hub:
        cfg: Config = make_config(hub_url=hub.ws_url, backoff_initial_s=0.01, backoff_max_s=0.05)
        async with running_link(cfg) as (link, rec):
            with trio.fail_after(10):
                await rec.wait(lambda: rec.identified >= 1)
                link.force_reconnect()
                await rec.wait(lambda: rec.identified >= 2)
            assert rec.disconnects == 1


async def test_a_huge_retry_after_pauses_at_most_30_s(make_config: Any) -> None:
    """A `rate_limited` asking for an absurd pause (1e308 ms) pauses lifecycle
    frames for at most 30 s, well inside the hub's 60 s acceptance clock."""
    async with open_dev_hub(tokens={"agent-1": "secret-token-123"}) as hub:
        cfg: Config = make_config(hub_url=hub.ws_url, backoff_initial_s=0.01)
        async with running_link(cfg) as (link, rec):
            with trio.fail_after(10):
                await rec.wait(lambda: rec.identified >= 1)
                await hub.send_frame("agent-1", {"type": "rate_limited", "retry_after_ms": 1e308})
                # The link sets its pause, then hands the frame on.
                await rec.wait(lambda: any(isinstance(f, RateLimited) for f in rec.frames))
            assert link.rate_limited_hits == 1
            assert link.budget.paused_until - trio.current_time() <= 30.0


async def test_a_send_to_a_hub_that_stopped_reading_gives_up_at_its_own_deadline(
    clock: trio.testing.MockClock, make_config: Any, logs: Logs
) -> None:
    """A send that cannot finish (the hub stopped reading, the socket buffers are
    full) is shielded from its caller's cancellation, so that no half frame is left
    on the wire, and bounded by its own deadline: after `pong_timeout_s` it is
    given up, the session is declared dead and the link reconnects."""
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, ping_interval_s=10_000.0, pong_timeout_s=10.0)
        async with running_link(cfg) as (link, rec):
            await rec.wait(lambda: rec.identified == 1)
            hub.stall(AGENT)
            big = {"type": "task_progress", "task_id": "t-1", "text": "x" * 1_000_000}
            t0 = trio.current_time()
            sent = 0
            with trio.move_on_after(1):  # the caller gives up after 1 s; the send does not
                while await link.send(big):
                    sent += 1
                    t0 = trio.current_time()
            stalled_for = trio.current_time() - t0
            assert sent < 100  # the buffers filled up
            assert logs.named("send_stalled")
            assert 10 <= stalled_for < 11
            hub.stall(AGENT, on=False)
            with trio.fail_after(60):
                await rec.wait(lambda: rec.identified == 2)


async def _collecting_server(
    nursery: trio.Nursery, received: list[str], reading: trio.Event, until: int = 0
) -> tuple[int, trio.Event]:
    """A WebSocket server on wsproto over a plain trio stream, which does not read
    its socket at all (so a client's writes fill the buffers) until `reading` is
    set, then keeps each message it gets. The event it returns is set when it
    has `until` of them."""
    got_all = trio.Event()

    async def serve(stream: trio.SocketStream) -> None:
        conn = WSConnection(ConnectionType.SERVER)
        opened = False
        while not opened:
            conn.receive_data(await stream.receive_some(65536))
            for event in conn.events():
                if isinstance(event, Request):
                    await stream.send_all(conn.send(AcceptConnection()))
                    opened = True
        await reading.wait()
        parts: list[str] = []
        while data := await stream.receive_some(2**20):
            conn.receive_data(data)
            for event in conn.events():
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        received.append("".join(parts))
                        parts.clear()
                        if len(received) >= until:
                            got_all.set()
                elif isinstance(event, CloseConnection):
                    await stream.send_all(conn.send(event.response()))
                    return

    listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port, got_all


async def test_frames_written_directly_arrive_whole_and_in_order() -> None:
    """The direct write is what a plain TCP connection gets, and a frame too big for
    the socket's buffers (the hub not reading yet) is finished by `send_all` with
    nothing lost, torn or reordered among the small frames around it."""
    received: list[str] = []
    reading = trio.Event()
    texts = ["a", "b" * 32_000_000, "c", "d" * 70_000, "é"]
    async with trio.open_nursery() as nursery:
        port, got_all = await _collecting_server(nursery, received, reading, until=len(texts))
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            assert direct_writer(ws) is not None  # trio-websocket still has what it needs
            public: list[str | bytes] = []
            real_send = ws.send_message

            async def counted(message: str | bytes) -> None:
                public.append(message)
                await real_send(message)

            ws.send_message = counted  # type: ignore[method-assign]
            async with trio.open_nursery() as writers:
                written = []

                async def write_all() -> None:
                    for text in texts:
                        await write_message(ws, text)
                        written.append(text)

                writers.start_soon(write_all)
                await trio.testing.wait_all_tasks_blocked()
                # The first frame went at once; the big one waits in `send_all` for the reader.
                assert written == ["a"] and received == []
                reading.set()
            with trio.fail_after(10):
                await got_all.wait()
            assert public == []  # every frame went the direct way
        nursery.cancel_scope.cancel()
    assert received == texts


async def test_a_direct_write_waits_for_a_write_under_way() -> None:
    """While trio-websocket is writing (its lock held: a pong, a close, a frame from
    another task), a frame is not written beside it: it takes the public path and
    goes after it."""
    received: list[str] = []
    reading = trio.Event()
    reading.set()
    async with trio.open_nursery() as nursery:
        port, got_all = await _collecting_server(nursery, received, reading, until=1)
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            lock = ws._stream_lock
            await lock.acquire()
            assert direct_writer(ws) is None
            done = trio.Event()

            async def write_one() -> None:
                await write_message(ws, "after")
                done.set()

            nursery.start_soon(write_one)
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # waiting for the lock, not written beside it
            lock.release()
            with trio.fail_after(10):
                await done.wait()
                await got_all.wait()
        nursery.cancel_scope.cancel()
    assert received == ["after"]


async def test_a_direct_write_to_a_closed_connection_raises_a_link_error() -> None:
    received: list[str] = []
    reading = trio.Event()
    reading.set()
    async with trio.open_nursery() as nursery:
        port, _ = await _collecting_server(nursery, received, reading)
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/") as ws:
            await ws.aclose()
            assert direct_writer(ws) is None
            try:
                await write_message(ws, "late")
            except trio_websocket.ConnectionClosed:
                pass
            else:
                raise AssertionError("a write to a closed connection went through")
        nursery.cancel_scope.cancel()
    assert received == []


async def test_a_frame_on_an_idle_link_goes_without_a_scheduler_round(make_config: Any) -> None:
    """`HubLink.send` of a frame the socket takes at once awaits nothing: no other
    task runs in between (the cost this path saves), and the hub gets the frame."""
    async with open_dev_hub(tokens={AGENT: TOKEN}) as hub:
        cfg = make_config(hub_url=hub.ws_url, token=TOKEN, ping_interval_s=10_000.0)
        async with running_link(cfg) as (link, rec):
            await rec.wait(lambda: rec.identified == 1)
            ran: list[str] = []

            async def bystander() -> None:
                ran.append("ran")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(bystander)
                assert await link.send({"type": "task_accepted", "task_id": "t-direct"})
                assert ran == []  # the send yielded to no one
            assert ran == ["ran"]
            await hub.wait_until(lambda: bool(hub.frames(AGENT, type="task_accepted")), timeout=10)
        [got] = hub.frames(AGENT, type="task_accepted")
    assert got.frame is not None and got.frame["task_id"] == "t-direct"
