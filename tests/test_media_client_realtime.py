"""The chan_websocket client over real loopback sockets (the real clock), where trio-websocket's own
tasks matter: closing must complete the handshake rather than wait out the close timeout."""

from __future__ import annotations

import pytest
import trio

from tests.support import RecordingSink
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayInit
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.chan_websocket.client import MediaTimeouts, websocket_dialer
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.simulator.asterisk import AsteriskSimulator, serve_asterisk_simulator
from tts_streamer.supervisor.sessions import open_supervisor

pytestmark = pytest.mark.realtime


@pytest.mark.parametrize("caller_audio", [True, False])
async def test_stop_completes_the_close_handshake_while_caller_audio_flows(caller_audio: bool) -> None:
    from tts_streamer.simulator.asterisk import SimConfig

    sim = AsteriskSimulator(SimConfig(send_caller_audio=caller_audio), accept_any=True)
    engine = SyntheticEngine(seconds_per_char=0.1, speed=1.0)
    sink = RecordingSink()
    # A close timeout far beyond the test's bound: if the handshake cannot complete, the test fails.
    config = SessionConfig(timeouts=MediaTimeouts(close=60.0))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_asterisk_simulator, sim, "127.0.0.1", 0)
            async with open_supervisor(
                engines={"synthetic": engine},
                default_engine="synthetic",
                dialer=websocket_dialer(MediaTimeouts(close=60.0)),
                events=sink,
                config=config,
            ) as supervisor:
                await supervisor.start_session("c1", f"ws://127.0.0.1:{port}/media/c1")
                await supervisor.call("c1", SayInit())
                await supervisor.call("c1", SayAdd("x" * 30))
                await sink.wait_for(ev.PlayStarted, "c1")
                with trio.fail_after(2):
                    await supervisor.stop("c1")
            call = sim.calls["c1"]
            with trio.fail_after(2):
                await call.ended.wait()
            assert call.closed_code == 1000 and call.hangup_by == "client_close"
            nursery.cancel_scope.cancel()


async def test_a_start_cancelled_by_the_callers_deadline_returns_promptly_and_still_closes() -> None:
    from tts_streamer.simulator.asterisk import SimConfig

    sim = AsteriskSimulator(SimConfig(never_send_media_start=True), accept_any=True)
    engine = SyntheticEngine()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_asterisk_simulator, sim, "127.0.0.1", 0)
            async with open_supervisor(
                engines={"synthetic": engine},
                default_engine="synthetic",
                dialer=websocket_dialer(),
                events=RecordingSink(),
                config=SessionConfig(),  # close timeout 2 s, MEDIA_START timeout 5 s
            ) as supervisor:
                started = trio.current_time()
                with trio.move_on_after(0.5):  # a caller's budget, like an AMQP create's
                    await supervisor.start_session("c1", f"ws://127.0.0.1:{port}/media/c1")
                elapsed = trio.current_time() - started
                # Before: 0.5 s + the full 2 s close timeout, as trio-websocket's reader was cancelled too.
                assert elapsed < 1.0, elapsed
                assert list(supervisor) == []
            call = sim.calls["c1"]
            with trio.fail_after(2):
                await call.ended.wait()
            assert call.hung_up
            nursery.cancel_scope.cancel()


async def test_frames_written_past_a_full_socket_buffer_arrive_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Audio frames go straight to the non-blocking socket; when the kernel takes only part of one,
    the rest follows under trio-websocket's stream lock. With a tiny send buffer most frames are cut
    so: the simulator (wsproto underneath) must still receive every message, whole and in order."""
    import socket

    from tts_streamer.adapters.chan_websocket import client

    partial: list[int] = []
    real_raw_socket = client._raw_socket

    class Counting:
        """The real socket; counts the sends the kernel took only part of."""

        def __init__(self, sock: socket.socket) -> None:
            self._sock = sock

        def send(self, data: bytes) -> int:
            sent = self._sock.send(data)
            if sent < len(data):
                partial.append(sent)
            return sent

    def counting(stream: object) -> object:
        sock = real_raw_socket(stream)
        return None if sock is None else Counting(sock)

    monkeypatch.setattr(client, "_raw_socket", counting)
    sim = AsteriskSimulator(accept_any=True)
    payloads = [bytes([16 + i]) * 64000 for i in range(2)]  # 800 frames: below XOFF
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_asterisk_simulator, sim, "127.0.0.1", 0)
            uri = f"ws://127.0.0.1:{port}/media/c1"
            async with client.open_media_connection(uri, websocket_dialer()) as conn:
                raw = conn._ws._stream.inner.socket  # type: ignore[attr-defined]
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2048)
                for payload in payloads:
                    await conn.send_audio(payload)
                call = sim.calls["c1"]
                await trio.sleep(0.5)  # loopback: long enough for 128 kB to be read
            assert [m.length for m in call.messages] == [64000] * len(payloads)
            assert [q.data[0] for q in call.queued[::400]] == [p[0] for p in payloads]
            assert not call.client_faults
            assert partial, "the kernel took every frame whole: the test did not reach the partial path"
            nursery.cancel_scope.cancel()
