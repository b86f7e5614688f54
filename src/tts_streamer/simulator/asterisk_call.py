"""What one simulated chan_websocket leg is configured to do and what it recorded (SimCall)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import trio

from tts_streamer.adapters.chan_websocket.protocol import FRAME_BYTES, ULAW_SILENCE, Command, ControlFormat
from tts_streamer.adapters.wav import write_ulaw_wav


@attrs.define
class SimConfig:
    """How one simulated leg behaves, faults included. Times are seconds of Trio's clock."""

    control_format: ControlFormat = ControlFormat.TEXT
    media_start_extra: Mapping[str, Any] = attrs.field(factory=dict)
    # The defaults are voipbin's production (chan_websocket.md §8): the leg joins its bridge some time
    # AFTER the connection (audio played before that goes nowhere: frames_lost_unbridged), and the
    # bridge (a spy-less snoop in a simple_bridge) sends the leg no caller audio, ever.
    # Seconds after the connection (MEDIA_START); None: never by itself, the test calls SimCall.bridge().
    # 20 ms: slower than the 1-7 ms measured with a fast call-manager, as voipbin's broker path is.
    bridge_delay: float | None = 0.02
    # True: a softmix bridge, caller frames at 50/s from caller_audio_delay after the join (7-10 ms
    # measured), also while the other parties are silent. SimConfig.softmix() sets it.
    send_caller_audio: bool = False
    caller_audio_delay: float = 0.008
    caller_frame: bytes = bytes([ULAW_SILENCE]) * FRAME_BYTES
    never_send_media_start: bool = False
    close_after: float | None = None  # after MEDIA_START: close 1000, the caller hung up
    stall_reads: float | None = None  # after MEDIA_START: stop reading the socket for good
    # (after, for) seconds from MEDIA_START: send MEDIA_XOFF and play nothing (a stalled channel whose
    # queue does not drain), then MEDIA_XON and play on. Frames that arrive meanwhile are queued.
    hold_xoff: tuple[float, float] | None = None
    audio_before_media_start: bool = False  # #1712
    tick_phase: float | None = None  # None: drawn from the simulator's seeded random.Random
    lost_ticks: frozenset[int] = frozenset()  # #2115: these ticks fire too late and lose their slot
    connect_deadline: float | None = None  # after expect(): the leg is gone, a late connect gets 404
    write_timeout: float | None = 0.1  # Asterisk's write timeout; a stuck write force-closes (1011)
    # Off: no per-message/per-frame logs, so played_audio() is all silence; counters stay exact.
    # Long benchmarks turn it off to keep memory flat.
    record_frames: bool = True

    @classmethod
    def softmix(cls, **changes: Any) -> SimConfig:
        """A leg in a softmix bridge: Asterisk sends it caller frames once joined."""
        return cls(**{"send_caller_audio": True, **changes})

    @classmethod
    def snoop(cls, **changes: Any) -> SimConfig:
        """voipbin's topology (the default): joined after the connection, no caller frames ever."""
        return cls(**{"send_caller_audio": False, **changes})


@attrs.frozen
class BinaryMessage:
    time: float
    length: int
    outcome: str  # queued | dropped_full | dropped_direction | oversize


@attrs.frozen
class QueuedFrame:
    time: float
    data: bytes


@attrs.frozen
class PlayedFrame:
    tick: int
    time: float
    data: bytes
    bridged: bool
    queued_at: float


@attrs.frozen
class ControlMessage:
    time: float
    raw: str
    command: Command | None
    outcome: str  # ok | unknown | oversize | empty | bad_json | error


@attrs.frozen
class SentEvent:
    time: float
    name: str
    text: str


@attrs.frozen
class Gap:
    """Empty ticks between two played frames of one utterance (see SimCall.underruns)."""

    start: float
    ticks: int


@attrs.frozen
class ClientFault:
    time: float
    kind: str  # fragmented_message | unsolicited_pong | unsupported_opcode


