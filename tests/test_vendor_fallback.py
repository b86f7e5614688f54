"""The fallback chain: before first audio, mid-utterance (exact resume with progress, estimated without),
stalls, every vendor failing, and a flush during a fall-over.

The resume logic runs on the autojump clock with synthetic voices; the cross-vendor tests use the real
fakes (real clock), producing audio at about real time so a stall is heard as a gap at the simulator.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator

import boto3
import grpc
import pytest
import trio

from tests.fakes.elevenlabs import ElevenLabsFake
from tests.fakes.google_tts import GoogleTTSFake
from tests.fakes.polly import PollyFake
from tests.fakes.vendor_faults import Fault, fake_fill_byte
from tests.vendor_support import finished, frames_of, say, vendor_call, wait_until
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayFlush
from tts_streamer.adapters.elevenlabs import ElevenLabsEngine
from tts_streamer.adapters.engines import build_engines
from tts_streamer.adapters.fallback import FallbackEngine, VendorSwitch
from tts_streamer.adapters.google_tts import GoogleTTSEngine
from tts_streamer.adapters.piper_model import piper_unavailable_reason
from tts_streamer.adapters.polly import PollyEngine, make_client
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte
from tts_streamer.adapters.voice import VoiceEngine, VoiceError, VoiceSpec
from tts_streamer.adapters.voices import flow_variable_name, select_voice, voice_from_variables
from tts_streamer.simulator.asterisk import SimCall

SENTENCES = [f"This is sentence number {i}." for i in range(6)]
TEXT = " ".join(SENTENCES)
# About real time: 400 bytes (50 ms of audio) every 50 ms.
PACE = {"seconds_per_char": 0.015, "chunk_bytes": 400, "chunk_interval": 0.05, "first_audio_delay": 0.05}
SENTENCE_BYTES = 26 * 0.015 * 8000  # 3,120 bytes, 0.39 s


async def speak_direct(engine: VoiceEngine, *texts: str) -> tuple[bytes, object]:
    with trio.fail_after(30):
        async with engine.open_stream(VoiceSpec()) as stream:
            for text in texts:
                await stream.send_text(text)
            await stream.end_input()
            audio = b"".join([c async for c in stream.audio()])
    return audio, stream


def runs(audio_or_call: bytes | SimCall) -> list[int]:
    """The fill bytes heard, in order, each run once (silence left out)."""
    if isinstance(audio_or_call, bytes):
        data = audio_or_call
    else:
        data = b"".join(f.data for f in audio_or_call.played if f.bridged)
    return [k for k, _ in itertools.groupby(data) if k != 0xFF]


# --- resume logic, synthetic voices, autojump clock ---


async def test_failure_before_first_audio_hands_the_whole_utterance_over(autojump_clock):
    bad = SyntheticEngine(name="bad", fail_after_bytes=0)
    good = SyntheticEngine(name="good")
    spoken: list[str] = []
    fallback = FallbackEngine([bad, good], on_vendor=spoken.append, cooldown=0)
    audio, stream = await speak_direct(fallback, TEXT)
    assert runs(audio) == [fill_byte(s) for s in SENTENCES]
    assert spoken == ["good"] and stream.spoken_by == ["good"]  # type: ignore[attr-defined]
    (switch,) = fallback.switches
    assert (switch.from_vendor, switch.to_vendor, switch.resumed_at, switch.had_audio) == (
        "bad",
        "good",
        0,
        False,
    )


async def test_mid_utterance_failure_resumes_at_the_first_unit_not_fully_sent(autojump_clock):
    # 0.05 s per char: a 27-char sentence is 10,800 bytes; the estimate's upper bound (0.12 s/char + 0.6 s)
    # is 30,720 bytes, so after 40,000 bytes only the first sentence counts as fully sent.
    bad = SyntheticEngine(name="bad", fail_after_bytes=40_000)
    good = SyntheticEngine(name="good")
    fallback = FallbackEngine([bad, good], cooldown=0)
    audio, _ = await speak_direct(fallback, TEXT)
    fills = [fill_byte(s) for s in SENTENCES]
    heard = runs(audio)
    assert heard[:4] == fills[:4]  # the bad voice got 3.7 sentences out
    assert heard[4:] == fills[1:]  # the good one repeats from the first not surely complete, skips none
    assert fallback.switches[0].resumed_at == 1


async def test_a_silent_vendor_is_a_stall_and_the_next_speaks(autojump_clock):
    silent = SyntheticEngine(name="silent", first_audio_delay=60)
    good = SyntheticEngine(name="good")
    fallback = FallbackEngine([silent, good], first_audio_timeout=0.5, cooldown=0)
    start = trio.current_time()
    audio, _ = await speak_direct(fallback, TEXT)
    assert runs(audio) == [fill_byte(s) for s in SENTENCES]
    assert fallback.switches[0].kind == "stall" and trio.current_time() - start < 1
    assert silent.open_streams == 0


async def test_every_vendor_failing_is_one_clean_error(autojump_clock):
    first, second = (
        SyntheticEngine(name="a", fail_after_bytes=0),
        SyntheticEngine(name="b", fail_after_bytes=0),
    )
    fallback = FallbackEngine([first, second], cooldown=0)
    with pytest.raises(VoiceError, match="all voices failed") as info:
        await speak_direct(fallback, TEXT)
    assert info.value.kind == "injected" and [s.to_vendor for s in fallback.switches] == ["b", None]
    assert fallback.open_streams == first.open_streams == second.open_streams == 0


async def test_a_failed_vendor_is_skipped_during_its_cooldown(autojump_clock):
    bad, good = SyntheticEngine(name="bad", fail_after_bytes=0), SyntheticEngine(name="good")
    fallback = FallbackEngine([bad, good], cooldown=5)
    await speak_direct(fallback, "One.")
    await speak_direct(fallback, "Two.")
    assert bad.streams_opened == 1 and good.streams_opened == 2
    await trio.sleep(6)
    await speak_direct(fallback, "Three.")
    assert bad.streams_opened == 2


async def test_an_explicit_voice_goes_to_the_first_vendor_only(autojump_clock):
    seen: list[tuple[str, str]] = []

    class Recording(SyntheticEngine):
        def open_stream(self, voice: VoiceSpec):
            seen.append((self.name, voice.voice_id))
            return super().open_stream(voice)

    fallback = FallbackEngine([Recording(name="a", fail_after_bytes=0), Recording(name="b")], cooldown=0)
    async with fallback.open_stream(VoiceSpec(voice_id="a-voice")) as stream:
        await stream.send_text("Hello.")
        await stream.end_input()
        [c async for c in stream.audio()]
    assert seen == [("a", "a-voice"), ("b", "")]


# --- across the real fakes, real clock ---


@pytest.fixture
def google_fake() -> Iterator[GoogleTTSFake]:
    with GoogleTTSFake(**PACE) as f:  # type: ignore[arg-type]
        yield f


@pytest.fixture
def polly_fake() -> Iterator[PollyFake]:
    with PollyFake(seconds_per_char=0.015, chunk_bytes=800, chunk_interval=0.05, first_audio_delay=0.05) as f:
        yield f


@pytest.fixture
async def eleven_fake(nursery: trio.Nursery) -> ElevenLabsFake:
    fake = ElevenLabsFake(**PACE)  # type: ignore[arg-type]
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def chain(
    eleven_fake: ElevenLabsFake, google_fake: GoogleTTSFake, polly_fake: PollyFake
) -> AsyncIterator[tuple[FallbackEngine, list[VendorSwitch]]]:
    eleven = ElevenLabsEngine("test-key", base_url=eleven_fake.base_url, response_timeout=5)
    google = GoogleTTSEngine(channel=grpc.insecure_channel(google_fake.address), response_timeout=5)
    session = boto3.Session(aws_access_key_id="AKIDTEST", aws_secret_access_key="x", region_name="us-east-1")
    polly = PollyEngine(make_client(session, endpoint_url=polly_fake.endpoint_url, read_timeout=2))
    switches: list[VendorSwitch] = []
    fallback = FallbackEngine(
        [eleven, google, polly],
        first_audio_timeout=0.6,
        stall_timeout=0.4,
        cooldown=0,
        on_switch=switches.append,
    )
    yield fallback, switches
    await google.aclose()


def silence_during_fallback(call: SimCall) -> float:
    """The longest silence between two heard frames, from the simulator's gaps (seconds)."""
    return max((gap.ticks for gap in call.gaps), default=0) * 0.020


