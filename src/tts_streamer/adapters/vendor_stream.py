"""Plumbing shared by the network vendor adapters (Google, ElevenLabs, Polly) and the fallback engine.

Each stream runs its vendor I/O in background tasks of a nursery hidden inside ``open_stream``; the tasks
never raise: audio and the one error go through an ``AudioPipe`` that ``audio()`` reads, so a VoiceError
reaches the actor as itself, from ``audio()``. Leaving ``open_stream`` cancels the tasks (threads are
abandoned, not waited for) and the caller's own exception comes out as itself, not inside a group.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from tts_streamer.adapters.voice import VoiceError
from tts_streamer.exceptions import first_of, leaves

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[\u3002\uff01\uff1f])\s*")
_CLAUSE_END = re.compile(r"(?<=[,;:\u3001\uff0c\uff1b])\s+")


class AudioPipe:
    """Bytes, then either a clean end or one VoiceError, from background tasks to ``audio()``.

    Unbounded: vendors send a few kB per second of speech, and a producer must never block on the
    consumer while it holds a thread or a socket read.
    """

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[bytes | VoiceError](math.inf)
        self.bytes_in = 0
        self.bytes_out = 0
        self.first_audio_at: float | None = None

    def put(self, chunk: bytes) -> bool:
        """Queue a chunk; False once the pipe has ended (late audio is dropped)."""
        if not chunk:
            return True
        try:
            self._send.send_nowait(chunk)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        self.bytes_in += len(chunk)
        return True

    def fail(self, error: VoiceError) -> None:
        try:
            self._send.send_nowait(error)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        self._send.close()

    def finish(self) -> None:
        self._send.close()

    def close(self) -> None:
        self._send.close()
        self._receive.close()

    async def audio(self) -> AsyncGenerator[bytes, None]:
        async for item in self._receive:
            if isinstance(item, VoiceError):
                raise item
            if self.first_audio_at is None:
                self.first_audio_at = trio.current_time()
            self.bytes_out += len(item)
            yield item


async def guarded(pipe: AudioPipe, fn: Callable[[], Awaitable[None]], vendor: str) -> None:
    """Run a stream's driver; whatever it raises (bar cancellation) ends the pipe with a VoiceError."""
    try:
        await fn()
    except* VoiceError as group:
        pipe.fail(first_of(group, VoiceError) or VoiceError(f"{vendor} failed"))
    except* Exception as group:
        exc = leaves(group)[0]
        log.error("%s stream failed", vendor, exc_info=exc)
        pipe.fail(VoiceError(f"{vendor}: unexpected {type(exc).__name__}: {exc}", kind="internal"))
    else:
        pipe.finish()


@asynccontextmanager
async def background_nursery(name: str) -> AsyncIterator[trio.Nursery]:
    """A nursery whose tasks are cancelled when the block is left, re-raising the block's own exception
    bare (the tasks themselves must not raise; see ``guarded``)."""
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            finally:
                nursery.cancel_scope.cancel(reason=f"{name} stream closed")
    except BaseExceptionGroup as group:
        inner = leaves(group)
        if len(inner) == 1:
            raise inner[0] from None
        raise


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` in order, whitespace-trimmed; a trailing fragment is its own piece."""
    return [s.strip() for s in _SENTENCE_END.split(text.replace("\x00", " ").strip()) if s.strip()]


def split_under(text: str, limit: int) -> list[str]:
    """Split one sentence into pieces of at most ``limit`` characters: at clauses, then words, then hard."""
    if len(text) <= limit:
        return [text]
    pieces: list[str] = []
    for part in _CLAUSE_END.split(text) if _CLAUSE_END.search(text) else text.split(" "):
        if pieces and len(pieces[-1]) + 1 + len(part) <= limit:
            pieces[-1] = f"{pieces[-1]} {part}"
        elif len(part) <= limit:
            pieces.append(part)
        else:
            sub = split_under(part, limit) if " " in part else _hard_split(part, limit)
            pieces.extend(sub)
    return pieces


def _hard_split(text: str, limit: int) -> list[str]:
    return [text[i : i + limit] for i in range(0, len(text), limit)]


def non_space_len(text: str) -> int:
    """Characters that vendors align to audio (whitespace is normalised away differently by each)."""
    return sum(1 for c in text if not c.isspace())


_T = TypeVar("_T")


async def wait_future(fut: Future[_T]) -> _T:
    """Await a concurrent future (a worker thread's result) from Trio without parking a Trio worker
    thread on it: the future's callback wakes the task through the run's token."""
    if not fut.done():
        token = trio.lowlevel.current_trio_token()
        event = trio.Event()

        def wake(_: Future[_T]) -> None:
            try:
                token.run_sync_soon(event.set)
            except trio.RunFinishedError:
                pass

        fut.add_done_callback(wake)
        await event.wait()
    else:
        await trio.lowlevel.checkpoint()
    return fut.result()


def thread_deliverer(
    token: trio.lowlevel.TrioToken, channel: trio.MemorySendChannel[_T]
) -> Callable[[_T | None], None]:
    """For an SDK's reader thread: hand each item (None: the end) to Trio without waiting for it.

    Once the stream is gone (the channel closed by a flush) or the Trio run has ended, late items are
    dropped: the thread never blocks on Trio and never raises into the SDK's loop."""

    def put(item: _T | None) -> None:
        try:
            if item is None:
                channel.close()
            else:
                channel.send_nowait(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def deliver(item: _T | None) -> None:
        try:
            token.run_sync_soon(put, item)
        except trio.RunFinishedError:
            pass

    return deliver
