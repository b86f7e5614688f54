"""Asterisk chan_websocket (INCOMING) simulator: the server the daemon dials, for tests, demo and bench.

One AsteriskSimulator serves ``/media/<connection_id>`` as Asterisk's HTTP server does and runs each
accepted connection as a leg: MEDIA_START, a 50 Hz playout clock on Trio's clock (so the autojump clock
drives it), a bridge join some time after the connection, caller audio after the join if the bridge
sends any (``SimConfig.softmix()``; voipbin's snoop bridge, the default, sends none), commands, and
hang-up on close. The queue and playout logic is the sans-IO Playout in ``asterisk_playout``; this
module is the Trio shell around it.

Use it over real TCP with ``serve_asterisk_simulator`` (``nursery.start`` reports the bound port), or
in memory with ``memory_dialer``, which has the shape of ``trio_websocket.open_websocket_url``.

A little over the ~400-line guide: the two transports (TCP and in-memory) share one leg's lifecycle
here, and the parts that are not Trio plumbing already live in ``asterisk_call`` and ``asterisk_playout``.
"""

from __future__ import annotations

import itertools
import math
import random
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import NoReturn, cast

import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionTimeout,
    DisconnectionTimeout,
    WebSocketConnection,
    WebSocketRequest,
    wrap_client_stream,
    wrap_server_stream,
)

from tts_streamer.adapters.chan_websocket.protocol import (
    FRAME_BYTES,
    PTIME_MS,
    ControlFormat,
    MediaStart,
    render_event,
)
from tts_streamer.exceptions import sole_error
from tts_streamer.simulator.asterisk_call import ClientFault, SentEvent, SimCall, SimConfig
from tts_streamer.simulator.asterisk_playout import TICK, Playout
from tts_streamer.simulator.ws_tap import WireTap

__all__ = [
    "AsteriskSimulator",
    "ClientFault",
    "Dialer",
    "SimCall",
    "SimConfig",
    "memory_dialer",
    "serve_asterisk_simulator",
]

SUBPROTOCOL = "media"
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 2.0
_ABNORMAL = 1006

Dialer = Callable[..., AbstractAsyncContextManager[WebSocketConnection]]


