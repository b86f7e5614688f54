"""Barge-in does not wait for the vendor (issue 14 §2); everything inside a session is bounded (§5)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import pytest
import trio

from tests.lifecycle_support import SlowReleaseEngine
from tests.support import media_uri, open_sim_supervisor
from tests.test_pacing_modes import Listener, SlowConnection
from tts_streamer.actors import events as ev
from tts_streamer.actors.audio import BYTES_PER_MS, AudioChannel, AudioChunk, UtteranceEnd
from tts_streamer.actors.commands import CommandError, SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.actors.media_socket import MediaSocket, PacingConfig
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.chan_websocket.client import MediaConnection
from tts_streamer.adapters.synthetic import SyntheticEngine, SyntheticStream, fill_byte
from tts_streamer.adapters.voice import VoiceSpec
from tts_streamer.simulator.asterisk import AsteriskSimulator
from tts_streamer.supervisor.ops.metrics import Metrics


async def test_flush_media_goes_out_at_once_while_the_vendor_is_still_releasing(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=1)
    call = sim.expect("c1")
    engine = SlowReleaseEngine(release_delay=1.0, seconds_per_char=0.1, speed=2.0)
    old, new = "old speech " * 10, "new words " * 2
    async with open_sim_supervisor(sim, engine, nursery) as (sup, sink):
        session = await sup.start_session("c1", media_uri("c1"))
        await session.call(SayInit())
        await session.call(SayAdd(old))
        await sink.wait_for(ev.PlayStarted, "c1")
        await trio.sleep(1.0)
        commanded_at = trio.current_time()
        await session.call(SayFlush())
        answered_at = trio.current_time()
        flush_cmd = next(c for c in call.controls if c.command and c.command.name == "FLUSH_MEDIA")
        # FLUSH_MEDIA reached Asterisk at the command's (virtual) time; the reply waited for the release.
        assert flush_cmd.time == pytest.approx(commanded_at, abs=1e-6)
        assert engine.released_at and answered_at >= engine.released_at[-1] == pytest.approx(
            commanded_at + 1.0
        )
        assert engine.open_streams == 0
        await session.call(SayAdd(new))
        await session.call(SayFinish())
        await sink.wait_for(ev.PlayFinished, "c1")
    old_fill = fill_byte(old)
    assert not [m for m in call.queued if m.time > flush_cmd.time and m.data[0] == old_fill]
    assert [f for f in call.played if f.data[0] == fill_byte(new)]


async def test_flush_to_silence_is_measured_to_flush_media_not_to_the_reply(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=5)
    sim.expect("c1")
    engine = SlowReleaseEngine(release_delay=1.0, seconds_per_char=0.1)
    metrics = Metrics()
    async with open_sim_supervisor(sim, engine, nursery) as (sup, sink):
        sup.observer = metrics
        await sup.start_session("c1", media_uri("c1"))
        await sup.call("c1", SayInit())
        await sup.call("c1", SayAdd("words " * 20))
        await sink.wait_for(ev.PlayStarted, "c1")
        started = trio.current_time()
        await sup.call("c1", SayFlush())
        assert trio.current_time() - started >= 1.0  # the reply waited for the release
    observed = metrics.registry.get_sample_value("tts_streamer_flush_to_silence_seconds_sum")
    assert metrics.registry.get_sample_value("tts_streamer_flush_to_silence_seconds_count") == 1
    assert observed is not None and observed < 0.1


async def test_audio_of_a_flushed_utterance_arriving_after_flush_media_is_never_sent(autojump_clock):
    """The vendor is released concurrently with FLUSH_MEDIA: whatever it still pushes is stale."""
    conn = SlowConnection()
    audio = AudioChannel(budget_ms=1000)
    listener = Listener()
    media = MediaSocket(
        cast(MediaConnection, conn), audio, listener, PacingConfig(lead_frames=0, frames_per_message=1)
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(media.serve)
        await audio.send(AudioChunk(0, b"\x10" * 1600))
        await trio.sleep(0.05)
        await media.flush(1)
        sent_at_flush = len(conn.writes)
        await audio.send(AudioChunk(0, b"\x10" * 1600))  # late audio of the flushed utterance
        await audio.send(UtteranceEnd(0))
        await audio.send(AudioChunk(1, b"\x20" * 320))
        await audio.send(UtteranceEnd(1))
        await listener.played.wait()
        nursery.cancel_scope.cancel()
    assert len(conn.writes) == sent_at_flush + 2  # only utterance 1's two frames


async def test_the_audio_channel_is_bounded_in_milliseconds_not_chunks(autojump_clock):
    channel = AudioChannel(budget_ms=200, piece_ms=50)
    # One huge chunk (a minute of audio) is cut into pieces and never buffered past the budget.
    minute = b"\x10" * (60_000 * BYTES_PER_MS)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.send, AudioChunk(0, minute))
        await trio.sleep(1)
        assert channel.queued_ms == 200
        received = 0
        while received < len(minute):
            item = await channel.receive()
            assert isinstance(item, AudioChunk) and len(item.data) <= 50 * BYTES_PER_MS
            received += len(item.data)
            assert channel.queued_ms <= 200
    # Tiny chunks do not starve it: a budget's worth of 1-byte chunks fits.
    for _ in range(200 * BYTES_PER_MS):
        with trio.fail_after(1):
            await channel.send(AudioChunk(1, b"\x10"))
    assert channel.queued_ms == 200
    with trio.move_on_after(1) as blocked:
        await channel.send(AudioChunk(1, b"\x10"))
    assert blocked.cancelled_caught
    with pytest.raises(trio.WouldBlock):
        AudioChannel().receive_nowait()


async def test_a_vendor_with_huge_chunks_buffers_at_most_the_budget(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=2)
    sim.expect("c1")
    engine = SyntheticEngine(seconds_per_char=1.0, chunk_bytes=10 * 60 * 8000)  # 10-minute chunks
    config = SessionConfig(audio_queue_ms=500)
    async with open_sim_supervisor(sim, engine, nursery, config=config) as (sup, sink):
        session = await sup.start_session("c1", media_uri("c1"))
        await session.call(SayInit())
        await session.call(SayAdd("x" * 120))  # two minutes
        await sink.wait_for(ev.PlayStarted, "c1")
        for _ in range(10):
            await trio.sleep(0.5)
            assert session.media is not None
            # What waits between the actors plus what the pacer holds: about the budget, never minutes.
            assert 0 < session.media.queued_ms <= 500 + 100 + 20  # + one piece being framed


async def test_a_message_holds_at_most_max_message_text_bytes(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=3)
    call = sim.expect("c1")
    engine = SyntheticEngine(seconds_per_char=0.01, speed=1.0)
    config = SessionConfig(max_message_text_bytes=1000)
    async with open_sim_supervisor(sim, engine, nursery, config=config) as (sup, sink):
        session = await sup.start_session("c1", media_uri("c1"))
        await session.call(SayInit("m1"))
        for _ in range(9):
            await session.call(SayAdd("y" * 100))
        await session.call(SayAdd("y" * 91))  # 9 x 100 + 91 + 9 separating spaces: the limit exactly
        with pytest.raises(CommandError) as refused:
            await session.call(SayAdd("z"))
        assert refused.value.kind == "message_too_long" and "1000" in str(refused.value)
        await session.call(SayFinish())  # the message is undisturbed: it plays to its end
        finished = await sink.wait_for(ev.PlayFinished, "c1")
        assert finished.completed and finished.texts_added == 10 and len(finished.text) == 1000
        await session.call(SayInit("m2"))  # a new message has its own budget
        await session.call(SayAdd("z"))
        assert not call.hung_up


class StuckEngine(SyntheticEngine):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.stuck = trio.Event()

    def unstick(self) -> None:
        self.stuck.set()

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[SyntheticStream]:
        async with super().open_stream(voice) as stream:
            send_text = stream.send_text

            async def stuck_send(text: str) -> None:
                await self.stuck.wait()
                await send_text(text)

            stream.send_text = stuck_send  # type: ignore[method-assign]
            yield stream


async def test_the_vendor_inbox_is_bounded(nursery, autojump_clock):
    sim = AsteriskSimulator(seed=4)
    sim.expect("c1")
    # A vendor that does not take text (its connection is stuck): texts pile up in its inbox.
    engine = StuckEngine(seconds_per_char=0.01)
    config = SessionConfig(vendor_inbox_items=8)
    async with open_sim_supervisor(sim, engine, nursery, config=config) as (sup, sink):
        session = await sup.start_session("c1", media_uri("c1"))
        await session.call(SayInit())
        accepted, refused = 0, []
        for n in range(50):
            try:
                await session.call(SayAdd(f"text {n}"))
                accepted += 1
            except CommandError as exc:
                refused.append(exc.kind)
        assert refused and set(refused) == {"busy"}
        assert accepted <= 8 + 2  # the bound, plus what the vendor took into its stream
        await session.call(SayFinish())  # its end of input still fits
        await session.call(SayInit())  # and so does the next message's
        engine.unstick()
        finished = await sink.wait_for(ev.PlayFinished, "c1")
        assert finished.completed and finished.texts_added == accepted
