"""``POST /v1/speeches``: batch TTS to a WAV file that call-manager plays (``sound:<media_filepath>``).

As the Go tts-manager (shared/reference/voipbin-wire.md §4.4): text that is not XML is wrapped in
``<speak>…</speak>``; the file is an 8 kHz 16-bit linear WAV named by the hex SHA-1 of (normalised text
+ language + provider + voice) + ``.wav`` in the media directory, and an existing file is a cache hit;
the reply's ``media_filepath`` is ``http://<POD_IP as a pod DNS name>[:port]/<file>`` (no port when it
is 80; MEDIA_DIR=/shared-data and MEDIA_URL_PORT=80 reproduce the Go deployment's files and URLs).
Providers are tried in Go's order (``aws``: AWS then GCP; otherwise GCP then AWS; a fallback uses an
empty voice), with the embedded offline voice last, so the route works without cloud credentials.

Beyond Go: identical requests that arrive together synthesise once (the others wait for that file);
text with bare ``&``/``<`` is escaped when wrapped (Go answers 500); the directory is bounded (least
recently used files, by access time, are removed past ``max_bytes``); the daemon serves the directory
itself (supervisor/services/media_http.py). The directory itself is ``adapters/media_files.py``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, Final
from xml.sax.saxutils import escape

import attrs
import numpy as np
import trio

from tts_streamer.adapters.codecs import ulaw_decode
from tts_streamer.adapters.media_files import MediaCache as MediaCache  # its former home
from tts_streamer.adapters.voice import VoiceEngine, VoiceError, VoiceSpec
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Response
from tts_streamer.adapters.voipbin.models import Speech, SpeechCreate
from tts_streamer.adapters.voipbin.routes import RouteName
from tts_streamer.adapters.voipbin.wire import WireError
from tts_streamer.adapters.wav import pcm16_wav_bytes
from tts_streamer.supervisor.services.command_plane import Handler
from tts_streamer.supervisor.services.route_table import with_body

log = logging.getLogger(__name__)

OFFLINE_ENGINE: Final = "espeak"
POD_DNS_SUFFIX: Final = ".bin-manager.pod.cluster.local"
WAV_SUFFIX: Final = ".wav"
MAX_AUDIO_SECONDS: Final = 600  # a runaway engine cannot fill the disk: 10 min of 8 kHz audio at most
_MAX_ULAW_BYTES: Final = 8000 * MAX_AUDIO_SECONDS


# ------------------------------------------------------------------------------------------ text rules


def _parse_xml(text: str) -> ET.Element | None:
    """The document element if ``text`` is one well-formed XML document; no DTDs or entities."""
    if not text.lstrip().startswith("<") or "<!DOCTYPE" in text or "<!ENTITY" in text:
        return None
    try:
        return ET.fromstring(text.strip())
    except ET.ParseError:
        return None


def normalize_text(text: str) -> str:
    """SSML stays as given; anything else is wrapped in ``<speak>`` (escaped, so it stays valid XML)."""
    return text if _parse_xml(text) is not None else f"<speak>{escape(text)}</speak>"


def spoken_text(ssml: str) -> str:
    """The words of normalised SSML, for engines that take plain text (markup is dropped)."""
    root = _parse_xml(ssml)
    words = ssml if root is None else " ".join(root.itertext())
    return " ".join(words.split())


def media_name(normalized: str, language: str, provider: str, voice_id: str) -> str:
    digest = hashlib.sha1(
        (normalized + language + provider + voice_id).encode("utf-8"), usedforsecurity=False
    )
    return digest.hexdigest() + WAV_SUFFIX


def media_host(pod_ip: str) -> str:
    """Go's rule: an IP becomes its pod DNS name (``10.164.0.12`` -> ``10-164-0-12`` + suffix), anything
    else is used verbatim (Compose sets a container name). Empty (a dev machine): ``127.0.0.1``."""
    if not pod_ip:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(pod_ip)
    except ValueError:
        return pod_ip
    return str(address).replace(".", "-").replace(":", "-") + POD_DNS_SUFFIX


def media_base_url(pod_ip: str, port: int) -> str:
    """``http://host`` plus ``:port`` unless the files are served on 80 (Go's URLs have no port)."""
    host = media_host(pod_ip)
    return f"http://{host}" if port == 80 else f"http://{host}:{port}"


def media_url_port(configured: int, served: int | None) -> int:
    """The port in ``media_filepath``: MEDIA_URL_PORT when set, else the port the daemon serves the
    files on, else 80 (another web server serves the directory, as the Go deployment's sidecar did)."""
    if configured:
        return configured
    return served if served is not None else 80


def offline_engine_name(engines: Mapping[str, object], default: str) -> str:
    """The last resort: the embedded espeak voice when the daemon has it, else its default engine."""
    return OFFLINE_ENGINE if OFFLINE_ENGINE in engines else default


def provider_chain(provider: str, voice_id: str, offline: str) -> list[tuple[str, str]]:
    """(provider, voice) in the order they are tried; fallbacks get an empty voice."""
    first, second = ("aws", "gcp") if provider == "aws" else ("gcp", "aws")
    chain = [(first, voice_id), (second, "")]
    if offline not in (first, second):
        chain.append((offline, ""))
    return chain