class AsteriskSimulator:
    """Registry of expected legs plus the per-connection handler.

    ``calls`` maps each connection id to its SimCall (the latest one for ``accept_any``);
    ``rejections`` records every refused handshake as (path, HTTP status).
    """

    def __init__(
        self, config: SimConfig | None = None, *, accept_any: bool = False, seed: int | None = None
    ) -> None:
        self.config = config or SimConfig()
        self.accept_any = accept_any
        self.rng = random.Random(seed)
        self.calls: dict[str, SimCall] = {}
        self.rejections: list[tuple[str, int]] = []
        self._channel_ids = itertools.count(1)

    def expect(
        self, connection_id: str, config: SimConfig | None = None, *, channel_id: str | None = None
    ) -> SimCall:
        """Register a leg as ARI's externalMedia would; the client may then dial /media/<id>."""
        if connection_id in self.calls:
            raise ValueError(f"connection id {connection_id!r} already registered")
        call = self._new_call(connection_id, config or self.config, channel_id)
        call.registered_at = trio.current_time()
        self.calls[connection_id] = call
        return call

    def _new_call(self, connection_id: str, config: SimConfig, channel_id: str | None) -> SimCall:
        n = next(self._channel_ids)
        return SimCall(
            connection_id=connection_id,
            config=config,
            channel=f"WebSocket/{connection_id}/0x{n:08x}",
            channel_id=channel_id or f"1700000000.{n}",
        )

    def _claim(self, path: str) -> tuple[SimCall | None, int]:
        """Find the leg for a request path, as chan_websocket's HTTP callback does (404, 409)."""
        path = path.partition("?")[0]  # Asterisk ignores the query string
        connection_id = path.removeprefix("/media/")
        if connection_id == path or not connection_id:
            return None, 404
        call = self.calls.get(connection_id)
        if call is None and self.accept_any:
            call = self.calls[connection_id] = self._new_call(connection_id, self.config, None)
        if call is None or call.ended.is_set():
            return None, 404
        deadline = call.config.connect_deadline
        registered = call.registered_at
        if deadline is not None and registered is not None and trio.current_time() > registered + deadline:
            return None, 404
        if call.connected_at is not None:
            return None, 409
        return call, 0

    async def handle(self, request: WebSocketRequest) -> None:
        """Per-connection handler for ``trio_websocket.serve_websocket`` or ``wrap_server_stream``."""
        await self._handle(request, None)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one already-connected byte stream (TCP or in-memory) until the leg ends."""
        tap = WireTap(stream)
        try:
            async with trio.open_nursery() as nursery:
                request = None
                with trio.move_on_after(HANDSHAKE_TIMEOUT):
                    request = await wrap_server_stream(nursery, tap)
                if request is not None:
                    await self._handle(request, tap)
                # Ends trio-websocket's reader task, whether we accepted, rejected or timed out.
                await trio.aclose_forcefully(tap)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client vanished mid-handshake

    async def _handle(self, request: WebSocketRequest, tap: WireTap | None) -> None:
        call, status = self._claim(request.path)
        offered = request.proposed_subprotocols
        if call is not None and offered and SUBPROTOCOL not in offered:
            call, status = None, 400
        if call is None:
            self.rejections.append((request.path, status))
            await request.reject(status, body=_REJECT_BODIES[status])
            return
        call.connected_at = trio.current_time()  # before any await: a second dial now gets 409
        if tap is not None:
            tap.faults = call.client_faults
        try:
            ws = await request.accept(subprotocol=SUBPROTOCOL if offered else None)
        except ConnectionClosed:
            _finish(call, "connection_lost", _ABNORMAL)
            call.ended.set()
            return
        call.subprotocol = ws.subprotocol
        call.connected.set()
        try:
            await _Leg(ws, call, self.rng).run()
        finally:
            _finish(call, "shutdown", 1000)
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                if call.hangup_by == "write_timeout" and tap is not None:
                    # A timed-out write may have left half a frame on the wire: no close frame can
                    # follow it, so drop the connection (the client sees 1006).
                    await trio.aclose_forcefully(tap)
                else:
                    await ws.aclose(call.closed_code or 1000)
            call.closed_at = trio.current_time()
            call.ended.set()


# The most of one gap between the ticker's checks that counts towards the write timeout: two ticks.
STALL_CREDIT = 2 * TICK

_REJECT_BODIES = {
    400: b"Sec-WebSocket-Protocol: no supported protocol offered",
    404: b"WebSocket instance not found",
    409: b"Another websocket connection exists for this connection id",
}


def _finish(call: SimCall, how: str, code: int | None) -> None:
    """Record how the leg ended; the first cause wins."""
    if call.hangup_by is not None:
        return
    if how == "client_close" and code == _ABNORMAL:
        how = "connection_lost"  # TCP gone without a close frame: Asterisk hangs up with cause 38
    call.hung_up, call.hangup_by, call.closed_code = True, how, code


class _Leg:
    """The tasks of one accepted connection; all of them end when the leg ends."""

    def __init__(self, ws: WebSocketConnection, call: SimCall, rng: random.Random) -> None:
        self.ws = ws
        self.call = call
        self.config = call.config
        self.playout = Playout(call)
        self.phase = self.config.tick_phase if self.config.tick_phase is not None else rng.uniform(0, TICK)
        self._outbox, self._outbox_out = trio.open_memory_channel[str | bytes](math.inf)
        self._scope = trio.CancelScope()
        # Time a write has been stuck, counted by the ticker in its own slots (see _ticker).
        self._write_pending = False
        self._write_blocked = 0.0

    def _end(self, how: str, code: int | None) -> None:
        _finish(self.call, how, code)
        self._scope.cancel()

    def _send(self, messages: Iterable[str | bytes]) -> None:
        for message in messages:
            self._outbox.send_nowait(message)

    async def run(self) -> None:
        call, config = self.call, self.config
        start = trio.current_time()
        if config.bridge_delay is not None:
            call.bridged_at = start + config.bridge_delay
        call.hangup_hook = lambda: self._end("ari", 1000)
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, name=f"sim-writer[{call.connection_id}]")
                if config.audio_before_media_start:
                    self._send([config.caller_frame] * 2)
                if not config.never_send_media_start:
                    self._send([self._media_start(start)])
                nursery.start_soon(self._ticker, start + self.phase, name=f"sim-ticker[{call.connection_id}]")
                nursery.start_soon(self._reader, start, name=f"sim-reader[{call.connection_id}]")
                if config.close_after is not None:
                    nursery.start_soon(self._hang_up_later, start + config.close_after)

    def _media_start(self, now: float) -> str:
        call, config = self.call, self.config
        extra = dict(config.media_start_extra)
        if config.control_format is ControlFormat.JSON:
            channel_vars = {"MEDIA_WEBSOCKET_CONNECTION_ID": call.connection_id}
            channel_vars["MEDIA_WEBSOCKET_OPTIMAL_FRAME_SIZE"] = str(FRAME_BYTES)
            extra = {"channel_variables": channel_vars, **extra}
        event = MediaStart(
            connection_id=call.connection_id,
            channel=call.channel,
            channel_id=call.channel_id,
            format="ulaw",
            optimal_frame_size=FRAME_BYTES,
            ptime=PTIME_MS,
            control_format=config.control_format,
            extra=extra,
        )
        text = render_event(event)
        call.media_start_at = now
        call.events.append(SentEvent(now, "MEDIA_START", text))
        return text

    async def _writer(self) -> None:
        async for message in self._outbox_out:
            # The ticker watches this instead of a cancel scope per message (cheaper at 50+ msg/s).
            self._write_pending, self._write_blocked = True, 0.0
            try:
                await self.ws.send_message(message)
            except ConnectionClosed as exc:
                self._closed_by_client(exc)
                return
            self._write_pending = False

    def _closed_by_client(self, exc: ConnectionClosed) -> None:
        self._end("client_close", exc.reason.code if exc.reason is not None else _ABNORMAL)

    async def _reader(self, start: float) -> None:
        stall = self.config.stall_reads
        if stall is None:
            await self._read_forever()
        else:
            # Receiving from trio-websocket's channel is cancel-safe: no message is half taken.
            with trio.move_on_at(start + stall):
                await self._read_forever()
            await trio.sleep_forever()

    async def _read_forever(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed as exc:
                self._closed_by_client(exc)
                return
            now = trio.current_time()
            if isinstance(message, bytes):
                reaction = self.playout.on_binary(now, message)
            else:
                reaction = self.playout.on_text(now, message)
            self._send(reaction.send)
            if reaction.close_code is not None:
                self._end(reaction.hangup_by or "HANGUP", reaction.close_code)
                return

    async def _ticker(self, first: float) -> NoReturn:
        """Asterisk's timer: absolute 20 ms slots, so a late wake-up catches up instead of drifting."""
        call, config = self.call, self.config
        index = 0
        checked = first
        while True:
            now = first + index * TICK
            await trio.sleep_until(now)
            woke = trio.current_time()
            if self._write_pending and config.write_timeout is not None:
                # Asterisk gives a write 100 ms, then drops the connection (1011) and hangs up. Asterisk
                # is another process: when this one stalls (GC, a busy test harness), that is not the
                # client failing to read, so at most STALL_CREDIT of each gap between checks counts.
                self._write_blocked += min(woke - checked, STALL_CREDIT)
                if self._write_blocked > config.write_timeout:
                    self._end("write_timeout", 1011)
                    await trio.sleep_forever()  # cancelled at once: no tick after the decision
            checked = woke
            bridged = call.is_bridged(now)
            self._send(self.playout.tick(now, bridged=bridged, lost=index in config.lost_ticks))
            if config.send_caller_audio and call.direction != "out" and call.hears_caller(now):
                call.caller_frames_sent += 1
                self._send([config.caller_frame])
            index += 1

    async def _hang_up_later(self, when: float) -> None:
        await trio.sleep_until(when)
        self._end("simulated", 1000)