@attrs.define(eq=False)
class SimCall:
    """Everything one leg saw and did.

    ``underruns`` counts empty ticks inside an utterance, decided in hindsight: an empty tick counts
    when a frame played before it and another frame plays after it, with no FLUSH_MEDIA, no mark
    (MARK_MEDIA or the STOP_MEDIA_BUFFERING marker) reached in between.
    Silence the client never follows with audio is not an underrun; paused and lost (#2115) ticks
    neither count nor end the utterance. A client that sends no marks gets the silence between its
    utterances counted: ``gaps`` keeps each run's start and length so such gaps can be told apart.
    """

    connection_id: str
    config: SimConfig
    channel: str
    channel_id: str
    registered_at: float | None = None
    connected_at: float | None = None
    media_start_at: float | None = None
    bridged_at: float | None = None
    subprotocol: str | None = None
    first_tick_at: float | None = None
    ticks: int = 0
    answered: bool = False
    direction: str = "both"
    messages: list[BinaryMessage] = attrs.field(factory=list)
    queued: list[QueuedFrame] = attrs.field(factory=list)
    played: list[PlayedFrame] = attrs.field(factory=list)
    controls: list[ControlMessage] = attrs.field(factory=list)
    events: list[SentEvent] = attrs.field(factory=list)
    gaps: list[Gap] = attrs.field(factory=list)
    client_faults: list[ClientFault] = attrs.field(factory=list)
    frames_received: int = 0
    frames_played: int = 0
    frames_lost_unbridged: int = 0
    frames_flushed: int = 0
    underruns: int = 0
    tail_bytes_discarded: int = 0
    messages_dropped_full: int = 0
    xoff_sent: int = 0
    xon_sent: int = 0
    marks_processed: int = 0
    oversize_closes: int = 0
    text_dropped_oversize: int = 0
    unknown_commands: int = 0
    flushes: int = 0
    caller_frames_sent: int = 0
    ticks_lost: int = 0
    hung_up: bool = False
    # client_close | connection_lost | HANGUP | simulated | ari | oversize | write_timeout | shutdown
    hangup_by: str | None = None
    closed_code: int | None = None
    closed_at: float | None = None
    connected: trio.Event = attrs.field(factory=trio.Event, repr=False)
    ended: trio.Event = attrs.field(factory=trio.Event, repr=False)
    # Set by the running leg: ends it as a channel hang-up from outside (see hang_up).
    hangup_hook: Callable[[], None] | None = attrs.field(default=None, repr=False)

    def hang_up(self) -> bool:
        """Hang the channel up as ARI does when call-manager deletes the external media: Asterisk
        closes the socket with 1000 (``hangup_by`` "ari"). False when the leg is not running."""
        if self.hangup_hook is None or self.ended.is_set():
            return False
        self.hangup_hook()
        return True

    def bridge(self) -> None:
        """Bridge the leg now (for bridge_delay=None); later ticks are heard, caller audio starts."""
        if self.bridged_at is None:
            self.bridged_at = trio.current_time()

    def is_bridged(self, now: float) -> bool:
        return self.bridged_at is not None and now >= self.bridged_at

    def hears_caller(self, now: float) -> bool:
        """A softmix bridge starts sending the leg caller frames a little after the join."""
        joined = self.bridged_at
        return joined is not None and now >= joined + self.config.caller_audio_delay

    def event_texts(self, name: str) -> list[str]:
        return [e.text for e in self.events if e.name == name]

    def played_audio(self, *, include_unbridged: bool = False) -> bytes:
        """What the caller heard: 160 bytes per tick from the first tick to close, 0xFF when silent.

        Frames played before the bridge went nowhere and are silence here unless asked for.
        """
        out = bytearray([ULAW_SILENCE]) * (FRAME_BYTES * self.ticks)
        for frame in self.played:
            if frame.bridged or include_unbridged:
                start = frame.tick * FRAME_BYTES
                out[start : start + len(frame.data)] = frame.data
        return bytes(out)

    def write_wav(self, path: str | Path, *, include_unbridged: bool = False) -> None:
        write_ulaw_wav(path, self.played_audio(include_unbridged=include_unbridged))
