"""The pacing levers of issue 16 keep the behaviour: the send watchdog, the shared pacer clock, the
pre-built audio frames (virtual time, autojump MockClock; wsproto parses the frames)."""

from __future__ import annotations

from typing import cast

import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

from tests.lifecycle_support import StallableStream, stalling_dialer
from tests.test_pacing_modes import Listener, SlowConnection
from tts_streamer.actors.audio import AudioChunk, AudioItem, UtteranceEnd
from tts_streamer.actors.media_socket import MediaSocket, PacingConfig
from tts_streamer.adapters.chan_websocket import framing
from tts_streamer.adapters.chan_websocket.client import (
    MediaConnection,
    MediaSocketError,
    MediaTimeouts,
    open_media_connection,
)
from tts_streamer.adapters.chan_websocket.protocol import MAX_MESSAGE_PAYLOAD
from tts_streamer.pacer_clock import Alarm, current_clock
from tts_streamer.simulator.asterisk import AsteriskSimulator


async def test_a_stalled_send_ends_the_connection_at_its_deadline(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=1)
    sim.expect("c1")
    streams: dict[str, StallableStream] = {}
    dialer = stalling_dialer(sim, nursery, streams)
    timeouts = MediaTimeouts(send=1.5)
    stalled_at = ended_at = 0.0
    with pytest.raises(MediaSocketError, match=r"send blocked for more than 1.5 s"):
        async with open_media_connection("ws://sim/media/c1", dialer, timeouts) as conn:
            await conn.send_audio(b"\x10" * 160)  # the frame path works while the peer reads
            await trio.sleep(3.7)  # the watchdog's checks run while nothing is sent: no false alarm
            await conn.send_audio(b"\x10" * 160)
            streams["c1"].stall()
            stalled_at = trio.current_time()
            try:
                await conn.send_audio(b"\x10" * 160)
            finally:
                ended_at = trio.current_time()
    # The send is cancelled exactly the send timeout after it began, however the watchdog's checks
    # fell (then the bounded close, whose close frame cannot be written either, takes its 2 s).
    assert ended_at - stalled_at == pytest.approx(1.5, abs=1e-6)


async def _pace_many(phases: list[float], frames: int) -> list[list[float]]:
    """Several MediaSockets on the one shared clock, each starting at its own phase."""
    conns = [SlowConnection() for _ in phases]
    listeners = [Listener() for _ in phases]
    config = PacingConfig(lead_frames=2, frames_per_message=1)
    async with trio.open_nursery() as nursery:
        for conn, listener, phase in zip(conns, listeners, phases, strict=True):
            send, recv = trio.open_memory_channel[AudioItem](8)
            media = MediaSocket(cast(MediaConnection, conn), recv, listener, config)
            nursery.start_soon(media.serve)

            async def feed(send: trio.MemorySendChannel[AudioItem], phase: float) -> None:
                await trio.sleep(phase)
                await send.send(AudioChunk(0, b"\x10" * 160 * frames))
                await send.send(UtteranceEnd(0))

            nursery.start_soon(feed, send, phase)
        for listener in listeners:
            await listener.played.wait()
        nursery.cancel_scope.cancel()
    return [[t for t, _ in conn.writes] for conn in conns]


async def test_sessions_keep_their_own_absolute_timelines_on_the_shared_clock(autojump_clock):
    phases = [0.0, 0.0033, 0.0071, 0.0119, 0.0150]
    timelines = await _pace_many(phases, 60)
    for phase, writes in zip(phases, timelines, strict=True):
        assert len(writes) == 60
        # The lead (2 frames) and the first due frame go at once, then frame n at phase + (n - 2) * 20 ms,
        # every 1 ms write absorbed: no global tick, no drift, each on its own phase.
        expected = [phase + max(0, n - 2) * 0.020 + (WRITE if n <= 2 else 0.0) * n for n in range(60)]
        assert writes == pytest.approx(expected, abs=1e-9)


WRITE = 0.001  # SlowConnection's write time


async def test_flush_wakes_a_waiting_pacer_and_sends_flush_media_at_once(autojump_clock):
    conn = SlowConnection()
    commands: list[tuple[float, object]] = []

    async def send_command(command: object) -> None:
        commands.append((trio.current_time(), command))

    conn.send_command = send_command  # type: ignore[method-assign]
    send, recv = trio.open_memory_channel[AudioItem](64)
    media = MediaSocket(cast(MediaConnection, conn), recv, Listener(), PacingConfig(lead_frames=3))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(media.serve)
        await send.send(AudioChunk(0, b"\x10" * 160 * 200))  # 4 s
        await trio.sleep(1.013)  # the pacer waits for its next slot
        sent_before = len(conn.writes)
        flushed_at = trio.current_time()
        dropped = await media.flush(1)
        assert commands and commands[0][0] == pytest.approx(flushed_at, abs=1e-9)  # FLUSH_MEDIA now
        assert dropped > 100
        await trio.sleep(2.0)
        assert len(conn.writes) == sent_before  # nothing of utterance 0 after the flush
        await send.send(AudioChunk(1, b"\x20" * 160 * 10))
        new_at = trio.current_time()
        await trio.sleep(0.001)
        # The next utterance starts a fresh timeline at once (its lead goes out immediately).
        assert conn.writes[sent_before][0] == pytest.approx(new_at, abs=1e-9)
        nursery.cancel_scope.cancel()


