"""The voices a bench scenario speaks with, in the driver (the daemon side), and their texts.

- ``synthetic``: the bench's SyntheticEngine (pre-encoded mu-law at ``speed`` times real time);
- ``espeak``: the shipped espeak-ng adapter, in the measured process as ``serve`` runs it;
- ``gcp``, ``elevenlabs``, ``aws``: the real cloud adapters against their loopback fakes, which run in
  another process (``bench.vendor_fakes``, behind TLS proxies with a one-way delay), as a vendor does.

Every engine is wrapped in ``TimedEngine``, which stamps the first audio chunk of each utterance
(``time.monotonic()``), keyed by the bench call id found in ``CALL`` (a context variable the driver
sets before ``start_session``; Trio copies it into the session's tasks), so voice ids stay the
engine's own.
"""

from __future__ import annotations

import contextvars
import itertools
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import boto3
import grpc

from bench.netem import Certificates
from tts_streamer.adapters.elevenlabs import ElevenLabsEngine
from tts_streamer.adapters.google_tts import CHANNEL_OPTIONS, GoogleTTSEngine
from tts_streamer.adapters.polly import PollyEngine, make_client
from tts_streamer.adapters.synthetic import SyntheticEngine, tone
from tts_streamer.adapters.voice import VoiceEngine, VoiceSession, VoiceSpec, VoiceStream, open_session

CALL: contextvars.ContextVar[str] = contextvars.ContextVar("bench_call", default="")
SYNTHETIC_SECONDS_PER_CHAR = 0.05
FAKE_SECONDS_PER_CHAR = 0.05  # the three fakes' default
CHARS_PER_TEXT = 40  # synthetic: one say_add per text, rendered one text at a time

# Ordinary English sentences for the real voices (espeak-ng pronounces them; the fakes only count them).
_SENTENCES = (
    "Thank you for calling, your request has been received and is being processed now.",
    "Please hold the line while we look up the details of your account for you.",
    "The next available agent will be with you in a few minutes, thank you for waiting.",
    "You can also visit our website at any time to check the status of your order.",
    "If you would like to hear these options again, please stay on the line.",
    "Our offices are open from nine in the morning until six in the evening on weekdays.",
)


def cloud_engine(name: str, ports: dict[str, int], certs: Certificates) -> VoiceEngine:
    """A real cloud adapter pointed at its fake's TLS proxy on 127.0.0.1, trusting the run's CA."""
    if name == "gcp":
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_pem)
        channel = grpc.secure_channel(f"localhost:{ports['gcp']}", credentials, options=CHANNEL_OPTIONS)
        return GoogleTTSEngine(channel=channel)
    if name == "aws":
        session = boto3.Session(aws_access_key_id="A", aws_secret_access_key="x", region_name="us-east-1")
        url = f"https://localhost:{ports['aws']}"
        return PollyEngine(make_client(session, endpoint_url=url, verify=str(certs.ca_file)))
    if name == "elevenlabs":
        url = f"wss://localhost:{ports['elevenlabs']}"
        return ElevenLabsEngine("test-key", base_url=url, ssl_context=certs.client_context())
    raise ValueError(f"unknown cloud engine {name!r}")


def build_engine(cfg: dict[str, Any], pattern_free: bool) -> tuple[VoiceEngine, float]:
    """The scenario's engine and its seconds of audio per character of text (for sizing texts)."""
    name = cfg.get("engine", "synthetic")
    if name == "synthetic":
        pattern = None if pattern_free else tone(440.0, 1.0)
        engine = SyntheticEngine(
            seconds_per_char=SYNTHETIC_SECONDS_PER_CHAR,
            speed=float(cfg["speed"]),
            chunk_bytes=800,
            pattern=pattern,
        )
        return engine, SYNTHETIC_SECONDS_PER_CHAR
    if name == "espeak":
        from tts_streamer.adapters.espeak import EspeakEngine

        return EspeakEngine(), float(cfg.get("espeak_seconds_per_char", 0.059))
    folder = Path(cfg["cert_dir"])
    certs = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    ports = {k: int(v) for k, v in cfg["vendor_ports"].items()}
    return cloud_engine(name, ports, certs), FAKE_SECONDS_PER_CHAR


async def seconds_of_audio_per_char(engine: VoiceEngine) -> float:
    """What one of the bench's sentences takes to say, per character (espeak-ng: ~0.06 s at 175 wpm)."""
    text = " ".join(_SENTENCES)
    size = 0
    async with engine.open_stream(VoiceSpec()) as stream:
        await stream.send_text(text)
        await stream.end_input()
        async with aclosing(stream.audio()) as chunks:
            async for chunk in chunks:
                size += len(chunk)
    return size / 8000 / len(text)


def texts_for(seconds: float, char: str, engine: str, seconds_per_char: float) -> list[str]:
    """Texts that together make about ``seconds`` of audio, one say_add each."""
    if engine == "synthetic":
        chars = round(seconds / seconds_per_char)
        full, rest = divmod(chars, CHARS_PER_TEXT)
        return [char * CHARS_PER_TEXT] * full + ([char * rest] if rest else [])
    out: list[str] = []
    total = 0.0
    for sentence in itertools.cycle(_SENTENCES):
        if total >= seconds:
            return out
        out.append(sentence)
        total += len(sentence) * seconds_per_char
    raise AssertionError("unreachable")


class TimedStream:
    """Wraps a vendor stream: the time its first audio chunk came out (the vendor's first byte)."""

    def __init__(self, inner: VoiceStream, times: list[float]) -> None:
        self._inner = inner
        self._times = times

    async def send_text(self, text: str) -> None:
        await self._inner.send_text(text)

    async def end_input(self) -> None:
        await self._inner.end_input()

    async def audio(self) -> AsyncGenerator[bytes, None]:
        import time

        first = True
        async with aclosing(self._inner.audio()) as chunks:
            async for chunk in chunks:
                if first and chunk:
                    first = False
                    self._times.append(time.monotonic())
                yield chunk


class _TimedSession:
    def __init__(self, inner: VoiceSession, times: list[float]) -> None:
        self._inner = inner
        self._times = times

    @asynccontextmanager
    async def open_stream(self) -> AsyncIterator[TimedStream]:
        async with self._inner.open_stream() as stream:
            yield TimedStream(stream, self._times)


class TimedEngine:
    """An engine whose utterances report their first audio byte per bench call (``CALL``)."""

    def __init__(self, inner: VoiceEngine) -> None:
        self.name = "bench"
        self.inner = inner
        self.first_audio: dict[str, list[float]] = {}

    @property
    def open_streams(self) -> int:
        return self.inner.open_streams

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[TimedStream]:
        times = self.first_audio.setdefault(CALL.get(), [])
        async with self.inner.open_stream(voice) as stream:
            yield TimedStream(stream, times)

    @asynccontextmanager
    async def open_session(self, voice: VoiceSpec) -> AsyncIterator[_TimedSession]:
        # The inner engine's own session when it has one (ElevenLabs' socket per call).
        times = self.first_audio.setdefault(CALL.get(), [])
        async with open_session(self.inner, voice) as session:
            yield _TimedSession(session, times)

    async def warm(self) -> None:
        from tts_streamer.adapters.engines import warm_engine

        problem = await warm_engine(self.inner, within=10.0)
        if problem:
            raise RuntimeError(problem)

    async def aclose(self) -> None:
        aclose = getattr(self.inner, "aclose", None)
        if aclose is not None:
            await aclose()