# ------------------------------------------------------------------------------------------ the service


class SpeechFailed(Exception):
    pass


@attrs.define(eq=False)
class _Flight:
    """One synthesis in progress; identical requests wait for it instead of starting their own."""

    done: trio.Event = attrs.field(factory=trio.Event)
    ok: bool = False


@attrs.define
class SpeechStats:
    requests: int = 0
    cache_hits: int = 0
    synthesized: int = 0
    joined: int = 0  # requests that waited for an identical one in flight
    fallbacks: int = 0
    errors: int = 0
    by_engine: dict[str, int] = attrs.field(factory=dict)


class SpeechService:
    def __init__(
        self,
        engines: Mapping[str, VoiceEngine],
        cache: MediaCache,
        *,
        base_url: str,
        offline_engine: str = OFFLINE_ENGINE,
        timeout: float = 9.0,
        attempt_timeout: float = 6.0,
    ) -> None:
        self.stats = SpeechStats()
        self.cache = cache
        self.base_url = base_url
        self._engines = engines
        self._offline = offline_engine
        self._timeout = timeout
        self._attempt_timeout = attempt_timeout
        self._flights: dict[str, _Flight] = {}

    def routes(self) -> dict[RouteName, Handler]:
        return {RouteName.SPEECH_CREATE: with_body(self.create)}

    async def create(self, data: Any) -> Response:
        self.stats.requests += 1
        try:
            request = SpeechCreate.from_data(data)
        except WireError as exc:
            log.info("speech: bad request: %s", exc.reason)
            self.stats.errors += 1
            return envelope.plain_error(500)
        try:
            with trio.fail_after(self._timeout):
                speech = await self.synthesize(request)
        except (SpeechFailed, trio.TooSlowError) as exc:
            log.warning("speech for call %s failed: %s", request.call_id, exc or "timed out")
            self.stats.errors += 1
            return envelope.plain_error(500)
        return envelope.ok(speech.to_data())

    async def synthesize(self, request: SpeechCreate) -> Speech:
        normalized = normalize_text(request.text)
        words = spoken_text(normalized)
        if not words:
            raise SpeechFailed("no text to speak")
        for attempt, (provider, voice_id) in enumerate(
            provider_chain(request.provider, request.voice_id, self._offline)
        ):
            name = media_name(normalized, request.language, provider, voice_id)
            if attempt:
                self.stats.fallbacks += 1
            if await self._produce(name, provider, voice_id, request.language, words):
                return Speech(
                    provider=provider,
                    voice_id=voice_id,
                    text=normalized,
                    language=request.language,
                    media_filepath=f"{self.base_url}/{name}",
                )
        raise SpeechFailed("no provider could speak it")

    async def _produce(self, name: str, provider: str, voice_id: str, language: str, words: str) -> bool:
        """Make sure ``name`` exists: cached, being made by an identical request, or made here."""
        flight = self._flights.get(name)
        if flight is not None:
            self.stats.joined += 1
            await flight.done.wait()
            return flight.ok
        if await self.cache.hit(name):
            self.stats.cache_hits += 1
            return True
        engine = self._engines.get(provider)
        if engine is None:
            return False
        flight = self._flights.get(name)  # another request may have started it while we looked
        if flight is not None:
            self.stats.joined += 1
            await flight.done.wait()
            return flight.ok
        flight = self._flights[name] = _Flight()
        voice = VoiceSpec(language=language or "en-US", voice_id=voice_id)
        try:
            # Each provider gets a bounded try, so a hung vendor still leaves time for the fallback.
            with trio.move_on_after(self._attempt_timeout) as attempt:
                audio = await self._speak(engine, voice, words)
                await self.cache.store(name, pcm16_wav_bytes(ulaw_decode(audio).astype("<i2").tobytes()))
                flight.ok = True
                self.stats.synthesized += 1
                self.stats.by_engine[provider] = self.stats.by_engine.get(provider, 0) + 1
            if attempt.cancelled_caught:
                log.warning("speech: %s gave no complete audio within %s s", provider, self._attempt_timeout)
        except Exception as exc:  # any vendor failure means "try the next provider"
            log.warning("speech: %s failed: %r", provider, exc)
        finally:
            del self._flights[name]
            flight.done.set()
        return flight.ok

    async def _speak(self, engine: VoiceEngine, voice: VoiceSpec, words: str) -> bytes:
        audio = bytearray()
        async with engine.open_stream(voice) as stream:
            await stream.send_text(words)
            await stream.end_input()
            async for chunk in stream.audio():
                audio += chunk
                if len(audio) > _MAX_ULAW_BYTES:
                    raise VoiceError(f"more than {MAX_AUDIO_SECONDS} s of audio", kind="too_long")
        if not audio:
            raise VoiceError("the engine produced no audio", kind="no_audio")
        return bytes(audio)


def audio_level(samples: bytes) -> float:
    """RMS of 16-bit little-endian PCM, 0..1 (for tests and logs)."""
    pcm = np.frombuffer(samples, dtype="<i2").astype(np.float64)
    return 0.0 if pcm.size == 0 else float(np.sqrt(np.mean(pcm**2)) / 32768.0)