async def test_an_alarm_is_woken_early_by_wake_and_cancelled_like_a_sleep(autojump_clock):
    alarm = Alarm()
    results: list[tuple[float, bool]] = []

    async def waiter() -> None:
        woke = await alarm.wait_until(5.0)
        results.append((trio.current_time(), woke))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(1.0)
        alarm.wake()
    assert results == [(1.0, False)]
    with trio.move_on_after(0.5) as scope:
        await Alarm().wait_until(10.0)
    assert scope.cancelled_caught and trio.current_time() == pytest.approx(1.5)
    assert await Alarm().wait_until(trio.current_time() + 0.25) is True
    assert current_clock() is current_clock()  # one per run


@pytest.mark.parametrize("size", [0, 1, 125, 126, 160, 800, 1600, 65535 - 8, MAX_MESSAGE_PAYLOAD])
def test_prebuilt_frames_parse_as_the_same_binary_messages(size):
    keys = framing.MaskingKeys()
    payload = bytes((i * 7 + 3) % 256 for i in range(size))
    server = Connection(ConnectionType.SERVER)
    server.receive_data(
        framing.binary_frame(payload, keys.next()) + framing.binary_frame(payload, keys.next())
    )
    events = list(server.events())
    assert [type(e) for e in events] == [BytesMessage, BytesMessage]
    for event in events:
        assert isinstance(event, BytesMessage) and event.message_finished and event.frame_finished
        assert bytes(event.data) == payload


def test_masking_keys_differ_and_masking_is_its_own_inverse():
    keys = framing.MaskingKeys()
    drawn = {keys.next() for _ in range(3000)}  # across several batches from the OS
    assert len(drawn) > 2990 and all(len(k) == 4 for k in drawn)
    payload = bytes(range(256)) * 3 + b"xy"
    masked = framing.mask(payload, b"\x01\x02\x03\x04")
    assert masked != payload and framing.mask(masked, b"\x01\x02\x03\x04") == payload
    assert masked[:4] == bytes([0 ^ 1, 1 ^ 2, 2 ^ 3, 3 ^ 4])
    with pytest.raises(ValueError):
        framing.binary_frame(b"\x00" * 65536, b"abcd")


async def test_the_modelled_play_finished_clock_counts_from_a_timeline_starting_at_zero(autojump_clock):
    """Plain-text calls: played = the timeline's end plus a tick, also when t0 is 0.0 (MockClock's
    start), which the model once took for "no timeline" and reported ~one utterance late."""
    conn = SlowConnection()
    listener = Listener()
    send, recv = trio.open_memory_channel[AudioItem](8)
    media = MediaSocket(cast(MediaConnection, conn), recv, listener, PacingConfig(lead_frames=0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(media.serve)
        assert trio.current_time() == 0.0
        await send.send(AudioChunk(0, b"\x10" * 160 * 10))
        await send.send(UtteranceEnd(0))
        await listener.played.wait()
        assert trio.current_time() == pytest.approx(10 * 0.020 + 0.020, abs=1e-9)
        nursery.cancel_scope.cancel()


async def test_a_flush_landing_between_the_clocks_wake_and_the_pacer_is_harmless(autojump_clock):
    """The clock reschedules a due pacer; a flush due at the same instant can run before the pacer does
    (its wake then finds no live entry). Trio runs a batch forwards or backwards at random, so flushing
    at the exact due time 40 times hits that order with certainty (it crashed the pacer: t0 was None)."""
    conn = SlowConnection()

    async def send_command(command: object) -> None:
        pass

    conn.send_command = send_command  # type: ignore[method-assign]
    send, recv = trio.open_memory_channel[AudioItem](64)
    pacing = PacingConfig(lead_frames=3, frames_per_message=10)
    media = MediaSocket(cast(MediaConnection, conn), recv, Listener(), pacing)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(media.serve)
        for utterance in range(40):
            await send.send(AudioChunk(utterance, b"\x10" * 160 * 50))
            started = trio.current_time()
            # The first message (frames 0-9) goes out at once; frame 10 is due 7 ticks later.
            await trio.sleep_until(started + 0.140)
            await media.flush(utterance + 1)
        await send.send(AudioChunk(40, b"\x20" * 160 * 10))
        await send.send(UtteranceEnd(40))
        await trio.sleep(1.0)
        assert conn.writes, "the pacer is still alive and speaking"
        nursery.cancel_scope.cancel()
