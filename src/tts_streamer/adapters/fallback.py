"""A VoiceEngine that speaks through a chain of engines, falling over to the next one mid-utterance.

Text is split into units (sentences; a trailing fragment of a ``send_text`` is a unit too) and fed to the
current vendor one unit per ``send_text``, so the stream knows which units each vendor was given. When a
vendor fails (VoiceError from ``open_stream`` or ``audio()``, any other exception, or no audio when it owes
some), the next vendor in the chain opens a stream and is fed from the **first unit not yet fully sent**:

* A vendor that reports progress (``inputs_spoken``: inputs whose audio it has fully yielded; Polly knows
  it per request, ElevenLabs from its character alignment) gives the exact unit.
* Otherwise (Google, espeak) it is estimated from the audio bytes received: a unit counts as fully sent
  only once the bytes exceed an **upper bound** of its duration (``max_seconds_per_char`` per character plus
  ``unit_pause``, over the speaking rate). Speech is nearly always shorter than the bound, so the estimate
  errs towards repeating the unit that was being spoken (heard twice, in part) and never skips one.

"Owes audio" (for the stall check) is, with progress: a fed unit not yet spoken; without: fewer bytes than
a **lower bound** (``min_seconds_per_char``) for the units fed, or input ended and the audio not finished.
A vendor that goes quiet while owing audio for ``stall_timeout`` (``first_audio_timeout`` before its first
audio) is treated as failed. Everything a vendor produced before failing still plays; the next vendor's
audio follows in the same pipe, so the caller hears the gap only (see docs/vendors.md for measurements).
An explicit voice id goes to the chain's first engine only (it names that vendor's voice); the others use
their table voice for the language and gender. A vendor that failed is skipped by new streams for
``cooldown`` seconds. ``spoken_by`` on the stream and the ``on_vendor``/``on_switch`` callbacks say who spoke.

``open_session`` opens every link's session eagerly (so ElevenLabs' socket is up before the first say);
a link whose session fails to open is logged and used one stream per utterance instead, so a broken
link never fails the session start: it fails, and is fallen over, per utterance as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing, asynccontextmanager
from typing import Protocol, runtime_checkable

import attrs
import trio

from tts_streamer.adapters.vendor_stream import AudioPipe, background_nursery, split_sentences
from tts_streamer.adapters.voice import (
    StreamPerUtterance,
    VoiceEngine,
    VoiceError,
    VoiceSession,
    VoiceSpec,
    VoiceStream,
    open_session,
)
from tts_streamer.adapters.voice import (
    VendorSwitch as VendorSwitch,  # was defined here: its importers keep working
)
from tts_streamer.exceptions import first_of, leaves

log = logging.getLogger(__name__)
BYTES_PER_SECOND = 8000


@runtime_checkable
class ReportsProgress(Protocol):
    @property
    def inputs_spoken(self) -> int: ...


@attrs.define
class _Attempt:
    engine: VoiceEngine
    start: int  # first unit this vendor speaks
    started_at: float
    fed: int = 0  # units fed to it, counted from ``start``
    bytes: int = 0
    last_activity: float = 0.0
    got_audio: bool = False
    input_done: bool = False
    stream: VoiceStream | None = None
    activity: trio.Event = attrs.Factory(trio.Event)

    def touch(self) -> None:
        self.last_activity = trio.current_time()
        self.activity.set()
        self.activity = trio.Event()


class FallbackEngine:
    name = "fallback"

    def __init__(
        self,
        chain: Sequence[VoiceEngine],
        *,
        first_audio_timeout: float = 2.0,
        stall_timeout: float = 1.0,
        max_seconds_per_char: float = 0.12,
        min_seconds_per_char: float = 0.02,
        unit_pause: float = 0.6,
        cooldown: float = 10.0,
        on_vendor: Callable[[str], None] | None = None,
        on_switch: Callable[[VendorSwitch], None] | None = None,
    ) -> None:
        if not chain:
            raise ValueError("a fallback chain needs at least one engine")
        self.chain = list(chain)
        self.first_audio_timeout = first_audio_timeout
        self.stall_timeout = stall_timeout
        self.max_seconds_per_char = max_seconds_per_char
        self.min_seconds_per_char = min_seconds_per_char
        self.unit_pause = unit_pause
        self.cooldown = cooldown
        self.on_vendor = on_vendor
        self.on_switch = on_switch
        self.switches: list[VendorSwitch] = []
        self._down_until: dict[str, float] = {}
        self._open = 0
        self._sessions = 0

    @property
    def open_streams(self) -> int:
        return self._open

    @property
    def open_sessions(self) -> int:
        return self._sessions

    def link_voice(self, engine: VoiceEngine, voice: VoiceSpec) -> VoiceSpec:
        """An explicit voice id names the first engine's voice; the others use their table voice."""
        return voice if engine is self.chain[0] else attrs.evolve(voice, voice_id="")

    @asynccontextmanager
    async def open_session(self, voice: VoiceSpec) -> AsyncIterator[FallbackSession]:
        async with AsyncExitStack() as stack:
            sessions: dict[int, VoiceSession] = {}
            for engine in self.chain:
                link_voice = self.link_voice(engine, voice)
                try:
                    sessions[id(engine)] = await stack.enter_async_context(open_session(engine, link_voice))
                except Exception as exc:
                    log.warning(
                        "voice %s: session did not open (%s); one stream per utterance", engine.name, exc
                    )
                    sessions[id(engine)] = StreamPerUtterance(engine, link_voice)
            self._sessions += 1
            try:
                yield FallbackSession(self, voice, sessions)
            finally:
                self._sessions -= 1

    def open_stream(self, voice: VoiceSpec) -> AbstractAsyncContextManager[FallbackStream]:
        return self._open_stream(voice, {})

    @asynccontextmanager
    async def _open_stream(
        self, voice: VoiceSpec, sessions: dict[int, VoiceSession]
    ) -> AsyncIterator[FallbackStream]:
        stream = FallbackStream(self, voice, sessions)
        self._open += 1
        try:
            async with background_nursery("fallback") as nursery:
                nursery.start_soon(stream._run, name="fallback-run")
                yield stream
        finally:
            self._open -= 1
            stream.pipe.close()

    def _usable(self) -> list[VoiceEngine]:
        now = trio.current_time()
        usable = [e for e in self.chain if self._down_until.get(e.name, -math.inf) <= now]
        return usable or self.chain[-1:]  # the last resort is always tried

    def _mark_down(self, name: str) -> None:
        if self.cooldown > 0:
            self._down_until[name] = trio.current_time() + self.cooldown


