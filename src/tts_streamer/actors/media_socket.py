"""MediaSocket actor: paces audio from a memory channel into one chan_websocket leg.

Frames go out on an absolute timeline, frame ``n`` due at ``t0 + (n - lead) * ptime``: the first
``lead + 1`` frames go at once (a small cushion queued in Asterisk, which plays out on its own 50 Hz
clock), the rest at real-time rate, and time spent writing never accumulates as drift. When Asterisk's
queue would have run dry (the vendor fell behind, or the line was idle) the timeline restarts.
Up to ``frames_per_message`` due frames travel in one binary message; Asterisk splits it into frames.

Flush drops everything queued here, discards audio still in the channel from flushed utterances, and
sends FLUSH_MEDIA, all under the send lock, so no frame produced before a flush is written after it.
It does not wait for the vendor: audio of a flushed utterance that arrives later (a vendor stream still
being released) is recognised by its utterance number and dropped on arrival.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol, get_args

import attrs
import trio

from tts_streamer.actors.audio import AudioChunk, AudioItem, AudioSource, UtteranceEnd
from tts_streamer.actors.stats import LatenessRecorder
from tts_streamer.adapters.chan_websocket import protocol
from tts_streamer.adapters.chan_websocket.client import MediaConnection
from tts_streamer.adapters.chan_websocket.protocol import ControlFormat
from tts_streamer.pacer_clock import Alarm

log = logging.getLogger(__name__)


class PlayoutListener(Protocol):
    """What the MediaSocket tells its session (called from the MediaSocket's task, must not block)."""

    def on_first_frame(self, utterance: int) -> None: ...

    def on_frames_sent(self, utterance: int, frames: int) -> None: ...

    def on_utterance_played(self, utterance: int) -> None: ...


# When play-finished is MARK_MEDIA's (real playout) rather than the modelled clock's.
UseMarks = Literal["auto", "always", "never"]


@attrs.frozen
class PacingConfig:
    # These defaults ARE what ships: DaemonConfig (serve), the demo and `make bench`'s "shipped" rows all
    # take them from here, and they are what bench/lead_sweep.py's rule chose (its CHOSEN; results in
    # bench/results/*-lead-sweep.md): 20 frames (400 ms) per message, the cheapest per session-second
    # (the send system call is most of a message's cost), and a 300 ms lead, the shortest that rides
    # out a 300 ms stall of the loop without a gap. FLUSH_MEDIA empties Asterisk's queue at once, so
    # neither the lead nor the audio a message carries ahead costs anything at barge-in.
    lead_frames: int = 15
    frames_per_message: int = 20
    # Audio sent before the leg joins its bridge is lost, and Asterisk says nothing when it joins:
    # the first audio waits until this long after MEDIA_START, or less if a caller frame (proof of
    # the join) comes first. Counted from the connection, so a say made later goes out at once.
    # BRIDGE_WAIT_MS; docs/architecture.md "Waiting for the bridge" explains the default.
    bridge_timeout: float = 0.2
    # "auto": use MARK_MEDIA for real playout acknowledgement when the call speaks JSON control.
    use_marks: UseMarks = "auto"
    # None: the absolute timeline, what ships. An injection point for benchmarks only, which compare
    # other pacing against it (bench/baselines.py): called once per MediaSocket, it returns the step
    # run for each frame due (see MediaSocket.send_due and the timeline attributes).
    step: Callable[[MediaSocket], Callable[[], Awaitable[None]]] | None = None

    def __attrs_post_init__(self) -> None:
        if self.lead_frames < 0 or self.lead_frames >= protocol.XOFF_FRAMES // 2:
            raise ValueError(f"lead_frames must be in [0, {protocol.XOFF_FRAMES // 2}): {self.lead_frames}")
        if self.frames_per_message < 1:
            raise ValueError("frames_per_message must be at least 1")
        if not self.bridge_timeout >= 0:
            raise ValueError(f"bridge_timeout must not be negative: {self.bridge_timeout}")
        if self.use_marks not in get_args(UseMarks):
            raise ValueError(f"use_marks must be auto, always or never: {self.use_marks!r}")


@attrs.frozen
class _Frame:
    utterance: int
    data: bytes
    first: bool


@attrs.frozen
class _End:
    utterance: int


@attrs.define
class MediaStats:
    frames_sent: int = 0
    messages_sent: int = 0
    frames_dropped_by_flush: int = 0
    timeline_restarts: int = 0
    flushes: int = 0
    # How long the first audio waited for the bridge, and whether a caller frame ended the wait.
    bridge_waited: float | None = None
    bridge_seen: bool = False
    lateness: LatenessRecorder = attrs.field(factory=LatenessRecorder)


class MediaSocket:
    def __init__(
        self,
        conn: MediaConnection,
        audio: AudioSource,
        listener: PlayoutListener,
        config: PacingConfig = PacingConfig(),
    ) -> None:
        self.stats = MediaStats()
        self._conn = conn
        self._audio = audio
        self._listener = listener
        self._config = config
        start = conn.media_start
        self._frame_bytes = start.optimal_frame_size
        self._ptime = start.ptime / 1000
        self._max_batch = max(
            1, min(config.frames_per_message, protocol.MAX_MESSAGE_PAYLOAD // self._frame_bytes)
        )
        self._use_marks = config.use_marks == "always" or (
            config.use_marks == "auto" and start.control_format is ControlFormat.JSON
        )
        self._queue: collections.deque[_Frame | _End] = collections.deque()
        self._partial = bytearray()
        self._partial_utterance = -1
        self._started: set[int] = set()
        self._live_from = 0
        # The timeline: frame n (counted from t0, when it started) is due at t0 + (n - lead) * ptime.
        self.t0: float | None = None
        self.n = 0
        self.ptime = self._ptime
        self.lead_frames = config.lead_frames
        self._send_lock = trio.Lock()
        # Woken early by a flush; the pacer waits on it instead of sleeping (tts_streamer/pacer_clock.py).
        self.alarm = Alarm()
        self._step = self._pace_absolute if config.step is None else config.step(self)
        self._playout_send, self._playout_recv = trio.open_memory_channel[tuple[float, int]](math.inf)
        self._bridge_checked = False

    @property
    def queued_ms(self) -> float:
        """Audio waiting here (not yet written) and in the channel from the vendor, in milliseconds."""
        frames = sum(1 for item in self._queue if isinstance(item, _Frame))
        here = frames * self._ptime * 1000 + len(self._partial) / self._frame_bytes * self._ptime * 1000
        channel: float = getattr(self._audio, "queued_ms", 0.0)  # an AudioChannel knows; a bare channel not
        return here + channel

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            if not self._use_marks:
                nursery.start_soon(self._serve_playout_clock, name=f"playout[{self._conn.connection_id}]")
            await self._serve_pacer()

    async def flush(self, live_from: int) -> int:
        """Drop every frame of utterances below ``live_from`` and empty Asterisk's queue.

        Returns how many frames were dropped here. The vendor need not have stopped: from here on,
        audio of those utterances is dropped as it arrives (``_accept``).
        """
        async with self._send_lock:
            self._live_from = live_from
            dropped = sum(1 for item in self._queue if isinstance(item, _Frame))
            dropped += (len(self._partial) + self._frame_bytes - 1) // self._frame_bytes
            self._queue.clear()
            self._partial.clear()
            while True:
                try:
                    item = self._audio.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                if isinstance(item, AudioChunk) and item.utterance < live_from:
                    dropped += (len(item.data) + self._frame_bytes - 1) // self._frame_bytes
                elif item.utterance >= live_from:
                    self._accept(item)
            # Playout notifications and marks of flushed audio end as flushed, never as played.
            while True:
                try:
                    self._playout_recv.receive_nowait()
                except trio.WouldBlock:
                    break
            self._conn.forget_marks()
            self.t0 = None
            self.n = 0
            self.alarm.wake()
            await self._conn.send_command(protocol.FLUSH_MEDIA)
            self.stats.flushes += 1
            self.stats.frames_dropped_by_flush += dropped
            return dropped

    # -- pacing ------------------------------------------------------------------------------------

    async def _serve_pacer(self) -> None:
        while True:
            head = await self._next_item()
            if isinstance(head, _End):
                self._queue.popleft()
                await self._utterance_sent(head.utterance)
                continue
            if not self._bridge_checked:
                self._bridge_checked = True
                await self._wait_for_bridge()
            if self._conn.paused:
                await self._conn.wait_resumed()
            await self._step()

    async def _pace_absolute(self) -> None:
        now = trio.current_time()
        if self.t0 is None or now >= self.t0 + self.n * self._ptime:
            # Asterisk's queue has (by our clock) run dry: start a new timeline with a fresh lead.
            if self.t0 is not None:
                self.stats.timeline_restarts += 1
            self.t0 = now
            self.n = 0
        t0 = self.t0
        deadline = t0 + (self.n - self._config.lead_frames) * self._ptime
        if deadline > now:
            if not await self.alarm.wait_until(deadline):
                return  # flushed while waiting: start over with what is left
        else:
            # Due already (the lead, or catching up): the send below need not yield, so yield here.
            await trio.lowlevel.checkpoint()
        # A flush can also land after the clock woke us and before we ran (the wake then finds no
        # live entry): the timeline we waited on is gone, so start over with what is left.
        if self.t0 is not t0:
            return
        await self.send_due(max(deadline, t0))

    async def _wait_for_bridge(self) -> None:
        waiting_from = trio.current_time()
        with trio.move_on_at(self._conn.started_at + self._config.bridge_timeout):
            await self._conn.bridged.wait()
        self.stats.bridge_waited = trio.current_time() - waiting_from
        self.stats.bridge_seen = self._conn.bridged.is_set()

    async def _next_item(self) -> _Frame | _End:
        while not self._queue:
            try:
                item = self._audio.receive_nowait()  # usually there: no scheduler round trip
            except (trio.WouldBlock, trio.EndOfChannel):
                item = await self._audio.receive()
            self._accept(item)
        return self._queue[0]

    def _accept(self, item: AudioItem) -> None:
        """Cut an incoming chunk into frames; an utterance's short last frame is padded with silence."""
        if item.utterance < self._live_from:
            return
        if item.utterance != self._partial_utterance and self._partial:
            self._pad_partial()
        self._partial_utterance = item.utterance
        if isinstance(item, UtteranceEnd):
            if self._partial:
                self._pad_partial()
            self._queue.append(_End(item.utterance))
            return
        self._partial += item.data
        size = self._frame_bytes
        whole = len(self._partial) - len(self._partial) % size
        for start in range(0, whole, size):
            self._queue.append(self._frame(item.utterance, bytes(self._partial[start : start + size])))
        del self._partial[:whole]

    def _pad_partial(self) -> None:
        pad = bytes([protocol.ULAW_SILENCE]) * (self._frame_bytes - len(self._partial))
        self._queue.append(self._frame(self._partial_utterance, bytes(self._partial) + pad))
        self._partial.clear()

    def _frame(self, utterance: int, data: bytes) -> _Frame:
        first = utterance not in self._started
        if first:
            self._started.add(utterance)
        return _Frame(utterance, data, first)

    async def send_due(self, slot_time: float) -> None:
        """Send the frames at the head of the queue (up to frames_per_message) as one message; its
        lateness is counted against ``slot_time``. Advances ``n`` by the frames sent."""
        # Uncontended (nearly always), the lock is taken without a scheduler round trip.
        if self._send_lock.locked():
            await self._send_lock.acquire()
        else:
            self._send_lock.acquire_nowait()
        try:
            # Pull in whatever has arrived meanwhile so due frames can share one message.
            while len(self._queue) < self._max_batch:
                try:
                    self._accept(self._audio.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            batch: list[_Frame] = []
            # A batch is the due frame plus up to frames_per_message - 1 frames ahead of their slots.
            while self._queue and len(batch) < self._max_batch:
                head = self._queue[0]
                if not isinstance(head, _Frame):
                    break
                batch.append(head)
                self._queue.popleft()
            if not batch:
                return
            await self._conn.send_audio(b"".join([frame.data for frame in batch]))
            self.stats.lateness.record(trio.current_time() - slot_time)
            self.stats.messages_sent += 1
            self.stats.frames_sent += len(batch)
            self.n += len(batch)
            for frame in batch:
                if frame.first:
                    self._listener.on_first_frame(frame.utterance)
            # Utterance numbers only grow along the queue: equal ends mean one utterance (nearly always).
            if batch[0].utterance == batch[-1].utterance:
                self._listener.on_frames_sent(batch[0].utterance, len(batch))
            else:
                for utterance, frames in collections.Counter(f.utterance for f in batch).items():
                    self._listener.on_frames_sent(utterance, frames)
        finally:
            self._send_lock.release()

    # -- playout acknowledgement --------------------------------------------------------------------

    async def _utterance_sent(self, utterance: int) -> None:
        if self._use_marks:
            async with self._send_lock:
                if utterance < self._live_from:
                    return
                mark_id = f"u{utterance}"
                self._conn.on_mark(mark_id, lambda: self._listener.on_utterance_played(utterance))
                await self._conn.send_command(protocol.mark_media(mark_id))
            return
        now = trio.current_time()
        # The last frame plays within one tick after the queued lead drains.
        start = now if self.t0 is None else self.t0  # not `t0 or now`: 0.0 is a time (MockClock's first)
        played_at = max(now, start + self.n * self._ptime) + self._ptime
        self._playout_send.send_nowait((played_at, utterance))

    async def _serve_playout_clock(self) -> None:
        async for played_at, utterance in self._playout_recv:
            await trio.sleep_until(played_at)
            if utterance >= self._live_from:
                self._listener.on_utterance_played(utterance)
