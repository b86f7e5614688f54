"""espeak-ng through the real library. Real clock throughout: the engine thread runs in real time, so the
autojump clock would fire the timeouts early."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import trio

from tts_streamer.adapters.codecs import ulaw_decode
from tts_streamer.adapters.espeak import EspeakEngine
from tts_streamer.adapters.vendor_stream import split_sentences
from tts_streamer.adapters.voice import VoiceEngine, VoiceError, VoiceSpec

pytestmark = pytest.mark.realtime

BYTES_PER_SECOND = 8000
LONG_TEXT = " ".join(f"This is sentence number {i}, which is of a fairly ordinary length." for i in range(40))


def _as_voice_engine(engine: EspeakEngine) -> VoiceEngine:
    return engine  # mypy checks the protocol here


@pytest.fixture
async def engine() -> AsyncIterator[EspeakEngine]:
    eng = EspeakEngine()
    yield eng
    with trio.fail_after(2):
        await eng.aclose()


async def _speak(engine: EspeakEngine, text: str, voice: VoiceSpec | None = None) -> list[bytes]:
    with trio.fail_after(5):
        async with engine.open_stream(voice or VoiceSpec()) as stream:
            await stream.send_text(text)
            await stream.end_input()
            return [chunk async for chunk in stream.audio()]


def _rms(audio: bytes) -> float:
    return float(np.sqrt(np.mean(ulaw_decode(audio).astype(np.float64) ** 2)))


async def _wait_until_stopped(engine: EspeakEngine, cancelled_before: int) -> None:
    # Polled because the counters belong to the engine thread; it may not have reached the abandoned
    # jobs yet, but must skip them and finish any running one within a second.
    deadline = trio.current_time() + 1
    while engine.jobs_running or engine.jobs_cancelled <= cancelled_before:
        assert trio.current_time() < deadline, "engine still busy with a cancelled stream"
        await trio.sleep(0.001)


def test_split_sentences() -> None:
    assert split_sentences("  Hello world. This is a test!  Really?Yes ") == [
        "Hello world.",
        "This is a test!",
        "Really?Yes",
    ]
    assert split_sentences("   ") == []


async def test_speaks_plausible_audio(engine: EspeakEngine) -> None:
    chunks = await _speak(engine, "Hello world. This is a test.")
    audio = b"".join(chunks)
    assert len(chunks) > 1
    assert 1.0 <= len(audio) / BYTES_PER_SECOND <= 5.0
    assert _rms(audio) > 500  # silence is 0; speech sits in the thousands
    assert engine.open_streams == 0
    assert _as_voice_engine(engine).name == "espeak"


async def test_first_chunk_arrives_long_before_the_end(engine: EspeakEngine) -> None:
    await _speak(engine, "Warm up.")  # the first synthesis loads the dictionary
    with trio.fail_after(5):
        async with engine.open_stream(VoiceSpec()) as stream:
            start = time.perf_counter()
            await stream.send_text(LONG_TEXT)
            await stream.end_input()
            arrivals = [time.perf_counter() - start async for _ in stream.audio()]
    assert len(arrivals) > 40
    first, last = arrivals[0], arrivals[-1]
    assert first < 0.25
    assert first < last / 4


async def test_audio_can_be_sent_in_several_pieces(engine: EspeakEngine) -> None:
    with trio.fail_after(5):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text("Hello there.")
            await stream.send_text("How are you today?")
            await stream.end_input()
            audio = b"".join([chunk async for chunk in stream.audio()])
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_text("Too late.")
    assert len(audio) / BYTES_PER_SECOND > 1.0


async def test_speaking_rate_changes_duration(engine: EspeakEngine) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    slow = b"".join(await _speak(engine, text, VoiceSpec(speaking_rate=0.6)))
    fast = b"".join(await _speak(engine, text, VoiceSpec(speaking_rate=2.0)))
    assert len(fast) < len(slow) * 0.6


async def _assert_stopped_and_reusable(engine: EspeakEngine, cancelled_before: int) -> None:
    assert engine.open_streams == 0
    await _wait_until_stopped(engine, cancelled_before)
    # The next stream must not wait behind the abandoned one's remaining sentences.
    audio = b"".join(await _speak(engine, "Still here."))
    assert len(audio) / BYTES_PER_SECOND > 0.3
    assert _rms(audio) > 500


async def test_leaving_the_context_mid_stream_stops_synthesis(engine: EspeakEngine) -> None:
    before = engine.jobs_cancelled
    with trio.fail_after(5):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(LONG_TEXT)
            await stream.end_input()
            async for _chunk in stream.audio():
                break
    await _assert_stopped_and_reusable(engine, before)


async def test_trio_cancellation_mid_stream_stops_synthesis(engine: EspeakEngine) -> None:
    before = engine.jobs_cancelled
    got_audio = False
    with trio.CancelScope() as scope:
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(LONG_TEXT)
            async for _chunk in stream.audio():
                got_audio = True
                scope.cancel()
                await trio.sleep(1)  # the cancellation lands here
    assert got_audio and scope.cancelled_caught
    await _assert_stopped_and_reusable(engine, before)


async def test_exception_in_context_releases_the_stream(engine: EspeakEngine) -> None:
    before = engine.jobs_cancelled
    with pytest.raises(RuntimeError, match="boom"):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(LONG_TEXT)
            raise RuntimeError("boom")
    await _assert_stopped_and_reusable(engine, before)


async def test_unknown_language_falls_back_and_speaks(
    engine: EspeakEngine, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tts_streamer.adapters.espeak"):
        audio = b"".join(await _speak(engine, "Hello world.", VoiceSpec(language="xx-YY")))
    assert len(audio) / BYTES_PER_SECOND > 0.5
    assert _rms(audio) > 500
    assert any("xx-yy" in r.getMessage() for r in caplog.records)


async def test_regional_voice_and_gender_variant_speak(engine: EspeakEngine) -> None:
    audio = b"".join(
        await _speak(engine, "Bonjour tout le monde.", VoiceSpec(language="fr-CA", gender="female"))
    )
    assert len(audio) / BYTES_PER_SECOND > 0.5


async def test_bad_data_path_raises_voice_error(tmp_path: Path) -> None:
    bad = EspeakEngine(data_path=str(tmp_path))
    with trio.fail_after(2):
        with pytest.raises(VoiceError) as info:
            async with bad.open_stream(VoiceSpec()):
                pass  # pragma: no cover
        await bad.aclose()
    assert info.value.kind == "init"
    # Still alive, and a good engine still works afterwards.
    good = EspeakEngine()
    try:
        assert _rms(b"".join(await _speak(good, "Still alive."))) > 500
    finally:
        with trio.fail_after(2):
            await good.aclose()


async def test_bad_library_path_raises_voice_error() -> None:
    bad = EspeakEngine(library_path="/nonexistent/libespeak-ng.so")
    with trio.fail_after(2), pytest.raises(VoiceError):
        await bad.start()


async def test_closing_the_engine_ends_open_streams(engine: EspeakEngine) -> None:
    closed = False
    with trio.fail_after(3):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(LONG_TEXT)
            async for _chunk in stream.audio():
                if not closed:
                    await engine.aclose()
                    closed = True
            assert engine.open_streams == 1
        assert engine.open_streams == 0
        assert engine.jobs_running == 0
        # The engine restarts lazily.
        assert len(b"".join(await _speak(engine, "Back again."))) > 0


async def test_error_in_synth_callback_stops_the_job_and_fails_the_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The callback runs in the worker process: the fault is injected there (the encoder fails once).
    count = tmp_path / "encoder-calls"
    faulty = Path(__file__).with_name("espeak_faulty_worker.py")
    engine = EspeakEngine(workers=1, worker_command=[sys.executable, str(faulty), str(count)])
    try:
        with trio.fail_after(5), caplog.at_level(logging.ERROR, logger="tts_streamer.adapters.espeak"):
            async with engine.open_stream(VoiceSpec()) as stream:
                await stream.send_text(LONG_TEXT)
                await stream.end_input()
                with pytest.raises(VoiceError):
                    async for _chunk in stream.audio():
                        pass
        calls = count.stat().st_size
        assert any("encoder broke" in r.getMessage() for r in caplog.records)  # the worker's log, relayed
        # The same worker process speaks on.
        assert len(b"".join(await _speak(engine, "Recovered."))) > 0
        assert count.stat().st_size > calls
        before = count.stat().st_size
        await _speak(engine, split_sentences(LONG_TEXT)[1])
        per_sentence = count.stat().st_size - before
        # The callback returned 1; the lookahead sentence, queued behind it, is CANCELled (it may have
        # begun before the CANCEL came); the other 38 sentences never started.
        assert 1 <= calls <= 1 + per_sentence
        assert per_sentence > 5
    finally:
        with trio.fail_after(3):
            await engine.aclose()