class FallbackSession:
    """One call on the chain: each link's own session, opened with the chain's."""

    def __init__(self, engine: FallbackEngine, voice: VoiceSpec, sessions: dict[int, VoiceSession]) -> None:
        self._engine = engine
        self.voice = voice
        self._sessions = sessions

    def open_stream(self) -> AbstractAsyncContextManager[FallbackStream]:
        return self._engine._open_stream(self.voice, self._sessions)


class FallbackStream:
    def __init__(
        self, engine: FallbackEngine, voice: VoiceSpec, sessions: dict[int, VoiceSession] | None = None
    ) -> None:
        self._engine = engine
        self.voice = voice
        self._sessions = sessions or {}
        self.pipe = AudioPipe()
        self.units: list[str] = []
        self.spoken_by: list[str] = []
        self.switches: list[VendorSwitch] = []
        self._input_ended = False
        self._changed = trio.Event()

    async def send_text(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        if self._input_ended:
            raise trio.ClosedResourceError("stream input already ended")
        self.units.extend(split_sentences(text))
        self._notify()

    async def end_input(self) -> None:
        await trio.lowlevel.checkpoint()
        self._input_ended = True
        self._notify()

    def audio(self) -> AsyncGenerator[bytes, None]:
        return self.pipe.audio()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- the run ---

    async def _run(self) -> None:
        engines = self._engine._usable()
        start = 0
        for n, engine in enumerate(engines):
            voice = self._engine.link_voice(engine, self.voice)
            attempt = _Attempt(engine, start, trio.current_time())
            try:
                await self._speak(attempt, voice)
            except BaseException as exc:
                if any(not isinstance(leaf, Exception) for leaf in leaves(exc)):
                    raise  # cancelled (flush or stop): nothing to fall back for
                error = _as_voice_error(exc, engine.name)
            else:
                self.pipe.finish()
                return
            start = self._resume_point(attempt)
            next_name = engines[n + 1].name if n + 1 < len(engines) else None
            self._record(attempt, error, start, next_name)
            self._engine._mark_down(engine.name)
            if next_name is None:
                self.pipe.fail(VoiceError(f"all voices failed; last: {error}", kind=error.kind))
                return
            if self._input_ended and start >= len(self.units):
                self.pipe.finish()  # everything was spoken before the vendor broke down
                return

    async def _speak(self, attempt: _Attempt, voice: VoiceSpec) -> None:
        session = self._sessions.get(id(attempt.engine))
        opened = session.open_stream() if session is not None else attempt.engine.open_stream(voice)
        async with opened as inner, trio.open_nursery() as nursery:
            attempt.stream = inner
            attempt.last_activity = trio.current_time()
            nursery.start_soon(self._feed, attempt, inner, name=f"fallback-feed[{attempt.engine.name}]")
            nursery.start_soon(self._watch, attempt, name=f"fallback-watch[{attempt.engine.name}]")
            async with aclosing(inner.audio()) as chunks:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    if not attempt.got_audio:
                        attempt.got_audio = True
                        self._spoke(attempt.engine.name)
                    attempt.bytes += len(chunk)
                    self.pipe.put(chunk)
                    attempt.touch()
            if not attempt.input_done:
                raise VoiceError(f"{attempt.engine.name} ended its audio before its input", kind="protocol")
            nursery.cancel_scope.cancel()

    async def _feed(self, attempt: _Attempt, inner: VoiceStream) -> None:
        while True:
            while attempt.start + attempt.fed < len(self.units):
                await inner.send_text(self.units[attempt.start + attempt.fed])
                attempt.fed += 1
                attempt.touch()
            if self._input_ended:
                await inner.end_input()
                attempt.input_done = True
                attempt.touch()
                return
            await self._changed.wait()

    async def _watch(self, attempt: _Attempt) -> None:
        while True:
            deadline = self._deadline(attempt)
            with trio.move_on_at(deadline):
                await attempt.activity.wait()
                continue
            if self._deadline(attempt) <= trio.current_time():
                what = "no first audio" if not attempt.got_audio else "audio stalled"
                quiet = trio.current_time() - attempt.last_activity
                raise VoiceError(f"{attempt.engine.name}: {what} for {quiet:.2f} s", kind="stall")

    def _deadline(self, attempt: _Attempt) -> float:
        if not self._owes(attempt):
            return math.inf
        if not attempt.got_audio:
            return attempt.last_activity + self._engine.first_audio_timeout
        return attempt.last_activity + self._engine.stall_timeout

    def _owes(self, attempt: _Attempt) -> bool:
        if attempt.fed == 0 and not attempt.input_done:
            return False
        if attempt.input_done:
            return True  # audio() has not ended yet
        stream = attempt.stream
        if isinstance(stream, ReportsProgress):
            return stream.inputs_spoken < attempt.fed
        fed = self.units[attempt.start : attempt.start + attempt.fed]
        return attempt.bytes < sum(self._bytes_bound(u, self._engine.min_seconds_per_char, 0.0) for u in fed)

    def _resume_point(self, attempt: _Attempt) -> int:
        """The first unit not yet fully sent by this attempt (exact with progress, else conservative)."""
        stream = attempt.stream
        if isinstance(stream, ReportsProgress):
            return attempt.start + min(stream.inputs_spoken, attempt.fed)
        engine = self._engine
        index, budget = attempt.start, float(attempt.bytes)
        while index < attempt.start + attempt.fed:
            need = self._bytes_bound(self.units[index], engine.max_seconds_per_char, engine.unit_pause)
            if budget < need:
                break
            budget -= need
            index += 1
        return index

    def _bytes_bound(self, unit: str, seconds_per_char: float, pause: float) -> float:
        rate = self.voice.speaking_rate if self.voice.speaking_rate > 0 else 1.0
        return (len(unit) * seconds_per_char + pause) / rate * BYTES_PER_SECOND

    def _spoke(self, name: str) -> None:
        self.spoken_by.append(name)
        if self._engine.on_vendor is not None:
            self._engine.on_vendor(name)

    def _record(self, attempt: _Attempt, error: VoiceError, resume: int, next_name: str | None) -> None:
        switch = VendorSwitch(
            from_vendor=attempt.engine.name,
            to_vendor=next_name,
            kind=error.kind,
            reason=str(error),
            resumed_at=resume,
            units=len(self.units),
            had_audio=attempt.got_audio,
            at=trio.current_time(),
        )
        log.warning(
            "voice %s failed (%s: %s); %s from unit %d of %d",
            switch.from_vendor,
            switch.kind,
            switch.reason,
            f"falling back to {next_name}" if next_name else "no vendor left",
            resume,
            len(self.units),
        )
        self.switches.append(switch)
        self._engine.switches.append(switch)
        if self._engine.on_switch is not None:
            self._engine.on_switch(switch)


def _as_voice_error(exc: BaseException, vendor: str) -> VoiceError:
    """The failure of one attempt (maybe inside groups) as a VoiceError."""
    found = first_of(exc, VoiceError)
    if found is not None:
        return found
    leaf = leaves(exc)[0]
    log.error("voice %s failed unexpectedly", vendor, exc_info=leaf)
    return VoiceError(f"{vendor}: unexpected {type(leaf).__name__}: {leaf}", kind="internal")
