"""Vendor actor: turns text from its inbox into audio for the MediaSocket, one utterance at a time.

Each utterance runs inside its own cancel scope around one vendor stream. A flush cancels that scope:
the vendor stream's context exits (releasing thread job, connection or RPC), and the inbox items and
audio of flushed utterances are recognised by number and dropped. The next text opens a fresh scope.
The engine's session (``open_session``: e.g. ElevenLabs' socket for the call) is entered when the actor
starts, before the first text, and left when it ends; each utterance is one ``open_stream()`` on it.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Protocol

import attrs
import trio

from tts_streamer.actors.audio import AudioChunk, AudioSink, UtteranceEnd
from tts_streamer.adapters.voice import (
    ReportsSwitches,
    SaysWhoSpoke,
    VendorSwitch,
    VoiceEngine,
    VoiceError,
    VoiceSession,
    VoiceSpec,
    VoiceStream,
    open_session,
)
from tts_streamer.exceptions import first_of

log = logging.getLogger(__name__)


@attrs.frozen
class TextItem:
    utterance: int
    text: str


@attrs.frozen
class EndOfInput:
    utterance: int


VendorItem = TextItem | EndOfInput


class VendorListener(Protocol):
    def on_vendor_error(self, utterance: int, error: VoiceError) -> None: ...

    def on_first_audio(self, utterance: int, seconds: float) -> None: ...

    def on_vendors_spoke(
        self, utterance: int, vendors: tuple[str, ...], switches: tuple[VendorSwitch, ...]
    ) -> None:
        """``switches``: the stream's fall-over records, in order."""
        ...


class Vendor:
    def __init__(
        self,
        engine: VoiceEngine,
        voice: VoiceSpec,
        inbox: trio.MemoryReceiveChannel[VendorItem],
        audio_out: AudioSink,
        listener: VendorListener,
        *,
        name: str = "vendor",
    ) -> None:
        self.engine = engine
        self.voice = voice
        self.name = name
        self._inbox = inbox
        self._audio_out = audio_out
        self._listener = listener
        self._live_from = 0
        self._scope: trio.CancelScope | None = None
        self._scope_exited = trio.Event()
        self._lookahead: VendorItem | None = None
        self._failed = -1

    async def flush(self, live_from: int) -> None:
        """Kill every utterance below ``live_from`` and return once the vendor stream is released."""
        self.cancel(live_from)
        await self.wait_released()

    def cancel(self, live_from: int) -> None:
        """Kill every utterance below ``live_from`` now, without waiting for the stream's release:
        from here on their inbox items are skipped; their audio is the MediaSocket's to drop."""
        self._live_from = live_from
        if self._lookahead is not None and self._lookahead.utterance < live_from:
            self._lookahead = None
        if self._scope is not None:
            self._scope.cancel(reason="flush")

    async def wait_released(self) -> None:
        """Return once no utterance below the live mark holds a vendor stream."""
        while self._scope is not None:
            self._scope.cancel(reason="flush")
            await self._scope_exited.wait()

    async def serve(self) -> None:
        async with open_session(self.engine, self.voice) as session:
            await self._serve(session)

    async def _serve(self, session: VoiceSession) -> None:
        while True:
            item = await self._next()
            if isinstance(item, EndOfInput):
                # An utterance with no text: nothing to speak, but its end still has to be reported.
                await self._audio_out.send(UtteranceEnd(item.utterance))
                continue
            self._scope_exited = trio.Event()
            with trio.CancelScope() as scope:
                self._scope = scope
                try:
                    await self._speak(session, item)
                except* VoiceError as group:
                    exc = first_of(group, VoiceError)
                    assert exc is not None
                    log.warning("%s utterance %d failed: %s", self.name, item.utterance, exc)
                    self._listener.on_vendor_error(item.utterance, exc)
                    # What was already produced still plays; the utterance ends there, and any
                    # text still queued for it is dropped (the session opens a new utterance).
                    self._failed = item.utterance
                    await self._audio_out.send(UtteranceEnd(item.utterance))
                finally:
                    self._scope = None
                    self._scope_exited.set()

    async def _next(self) -> VendorItem:
        while True:
            if self._lookahead is not None:
                item, self._lookahead = self._lookahead, None
            else:
                item = await self._inbox.receive()
            if item.utterance >= self._live_from and item.utterance != self._failed:
                return item

    async def _speak(self, session: VoiceSession, first: TextItem) -> None:
        utterance = first.utterance
        opened_at = trio.current_time()
        first_audio = True
        async with session.open_stream() as stream:
            try:
                async with trio.open_nursery() as nursery:
                    await stream.send_text(first.text)
                    nursery.start_soon(self._feed, stream, utterance, name=f"{self.name}-feed[{utterance}]")
                    async with aclosing(stream.audio()) as chunks:
                        async for chunk in chunks:
                            if not chunk:
                                continue
                            if first_audio:
                                first_audio = False
                                self._listener.on_first_audio(utterance, trio.current_time() - opened_at)
                            await self._audio_out.send(AudioChunk(utterance, chunk))
            finally:
                # Which vendors spoke (a fallback chain may have switched mid-utterance); engines
                # that do not say are taken to have spoken if they produced audio.
                if isinstance(stream, SaysWhoSpoke):
                    spoken_by = tuple(stream.spoken_by)
                else:
                    spoken_by = () if first_audio else (self.engine.name,)
                switches = tuple(stream.switches) if isinstance(stream, ReportsSwitches) else ()
                self._listener.on_vendors_spoke(utterance, spoken_by, switches)
        await self._audio_out.send(UtteranceEnd(utterance))

    async def _feed(self, stream: VoiceStream, utterance: int) -> None:
        """Forward the utterance's later texts until its end of input."""
        while True:
            item = await self._next()
            if item.utterance != utterance:
                # The session never interleaves utterances; a new one means this one's input ended.
                self._lookahead = item
                await stream.end_input()
                return
            if isinstance(item, EndOfInput):
                await stream.end_input()
                return
            await stream.send_text(item.text)