@pytest.mark.realtime
async def test_elevenlabs_failing_before_first_audio_google_speaks_it_all(chain, eleven_fake, nursery):
    fallback, switches = chain
    eleven_fake.faults.add(Fault("error", after_bytes=0))
    async with vendor_call(fallback, nursery) as (sup, sink, call):
        await say(sup, TEXT)
        await finished(sink, within=8)
    assert runs(call) == [fake_fill_byte(s) for s in SENTENCES]
    assert [(s.from_vendor, s.to_vendor, s.had_audio) for s in switches] == [("elevenlabs", "gcp", False)]
    assert not sink.of(ev.SessionError)


@pytest.mark.realtime
async def test_elevenlabs_failing_mid_utterance_google_speaks_the_rest(chain, eleven_fake, nursery):
    fallback, switches = chain
    eleven_fake.faults.add(Fault("drop", after_bytes=4400))  # in the middle of the second sentence
    async with vendor_call(fallback, nursery) as (sup, sink, call):
        await say(sup, TEXT)
        await finished(sink, within=8)
    fills = [fake_fill_byte(s) for s in SENTENCES]
    (switch,) = switches
    assert (switch.from_vendor, switch.to_vendor, switch.had_audio) == ("elevenlabs", "gcp", True)
    assert switch.resumed_at == 1  # exact, from ElevenLabs' alignment: sentence 0 was complete
    assert runs(call) == fills  # in order, nothing skipped...
    # ...and sentence 1 restarts: its first part from ElevenLabs, then all of it from Google.
    from_elevenlabs = 4400 - SENTENCE_BYTES
    assert frames_of(call, SENTENCES[1]) >= (from_elevenlabs + SENTENCE_BYTES) // 160 - 1
    assert frames_of(call, SENTENCES[0]) <= SENTENCE_BYTES // 160 + 1
    gap = silence_during_fallback(call)
    print(f"silence heard during the fallback: {gap:.3f} s")  # reported with pytest -s
    assert gap < 1.0, f"caller heard {gap:.2f} s of silence"