async def serve_asterisk_simulator(
    sim: AsteriskSimulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the simulator over TCP; ``await nursery.start(serve_asterisk_simulator, sim)`` -> port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound: int = listeners[0].socket.getsockname()[1]
    # The sockets already listen, so connections made before serving starts wait in the backlog.
    task_status.started(bound)
    await trio.serve_listeners(sim.serve_stream, listeners)


def memory_dialer(sim: AsteriskSimulator, nursery: trio.Nursery) -> Dialer:
    """An in-memory stand-in for ``trio_websocket.open_websocket_url`` that reaches ``sim``.

    ``dial(media_uri, **kwargs)`` serves the server end in ``nursery`` and yields the client
    connection (offering ``media`` unless told otherwise). As with the real dialer, a rejected
    handshake raises ``ConnectionRejected``, timeouts raise ``ConnectionTimeout`` /
    ``DisconnectionTimeout``, errors come out bare rather than in a group, and the connection is
    closed (1000) on exit.
    """

    @asynccontextmanager
    async def dial(
        media_uri: str,
        *,
        subprotocols: Iterable[str] | None = (SUBPROTOCOL,),
        message_queue_size: int = 1,
        max_message_size: int = 2**20,
        connect_timeout: float = 60.0,
        disconnect_timeout: float = 60.0,
        **_ignored: object,
    ) -> AsyncIterator[WebSocketConnection]:
        url = urllib.parse.urlsplit(media_uri)
        resource = url.path + (f"?{url.query}" if url.query else "")
        client_end, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(sim.serve_stream, server_end, name=f"sim-conn[{resource}]")
        try:
            async with trio.open_nursery() as conn_nursery:
                try:
                    with trio.fail_after(connect_timeout):
                        ws = await wrap_client_stream(
                            conn_nursery,
                            # Typed for sockets, but any trio Stream works.
                            cast(trio.SocketStream, client_end),
                            url.netloc,
                            resource,
                            subprotocols=list(subprotocols) if subprotocols is not None else None,
                            message_queue_size=message_queue_size,
                            max_message_size=max_message_size,
                        )
                except trio.TooSlowError:
                    raise ConnectionTimeout from None
                try:
                    yield ws
                finally:
                    # Not shielded, like open_websocket_url: a cancelled caller leaves the peer a 1006.
                    try:
                        with trio.fail_after(disconnect_timeout):
                            await ws.aclose()
                    except trio.TooSlowError:
                        raise DisconnectionTimeout from None
        except BaseExceptionGroup as group:
            raise sole_error(group) from None

    return dial


def memory_connector(
    sim: AsteriskSimulator, nursery: trio.Nursery
) -> Callable[[str], Awaitable[trio.abc.Stream]]:
    """A byte stream to ``sim`` in place of TCP: for the production dialer's ``connect``.

    With it, tests run tts-streamer's own WebSocket client (caller-audio filter and read pacing
    included) against the simulator in virtual time; ``memory_dialer`` replaces the client instead.
    """

    async def connect(media_uri: str) -> trio.abc.Stream:
        client_end, server_end = trio.testing.memory_stream_pair()
        resource = urllib.parse.urlsplit(media_uri).path
        nursery.start_soon(sim.serve_stream, server_end, name=f"sim-conn[{resource}]")
        await trio.lowlevel.checkpoint()
        return client_end

    return connect
