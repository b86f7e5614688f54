"""What flows from the Vendor actor to the MediaSocket actor: 8 kHz mu-law, tagged by utterance.

Utterance numbers grow within a session; a flush declares every utterance below a number dead, so
audio that was already in flight when the flush happened is recognisable and dropped.

The channel between the two actors is bounded in audio time, not in chunks: vendors chunk as they
please (a few ms to whole sentences), so a chunk count bounds nothing. ``AudioChannel`` holds at most
``budget_bytes`` of audio (plus one piece); a sender beyond it waits, which is the vendor's
back-pressure. Large chunks are cut into pieces so that one huge chunk cannot overshoot the budget.
"""

from __future__ import annotations

import collections
from typing import Protocol

import attrs
import trio

BYTES_PER_MS = 8  # 8 kHz, one byte per mu-law sample


@attrs.frozen
class AudioChunk:
    utterance: int
    data: bytes


@attrs.frozen
class UtteranceEnd:
    """No more audio for this utterance: pad its last frame and report when it has played out."""

    utterance: int


AudioItem = AudioChunk | UtteranceEnd


class AudioSource(Protocol):
    """The receiving side the MediaSocket needs (a trio memory channel also fits)."""

    async def receive(self) -> AudioItem: ...

    def receive_nowait(self) -> AudioItem: ...


class AudioSink(Protocol):
    """The sending side the Vendor needs (a trio memory channel also fits)."""

    async def send(self, value: AudioItem, /) -> None: ...


class AudioChannel:
    """A single-consumer channel of audio items holding at most ``budget_ms`` of audio.

    A send waits while the channel is not empty and the piece would take it past the budget, so an
    empty channel always takes one piece (no deadlock on a piece larger than the budget, which the
    cut into ``piece_ms`` pieces prevents anyway). ``UtteranceEnd`` costs nothing: there is at most
    one per utterance, and utterances are bounded by the vendor inbox.
    """

    def __init__(self, budget_ms: int = 1000, piece_ms: int = 100) -> None:
        if budget_ms <= 0 or piece_ms <= 0:
            raise ValueError("budget_ms and piece_ms must be positive")
        self.budget_bytes = budget_ms * BYTES_PER_MS
        self.piece_bytes = min(piece_ms, budget_ms) * BYTES_PER_MS
        self._items: collections.deque[AudioItem] = collections.deque()
        self._bytes = 0
        self._not_empty = trio.lowlevel.ParkingLot()
        self._not_full = trio.lowlevel.ParkingLot()

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    @property
    def queued_ms(self) -> float:
        return self._bytes / BYTES_PER_MS

    def __len__(self) -> int:
        return len(self._items)

    async def send(self, value: AudioItem, /) -> None:
        await trio.lowlevel.checkpoint()
        if isinstance(value, UtteranceEnd) or len(value.data) <= self.piece_bytes:
            await self._put(value)
            return
        data, step = value.data, self.piece_bytes
        for start in range(0, len(data), step):
            await self._put(AudioChunk(value.utterance, data[start : start + step]))

    async def _put(self, item: AudioItem) -> None:
        size = len(item.data) if isinstance(item, AudioChunk) else 0
        while self._items and self._bytes + size > self.budget_bytes:
            await self._not_full.park()
        self._items.append(item)
        self._bytes += size
        if self._not_empty:  # unpark_all on an empty lot still costs ~1 us; this runs per chunk
            self._not_empty.unpark_all()

    async def receive(self) -> AudioItem:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._items:
            await self._not_empty.park()
        item = self._take()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return item

    def receive_nowait(self) -> AudioItem:
        if not self._items:
            raise trio.WouldBlock
        return self._take()

    def _take(self) -> AudioItem:
        item = self._items.popleft()
        if isinstance(item, AudioChunk):
            self._bytes -= len(item.data)
        if self._not_full:
            self._not_full.unpark_all()
        return item