@pytest.mark.realtime
async def test_google_stalling_mid_utterance_polly_speaks_the_rest(chain, eleven_fake, google_fake, nursery):
    fallback, switches = chain
    eleven_fake.faults.add(Fault("error", after_bytes=0))
    google_fake.faults.add(Fault("stall", after_bytes=4000))  # in the second sentence
    async with vendor_call(fallback, nursery) as (sup, sink, call):
        await say(sup, TEXT)
        await finished(sink, within=10)
    assert [(s.from_vendor, s.to_vendor, s.kind) for s in switches] == [
        ("elevenlabs", "gcp", "vendor_error"),
        ("gcp", "aws", "stall"),
    ]
    fills = [fake_fill_byte(s) for s in SENTENCES]
    heard = runs(call)
    resumed = switches[1].resumed_at
    # Estimated: 4,000 bytes is under the upper bound of even the first sentence (7,296 bytes), so it
    # starts over, although the fast fake had in fact finished it.
    assert resumed == 0
    assert heard[-len(fills) + resumed :] == fills[resumed:] and set(heard) == set(fills)
    gap = silence_during_fallback(call)
    print(f"silence heard during the fallback: {gap:.3f} s")  # reported with pytest -s
    assert gap < 1.0, f"caller heard {gap:.2f} s of silence"
    await wait_until(lambda: not google_fake.open_rpcs, 1, "the stalled RPC was cancelled")


