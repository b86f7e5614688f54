"""Session actor: one per call. Owns the MediaSocket and Vendor actors and applies commands in order.

Commands arrive through the session's inbox and run one at a time in the session's own task, so the
order callers sent them in is the order they take effect. Every command's ``Reply`` is completed exactly
once: with its result, its CommandError, or ``session_ended`` when the session ends first (queued or
already in progress); a caller waits at most ``command_timeout`` (then ``timeout``, and a command
still queued is skipped). Flush sends FLUSH_MEDIA and drops the audio queued between the actors first,
releasing the vendor stream concurrently; the call stays up. Stop cancels the session's scope from
outside the inbox (it must not wait behind queued commands); the media socket then closes normally
under a shielded, bounded scope, which hangs up the external-media leg.

Over the ~400-line guide on purpose: the command handlers, the actors' listener callbacks and the
lifecycle share one private state (the open message, the utterance numbering, the reply in flight) and
one invariant (every reply answered exactly once); split across modules, no one file would show it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Literal, cast, overload

import attrs
import trio

from tts_streamer import logcontext
from tts_streamer.actors import events as ev
from tts_streamer.actors.audio import AudioChannel
from tts_streamer.actors.commands import (
    Command,
    CommandError,
    Reply,
    SayAdd,
    SayFinish,
    SayFlush,
    SayInit,
    validate_text,
)
from tts_streamer.actors.media_socket import MediaSocket, PacingConfig
from tts_streamer.actors.vendor import EndOfInput, TextItem, Vendor, VendorItem
from tts_streamer.adapters.chan_websocket.client import (
    Dialer,
    MediaConnection,
    MediaSocketClosed,
    MediaSocketError,
    MediaTimeouts,
    open_media_connection,
)
from tts_streamer.adapters.voice import VendorSwitch, VoiceEngine, VoiceError, VoiceSpec

log = logging.getLogger(__name__)


# connecting: until MEDIA_START; idle: no text queued for the vendor; speaking: since a say_add, until
# its message completes or a flush; stopped: the session has ended.
SessionState = Literal["connecting", "idle", "speaking", "stopped"]


class SessionStartError(Exception):
    """The session could not start (media socket unreachable, no MEDIA_START...)."""


@attrs.frozen
class SessionConfig:
    timeouts: MediaTimeouts = MediaTimeouts()
    pacing: PacingConfig = PacingConfig()
    max_text_bytes: int = 5000
    # The text one message may hold, all its say_adds together (it is also what message_play_finished
    # reports as total_message): about an hour of speech, far below what any broker refuses to carry.
    max_message_text_bytes: int = 64 * 1024
    inbox_size: int = 64
    # Texts waiting for the vendor (each at most max_text_bytes); past it say_add answers "busy".
    vendor_inbox_items: int = 64
    # Audio between the vendor and the pacer, in milliseconds (the vendor waits beyond it).
    audio_queue_ms: int = 1000
    # The longest a caller waits for a command's reply (then "timeout"): a flush may wait for a
    # vendor's release (ElevenLabs' close handshake is bounded at 1 s), and the callers give up at 3 s.
    command_timeout: float = 2.0


@attrs.define
class MessageState:
    message_id: str
    texts: list[str] = attrs.field(factory=list)
    text_bytes: int = 0
    unplayed: set[int] = attrs.field(factory=set)
    frames_sent: int = 0
    flushes: int = 0
    play_started: bool = False
    finishing: bool = False
    vendor_failed: bool = False  # some of its text was never spoken
    spoken_by: list[str] = attrs.field(factory=list)


class Session:
    def __init__(
        self,
        call_id: str,
        media_uri: str,
        *,
        engine: VoiceEngine,
        voice: VoiceSpec,
        dialer: Dialer,
        events: ev.EventSink,
        config: SessionConfig = SessionConfig(),
        new_message_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.call_id = call_id
        self.media_uri = media_uri
        self.engine = engine
        self.voice = voice
        self.state: SessionState = "connecting"
        self.started_at = trio.current_time()
        self.last_event: ev.SessionEvent | None = None
        self.media: MediaSocket | None = None
        self.connection: MediaConnection | None = None
        self._dialer = dialer
        self._events = events
        self._config = config
        self._new_message_id = new_message_id
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[Command, Reply]](config.inbox_size)
        self._scope = trio.CancelScope()
        self._stop_reason: ev.StopReason = "stopped"
        # Set by prepare_stop: the leg is being torn down on purpose, so a peer close is expected.
        self._stopping: ev.StopReason | None = None
        self._done = trio.Event()
        self._in_flight: Reply | None = None  # the command taken off the inbox and being applied
        # When the last flush's FLUSH_MEDIA was written (trio time): the caller hears silence from
        # then, while the flush's reply may still wait for the vendor's release.
        self.last_flush_silent_at: float | None = None
        self._message: MessageState | None = None
        self._open_utterance: int | None = None
        self._next_utterance = 0
        self._utterance_message: dict[int, MessageState] = {}
        self._vendor: Vendor | None = None
        self._vendor_inbox: trio.MemorySendChannel[VendorItem] | None = None

    # -- public API (any task) -------------------------------------------------------------------

    @property
    def message_id(self) -> str | None:
        return None if self._message is None else self._message.message_id

    @overload
    async def call(self, command: SayInit, *, patience: float | None = None) -> str: ...
    @overload
    async def call(self, command: SayFlush, *, patience: float | None = None) -> int: ...
    @overload
    async def call(self, command: SayAdd | SayFinish, *, patience: float | None = None) -> None: ...
    @overload
    async def call(self, command: Command, *, patience: float | None = None) -> str | int | None: ...

    async def call(self, command: Command, *, patience: float | None = None) -> str | int | None:
        """Queue a command behind earlier ones and wait for its result (raises CommandError).

        Waits at most ``patience`` seconds (default: the config's ``command_timeout``), then raises
        CommandError("timeout"); a command whose caller timed out before it started is skipped.
        """
        if self._done.is_set():
            raise CommandError("session_ended", f"session {self.call_id} has ended")
        reply = Reply()
        try:
            self._inbox_send.send_nowait((command, reply))
        except trio.WouldBlock:
            raise CommandError("busy", f"session {self.call_id} has too many queued commands") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise CommandError("session_ended", f"session {self.call_id} has ended") from None
        limit = self._config.command_timeout if patience is None else patience
        try:
            with trio.move_on_after(limit):
                return _result(await reply.wait())
        finally:
            # Timed out, or the caller was cancelled: a command not started yet is then skipped. A
            # no-op when the reply is already complete (then that result is returned below).
            reply.fail(CommandError("timeout", f"session {self.call_id} did not answer within {limit} s"))
        return _result(await reply.wait())

    def prepare_stop(self, reason: ev.StopReason) -> None:
        """Say the session is about to be stopped for ``reason`` (e.g. a DELETE, before call-manager
        hangs the leg up): a peer close from now on is the expected end, recorded as ``reason``."""
        if not self._done.is_set() and self._stopping is None:
            self._stopping = reason

    async def stop(self, reason: ev.StopReason = "stopped") -> None:
        """Cancel the session and wait for its cleanup. Harmless when already stopped."""
        if not self._scope.cancel_called:
            self._stop_reason = self._stopping or reason
            self._scope.cancel(reason=reason)
        await self._done.wait()

    @property
    def ended(self) -> bool:
        return self._done.is_set()

    # -- the actor --------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[Session] = trio.TASK_STATUS_IGNORED) -> None:
        logcontext.call_id.set(self.call_id)  # inherited by every task this session spawns
        started = False
        try:
            # The stop scope sits inside the connection: stopping cancels the actors, not the
            # WebSocket machinery, whose reader must stay alive to complete the close handshake.
            async with open_media_connection(self.media_uri, self._dialer, self._config.timeouts) as conn:
                self.connection = conn
                audio = AudioChannel(self._config.audio_queue_ms)
                # Room for every admitted text plus one end of input per utterance (at most one
                # more than the texts queued): sends of an EndOfInput never block or fail.
                vendor_send, vendor_recv = trio.open_memory_channel[VendorItem](
                    2 * self._config.vendor_inbox_items + 1
                )
                self._vendor_inbox = vendor_send
                self.media = MediaSocket(conn, audio, self, self._config.pacing)
                self._vendor = Vendor(
                    self.engine, self.voice, vendor_recv, audio, self, name=f"vendor[{self.call_id}]"
                )
                with self._scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self.media.serve, name=f"media[{self.call_id}]")
                        nursery.start_soon(self._vendor.serve, name=f"vendor[{self.call_id}]")
                        self.state = "idle"
                        started = True
                        task_status.started(self)
                        try:
                            await self._serve_commands()
                        finally:
                            # Ending (stop, hang-up, media or internal error): answer now, not
                            # after the bounded close of the socket that follows.
                            self._end_commands()
        except* MediaSocketClosed as group:
            self._fail(started, group, "hangup")
        except* MediaSocketError as group:
            self._fail(started, group, "media_error")
        except* Exception as group:
            if not started:
                # e.g. a malformed handshake reply inside trio-websocket: still a failed start.
                raise SessionStartError(f"media connection failed: {group.exceptions[0]!r}") from group
            log.exception("call=%s session crashed", self.call_id, exc_info=group)
            self._emit(ev.SessionError(self.call_id, f"internal error: {group.exceptions[0]!r}", "internal"))
            self._stop_reason = "internal_error"
        finally:
            self.state = "stopped"
            self._end_commands()
            if started:
                self._emit(ev.Stopped(self.call_id, self._stop_reason))
            self._done.set()

    def _fail(
        self,
        started: bool,
        group: BaseExceptionGroup[BaseException],
        reason: Literal["hangup", "media_error"],
    ) -> None:
        error = group.exceptions[0]
        if not started:
            raise SessionStartError(str(error)) from error
        if self._stopping is not None:
            # Our own teardown (call-manager hung the leg up for a DELETE) closed it first: not a failure.
            log.info(
                "call=%s media socket closed while stopping (%s): %s", self.call_id, self._stopping, error
            )
            self._stop_reason = self._stopping
            return
        log.warning("call=%s media socket ended the session: %s", self.call_id, error)
        self._emit(ev.SessionError(self.call_id, str(error), reason))
        self._stop_reason = reason

    def _end_commands(self) -> None:
        """Take no more commands; answer the one in progress and the queued ones ``session_ended``."""
        self._inbox_send.close()
        ended = CommandError("session_ended", f"session {self.call_id} has ended")
        if self._in_flight is not None:
            # Cancelled (stop) or broken (hang-up, media or internal error) mid-command.
            self._in_flight.fail(ended)
            self._in_flight = None
        while True:
            try:
                _command, reply = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            reply.fail(ended)

    async def _serve_commands(self) -> None:
        async for command, reply in self._inbox:
            if reply.done:
                continue  # its caller gave up waiting before it started: do not do it late
            # Kept until answered: if this task is cancelled or broken meanwhile, run()'s finally
            # answers it (session_ended).
            self._in_flight = reply
            try:
                result = await self._apply(command)
            except CommandError as exc:
                reply.fail(exc)
            else:
                reply.succeed(result)
            self._in_flight = None

    async def _apply(self, command: Command) -> str | int | None:
        if isinstance(command, SayInit):
            return self._say_init(command.message_id)
        if isinstance(command, SayAdd):
            await self._say_add(command.text)
            return None
        if isinstance(command, SayFlush):
            return await self._say_flush(end_message=command.end_message)
        if isinstance(command, SayFinish):
            await self._say_finish()
            return None
        raise CommandError("bad_command", f"unknown command {command!r}")

    def _say_init(self, message_id: str | None) -> str:
        if self._message is not None and not self._message.finishing:
            # A new message ends the previous one's input; what it said still plays out, in order.
            self._finish_message(self._message)
        self._message = MessageState(message_id or self._new_message_id())
        self._emit(ev.Initiated(self.call_id, self._message.message_id))
        return self._message.message_id

    async def _say_add(self, raw: str | bytes) -> None:
        text = validate_text(raw, self._config.max_text_bytes)
        message = self._message
        if message is None:
            raise CommandError("no_message", "say_add before say_init")
        if message.finishing:
            raise CommandError("message_finished", f"message {message.message_id} is already finished")
        # Counted as message_play_finished reports it: the texts joined by single spaces.
        size = len(text.encode("utf-8")) + (1 if message.texts else 0)
        limit = self._config.max_message_text_bytes
        if message.text_bytes + size > limit:
            raise CommandError(
                "message_too_long",
                f"message {message.message_id} would hold {message.text_bytes + size} bytes of text, "
                f"the limit is {limit}",
            )
        assert self._vendor_inbox is not None
        if self._vendor_inbox.statistics().current_buffer_used >= self._config.vendor_inbox_items:
            raise CommandError("busy", f"{self._config.vendor_inbox_items} texts already wait for the vendor")
        if self._open_utterance is None:
            self._open_utterance = self._next_utterance
            self._next_utterance += 1
            self._utterance_message[self._open_utterance] = message
            message.unplayed.add(self._open_utterance)
        message.texts.append(text)
        message.text_bytes += size
        self.state = "speaking"
        self._vendor_inbox.send_nowait(TextItem(self._open_utterance, text))

    async def _say_flush(self, *, end_message: bool) -> int:
        vendor, media = self._vendor, self.media
        assert vendor is not None and media is not None
        live_from = self._next_utterance
        # Silence first: FLUSH_MEDIA and the local drop do not wait for the vendor's release (a
        # vendor round trip). Whatever the released stream still pushes is below live_from, and the
        # MediaSocket drops it on arrival; the reply waits for both.
        vendor.cancel(live_from)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vendor.wait_released, name=f"vendor-release[{self.call_id}]")
            dropped = await media.flush(live_from)
            self.last_flush_silent_at = trio.current_time()
        self._open_utterance = None
        message = self._message
        earlier: list[MessageState] = []  # finished messages still playing when the flush came
        for utterance in sorted(u for u in self._utterance_message if u < live_from):
            flushed = self._utterance_message.pop(utterance)
            flushed.unplayed.discard(utterance)
            flushed.flushes += 1
            done = flushed.finishing and not flushed.unplayed
            if done and flushed is not message and flushed not in earlier:
                earlier.append(flushed)
        self._emit(ev.Flushed(self.call_id, None if message is None else message.message_id, dropped))
        for finished in earlier:
            self._complete(finished, cut=True)  # their audio is gone too: report them now, not at stop
        if message is not None and (message.finishing or end_message):
            self._complete(message, cut=True)
        self.state = "idle"
        return dropped

    async def _say_finish(self) -> None:
        message = self._message
        if message is None:
            raise CommandError("no_message", "say_finish before say_init")
        if message.finishing:
            raise CommandError("message_finished", f"message {message.message_id} is already finished")
        self._finish_message(message)

    def _finish_message(self, message: MessageState) -> None:
        message.finishing = True
        if self._open_utterance is not None:
            assert self._vendor_inbox is not None
            self._vendor_inbox.send_nowait(EndOfInput(self._open_utterance))
            self._open_utterance = None
        if not message.unplayed:
            self._complete(message)

    def _complete(self, message: MessageState, *, cut: bool = False) -> None:
        """Report ``message`` over; ``cut``: a flush ended it, so it did not play to its end."""
        if self._message is message:
            self._message = None
            self.state = "idle"
        self._emit(
            ev.PlayFinished(
                self.call_id,
                message.message_id,
                " ".join(message.texts),
                len(message.texts),
                message.frames_sent,
                message.flushes,
                completed=message.finishing and not cut and not message.vendor_failed,
                spoken_by=tuple(message.spoken_by),
            )
        )

    # -- listener callbacks from the MediaSocket and Vendor actors --------------------------------

    def on_first_frame(self, utterance: int) -> None:
        message = self._utterance_message.get(utterance)
        if message is not None and not message.play_started:
            message.play_started = True
            self._emit(ev.PlayStarted(self.call_id, message.message_id))

    def on_frames_sent(self, utterance: int, frames: int) -> None:
        message = self._utterance_message.get(utterance)
        if message is not None:
            message.frames_sent += frames

    def on_utterance_played(self, utterance: int) -> None:
        message = self._utterance_message.pop(utterance, None)
        if message is None:
            return
        message.unplayed.discard(utterance)
        if message.finishing and not message.unplayed:
            self._complete(message)

    def on_first_audio(self, utterance: int, seconds: float) -> None:
        self._emit(ev.VendorFirstAudio(self.call_id, self.engine.name, seconds))

    def on_vendors_spoke(
        self, utterance: int, vendors: tuple[str, ...], switches: tuple[VendorSwitch, ...]
    ) -> None:
        message = self._utterance_message.get(utterance)
        if message is not None:
            message.spoken_by.extend(v for v in vendors if v not in message.spoken_by)
        for switch in switches:
            self._emit(
                ev.VoiceFallback(
                    self.call_id, switch.from_vendor, switch.to_vendor, switch.kind, switch.resumed_at
                )
            )

    def on_vendor_error(self, utterance: int, error: VoiceError) -> None:
        message = self._utterance_message.get(utterance)
        if message is not None:
            message.vendor_failed = True
        if self._open_utterance == utterance:
            self._open_utterance = None
        self._emit(ev.SessionError(self.call_id, f"{self.engine.name}: {error}", f"vendor_{error.kind}"))

    def _emit(self, event: ev.SessionEvent) -> None:
        self.last_event = event
        self._events.emit(event)


def _result(value: object) -> str | int | None:
    """A reply's result as ``_apply`` produced it (SayInit: the message id; SayFlush: frames dropped)."""
    return cast("str | int | None", value)
