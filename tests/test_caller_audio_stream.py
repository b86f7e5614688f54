"""The production client under caller audio, in virtual time: counted, never queued, read in batches.

A leg in a softmix bridge gets 50 caller frames a second. Before the filter each was a message on
trio-websocket's queue and a wake-up of the reader (~110 us each); now one read takes a batch, and
what matters (a hang-up, a mark) still gets through within one read interval.
"""

from __future__ import annotations

import pytest
import trio

from tests.support import media_uri
from tts_streamer.adapters.chan_websocket import client, protocol
from tts_streamer.adapters.chan_websocket.dial import CALLER_AUDIO_READ_INTERVAL, StreamConnector
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig, memory_connector

SOFTMIX = SimConfig.softmix(bridge_delay=0.005, tick_phase=0.01)
SECONDS = 2.0


class CountingStream(trio.abc.Stream):
    """Counts the reads the client makes of the transport under it."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.reads = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        self.reads += 1
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def counting(connect: StreamConnector, streams: list[CountingStream]) -> StreamConnector:
    async def connect_counting(uri: str) -> trio.abc.Stream:
        stream = CountingStream(await connect(uri))
        streams.append(stream)
        return stream

    return connect_counting


async def caller_audio_for(
    nursery: trio.Nursery, seconds: float, read_interval: float
) -> tuple[int, int, int, bool]:
    """(caller frames the simulator sent, frames the client counted, transport reads, bridged)."""
    sim = AsteriskSimulator(SOFTMIX)
    call = sim.expect("c1")
    streams: list[CountingStream] = []
    dialer = client.websocket_dialer(
        caller_audio_read_interval=read_interval, connect=counting(memory_connector(sim, nursery), streams)
    )
    async with client.open_media_connection(media_uri("c1"), dialer) as conn:
        await trio.sleep(seconds)
        counted = conn.stats.caller_frames_received
        sent = call.caller_frames_sent
        bridged = conn.bridged.is_set()
        reads = streams[0].reads
    return sent, counted, reads, bridged


async def test_caller_audio_is_counted_and_read_in_batches(nursery, autojump_clock):
    sent, counted, reads, bridged = await caller_audio_for(nursery, SECONDS, CALLER_AUDIO_READ_INTERVAL)
    assert bridged
    assert sent >= 0.9 * SECONDS * 50
    # Whatever was sent before the last read interval has been read and counted.
    assert sent - int(CALLER_AUDIO_READ_INTERVAL * 50) - 1 <= counted <= sent
    assert reads <= SECONDS / CALLER_AUDIO_READ_INTERVAL + 5


async def test_without_read_pacing_every_caller_frame_is_a_read(nursery, autojump_clock):
    """The control for the test above: the read count it bounds is one per frame when reads are not paced."""
    sent, counted, reads, _ = await caller_audio_for(nursery, SECONDS, 0.0)
    assert counted >= sent - 1
    assert reads >= 0.9 * sent


async def test_caller_audio_never_reaches_the_message_queue(nursery, autojump_clock):
    sim = AsteriskSimulator(SOFTMIX)
    sim.expect("c1")
    dialer = client.websocket_dialer(connect=memory_connector(sim, nursery))
    async with client.open_media_connection(media_uri("c1"), dialer) as conn:
        await trio.sleep(1.0)
        assert conn.stats.caller_frames_received >= 50 - 1 - 50 * CALLER_AUDIO_READ_INTERVAL
        with trio.move_on_after(0.5):
            message = await conn._ws.get_message()
            pytest.fail(f"a message reached the queue: {message!r}")


async def test_a_hang_up_amid_caller_audio_is_seen_within_one_read_interval(nursery, autojump_clock):
    sim = AsteriskSimulator(SimConfig.softmix(bridge_delay=0.005, tick_phase=0.01, close_after=1.0))
    sim.expect("c1")
    dialer = client.websocket_dialer(connect=memory_connector(sim, nursery))
    started = trio.current_time()
    with pytest.raises(client.MediaSocketClosed) as closed:
        async with client.open_media_connection(media_uri("c1"), dialer) as conn:
            assert conn.media_start is not None
            await trio.sleep_forever()
    assert closed.value.code == 1000
    assert trio.current_time() - started <= 1.0 + CALLER_AUDIO_READ_INTERVAL + 0.01


@pytest.mark.parametrize("settle", [0.5, 0.53, 0.56, 0.59])  # phases of the mark against the read pace
async def test_a_mark_amid_caller_audio_is_reported_as_it_plays(nursery, autojump_clock, settle):
    sim = AsteriskSimulator(SOFTMIX)
    sim.expect("c1")
    dialer = client.websocket_dialer(connect=memory_connector(sim, nursery))
    async with client.open_media_connection(media_uri("c1"), dialer) as conn:
        await trio.sleep(settle)  # caller audio flowing: reads are paced
        marked = trio.Event()
        conn.on_mark("m1", marked.set)
        await conn.send_audio(b"\x55" * 1600)  # 10 frames: 200 ms of play before the mark
        sent_at = trio.current_time()
        await conn.send_command(protocol.mark_media("m1"))
        with trio.fail_after(1.0):
            await marked.wait()
        # Played within a tick of its last frame, and read at once: reads are not paced while a mark
        # is awaited (before, it could wait up to a read interval: 100 ms against the 40 ms allowed).
        assert trio.current_time() - sent_at <= 0.2 + 0.02 + 0.005