@pytest.mark.realtime
async def test_flush_during_a_fallback_releases_every_vendor(chain, eleven_fake, google_fake, nursery):
    fallback, _ = chain
    eleven_fake.faults.add(Fault("drop", after_bytes=1500))
    async with vendor_call(fallback, nursery) as (sup, sink, call):
        await say(sup, TEXT * 2, finish=False)
        await wait_until(lambda: google_fake.open_rpcs, 3, "google took over")
        await sup.call("c1", SayFlush())
        assert fallback.open_streams == 0
        await wait_until(
            lambda: not google_fake.open_rpcs and not eleven_fake.open_connections, 0.5, "all released"
        )
        await sup.call("c1", SayAdd("After the flush."))
        await sup.call("c1", SayFinish())
        await finished(sink, within=5)
    assert frames_of(call, "After the flush.") > 0


# --- voice selection and engine building ---


@pytest.mark.parametrize(
    ("vendor", "spec", "voice"),
    [
        ("gcp", VoiceSpec(language="ja-JP", gender="female"), "ja-JP-Chirp3-HD-Aoede"),
        ("gcp", VoiceSpec(language="en_us"), "en-US-Chirp3-HD-Charon"),
        ("gcp", VoiceSpec(language="zh-CN", gender="male"), "cmn-CN-Chirp3-HD-Charon"),
        ("gcp", VoiceSpec(language="xx-YY"), "en-US-Chirp3-HD-Charon"),
        ("aws", VoiceSpec(language="ja", gender="male"), "Takumi"),
        ("aws", VoiceSpec(language="ko-KR", gender="male"), "Seoyeon"),  # no male voice: the female one
        ("aws", VoiceSpec(language="fr-FR", voice_id="Celine"), "Celine"),
        ("elevenlabs", VoiceSpec(language="de-DE", gender="male"), "JBFqnCBsd6RMkjVDRZzb"),
    ],
)
def test_voice_selection_matches_bcp47(vendor: str, spec: VoiceSpec, voice: str) -> None:
    assert select_voice(vendor, spec).voice_id == voice


def test_flow_variables_pick_the_voice_unless_one_is_explicit() -> None:
    variables = {
        "voipbin.tts.gcp.voice_id": "en-GB-Chirp3-HD-Kore",
        "voipbin.tts.elevenlabs.voice_id": "short",
    }
    assert flow_variable_name("aws") == "voipbin.tts.aws.voice_id"
    assert select_voice("gcp", VoiceSpec(), variables).source == "flow_variable"
    assert select_voice("gcp", VoiceSpec(voice_id="x"), variables).voice_id == "x"
    assert voice_from_variables("elevenlabs", variables) is None  # not a 20-character voice id


def test_build_engines_reports_missing_credentials_and_builds_the_chain(polly_fake: PollyFake) -> None:
    engines, unavailable = build_engines({})
    # The offline voices need no credentials: espeak-ng always, Piper where its extra is installed.
    offline = {"espeak"} if piper_unavailable_reason(default_voice=True) else {"espeak", "piper"}
    assert set(engines) == offline
    assert set(unavailable) - {"piper"} == {"elevenlabs", "gcp", "aws"}
    assert "ELEVENLABS_API_KEY" in unavailable["elevenlabs"]
    env = {
        "ELEVENLABS_API_KEY": "k",
        "GCP_TTS_ENDPOINT": "127.0.0.1:1",
        "GCP_TTS_INSECURE": "1",
        "AWS_ACCESS_KEY_ID": "AKIDTEST",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_REGION": "us-east-1",
        "POLLY_ENDPOINT_URL": polly_fake.endpoint_url,
        "VOICE_FALLBACK_CHAIN": "elevenlabs -> google, polly, offline, nonsense",
    }
    engines, unavailable = build_engines(env)
    assert unavailable == {} and set(engines) == {"elevenlabs", "gcp", "aws", "fallback"} | offline
    fallback = engines["fallback"]
    assert isinstance(fallback, FallbackEngine)
    assert [e.name for e in fallback.chain] == ["elevenlabs", "gcp", "aws", "espeak"]
    engines, unavailable = build_engines({"VOICE_FALLBACK_CHAIN": "elevenlabs,gcp,espeak"})
    assert [e.name for e in engines["fallback"].chain] == ["espeak"]  # type: ignore[attr-defined]
