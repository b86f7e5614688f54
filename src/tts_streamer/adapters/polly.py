"""AWS Polly ``SynthesizeSpeech`` per sentence through boto3, ``pcm`` at 8 kHz encoded to mu-law here.

Text is split at sentence boundaries (then clauses, then words) under ``max_chars``. Each segment is one
request whose audio body is read in ``read_size`` pieces in a worker thread under the engine's own
CapacityLimiter; the thread checks its segment's ``threading.Event`` between reads and closes **its own**
body in ``finally`` (closing a body from another thread mid-``read()`` breaks the reader). Chunks reach
Trio through ``TrioToken.run_sync_soon`` into the segment's channel, so the thread never waits on Trio.
Segment n+1 is requested while n is being read (``prefetch``). Leaving the stream sets every segment's
event and abandons the threads: Trio does not wait; a thread exits at its next read, or at the client's
``read_timeout`` when the server stalls. One client (thread-safe) per engine; its connection pool is
sized for the limiter. ``StartSpeechSynthesisStream`` is not usable from boto3 (needs HTTP/2).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import numpy as np
import trio
from botocore import exceptions as bexc

from tts_streamer.adapters.codecs import ulaw_encode
from tts_streamer.adapters.vendor_stream import (
    AudioPipe,
    background_nursery,
    guarded,
    split_sentences,
    split_under,
    thread_deliverer,
)
from tts_streamer.adapters.voice import VoiceError, VoiceSpec
from tts_streamer.adapters.voices import select_voice

log = logging.getLogger(__name__)

MAX_BILLED_CHARS = 3000
_ERROR_KINDS = {
    "ThrottlingException": "throttled",
    "ServiceFailureException": "unavailable",
    "UnrecognizedClientException": "auth",
    "InvalidSignatureException": "auth",
    "AccessDeniedException": "auth",
    "ExpiredTokenException": "auth",
}
_INVALID = ("TextLengthExceeded", "InvalidSampleRate", "InvalidSsml", "LanguageNotSupported", "Validation")


def make_client(
    session: Any = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    max_connections: int = 50,
    connect_timeout: float = 2.0,
    read_timeout: float = 5.0,
    verify: str | None = None,
) -> Any:
    """A Polly client from the standard AWS configuration (env, profile, role), pool sized for us.

    ``verify``: a CA bundle to trust instead of the system's (a TLS fake or a private endpoint); None
    keeps botocore's default verification (which also honours ``AWS_CA_BUNDLE``). Never disables it."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 2, "mode": "standard"},  # at most one retry
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_connections,
    )
    session = session or boto3.Session()
    return session.client(
        "polly", endpoint_url=endpoint_url, region_name=region, config=config, verify=verify
    )


def map_error(exc: BaseException) -> VoiceError:
    if isinstance(exc, bexc.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        kind = _ERROR_KINDS.get(code, "invalid_request" if code.startswith(_INVALID) else "vendor_error")
        return VoiceError(f"aws: {code}: {exc}", kind=kind)
    if isinstance(exc, bexc.ReadTimeoutError | bexc.ConnectTimeoutError):
        return VoiceError(f"aws: {exc}", kind="timeout")
    if isinstance(exc, bexc.NoCredentialsError | bexc.PartialCredentialsError):
        return VoiceError(f"aws: {exc}", kind="auth")
    if isinstance(exc, bexc.BotoCoreError | OSError) or type(exc).__module__.startswith("urllib3"):
        return VoiceError(f"aws: connection failed: {exc}", kind="connection")
    return VoiceError(f"aws: unexpected {type(exc).__name__}: {exc}", kind="internal")


class PollyEngine:
    name = "aws"

    def __init__(
        self,
        client: Any,
        *,
        engine: str = "neural",
        max_concurrency: int = 50,
        max_chars: int = 1500,
        read_size: int = 1600,
        prefetch: int = 1,
        drain_bytes: int = 128 * 1024,
        drain_seconds: float = 1.0,
    ) -> None:
        self.client = client
        self.engine = engine
        self.limiter = trio.CapacityLimiter(max_concurrency)
        self.max_chars = min(max_chars, MAX_BILLED_CHARS)
        self.read_size = read_size
        self.prefetch = prefetch
        # A body dropped mid-read takes its connection with it (the next request pays TCP + TLS again):
        # after a flush the worker reads and discards up to this much more (off the Trio loop), so a
        # body that ends within the budget returns its connection to the pool. 0: always drop.
        self.drain_bytes = drain_bytes
        self.drain_seconds = drain_seconds
        self.threads_running = 0  # worker threads inside a request right now (tests watch it drain)
        self._count_lock = threading.Lock()
        self._open = 0

    @property
    def open_streams(self) -> int:
        return self._open

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[PollyStream]:
        stream = PollyStream(self, voice, trio.lowlevel.current_trio_token())
        self._open += 1
        try:
            async with background_nursery("aws") as nursery:
                nursery.start_soon(guarded, stream.pipe, stream._run, "aws", name="aws-stream")
                yield stream
        finally:
            self._open -= 1
            stream._release()

    async def warm(self) -> None:
        """Resolve credentials and open ``1 + prefetch`` pooled connections (TLS included) now, so a
        call's first sentence does not pay for them: one ``DescribeVoices`` per connection, at once.
        A refusal of DescribeVoices itself (AccessDenied: IAM allows only SynthesizeSpeech) still
        leaves the connection open and the credentials resolved, so it counts as warmed."""
        errors: list[VoiceError] = []
        async with trio.open_nursery() as nursery:
            for _ in range(1 + self.prefetch):
                nursery.start_soon(self._describe, errors)
        if errors:
            raise errors[0]  # one readable reason for readiness, not a group

    async def _describe(self, errors: list[VoiceError]) -> None:
        try:
            await self._describe_once()
        except VoiceError as exc:
            errors.append(exc)

    async def _describe_once(self) -> None:
        try:
            await trio.to_thread.run_sync(
                lambda: self.client.describe_voices(LanguageCode="en-US"),
                abandon_on_cancel=True,
                limiter=self.limiter,
            )
        except bexc.ClientError as exc:
            error = map_error(exc)
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if error.kind == "auth" and code != "AccessDeniedException":
                raise error from None
            log.debug("aws warm-up: DescribeVoices answered %s; the connection is warm", code)
        except Exception as exc:
            raise map_error(exc) from None

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self.threads_running += delta


@attrs.define(eq=False)
class _Segment:
    text: str
    input_index: int
    last_of_input: bool
    stop: threading.Event = attrs.Factory(threading.Event)
    channel: tuple[
        trio.MemorySendChannel[bytes | VoiceError], trio.MemoryReceiveChannel[bytes | VoiceError]
    ] = attrs.Factory(lambda: trio.open_memory_channel[bytes | VoiceError](math.inf))


class PollyStream:
    def __init__(self, engine: PollyEngine, voice: VoiceSpec, token: trio.lowlevel.TrioToken) -> None:
        self._engine = engine
        self._token = token
        resolved = select_voice("aws", voice)
        self.voice_id, self.language = resolved.voice_id, resolved.language
        self.pipe = AudioPipe()
        self._segments_send, self._segments = trio.open_memory_channel[_Segment](math.inf)
        self._fetching_send, self._fetching = trio.open_memory_channel[_Segment](math.inf)
        self._window = trio.Semaphore(1 + engine.prefetch)
        self._all: list[_Segment] = []
        self._inputs = 0
        self._input_end_bytes: list[int] = []  # pipe bytes at which input i's audio ended

    @property
    def inputs_spoken(self) -> int:
        """How many ``send_text`` inputs have had all their audio yielded by ``audio()``."""
        return sum(1 for end in self._input_end_bytes if end <= self.pipe.bytes_out)

    async def send_text(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        pieces = [p for s in split_sentences(text) for p in split_under(s, self._engine.max_chars)]
        index = self._inputs
        self._inputs += 1
        if not pieces:
            self._input_end_bytes.append(self.pipe.bytes_in)
        for n, piece in enumerate(pieces):
            self._segments_send.send_nowait(_Segment(piece, index, n == len(pieces) - 1))

    async def end_input(self) -> None:
        await trio.lowlevel.checkpoint()
        self._segments_send.close()

    def audio(self) -> AsyncGenerator[bytes, None]:
        return self.pipe.audio()

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._fetch_all, nursery, name="aws-fetch")
            async for segment in self._fetching:
                async for item in segment.channel[1]:
                    if isinstance(item, VoiceError):
                        raise item
                    self.pipe.put(item)
                if segment.last_of_input:
                    self._input_end_bytes.append(self.pipe.bytes_in)
                self._window.release()

    async def _fetch_all(self, nursery: trio.Nursery) -> None:
        async with self._fetching_send:
            async for segment in self._segments:
                await self._window.acquire()
                self._all.append(segment)
                self._fetching_send.send_nowait(segment)
                nursery.start_soon(self._fetch, segment, name="aws-request")

    async def _fetch(self, segment: _Segment) -> None:
        engine = self._engine
        await trio.to_thread.run_sync(
            self._fetch_in_thread,
            segment,
            abandon_on_cancel=True,
            limiter=engine.limiter,
            thread_name="aws-fetch",
        )

    # --- worker thread ---

    def _fetch_in_thread(self, segment: _Segment) -> None:
        engine = self._engine
        engine._count(+1)
        deliver = thread_deliverer(self._token, segment.channel[0])
        body = None
        try:
            if segment.stop.is_set():  # the stream was left before this thread got going
                return
            response = engine.client.synthesize_speech(
                Text=segment.text,
                TextType="text",
                OutputFormat="pcm",
                SampleRate="8000",
                VoiceId=self.voice_id,
                LanguageCode=self.language,
                Engine=engine.engine,
            )
            body = response["AudioStream"]
            content_type = str(response.get("ContentType", ""))
            if not content_type.startswith("audio/"):
                raise VoiceError(f"aws: answered {content_type!r}, not audio", kind="protocol")
            carry = b""
            while not segment.stop.is_set():
                data = body.read(engine.read_size)
                if not data:
                    break
                if segment.stop.is_set():
                    break
                data = carry + data
                whole = len(data) // 2 * 2
                carry = data[whole:]
                if whole and not segment.stop.is_set():
                    deliver(ulaw_encode(np.frombuffer(data[:whole], dtype="<i2")))
            if segment.stop.is_set() and not _drain(body, engine.drain_bytes, engine.drain_seconds):
                log.debug("aws: flushed body longer than the drain budget; its connection is dropped")
        except VoiceError as exc:
            deliver(exc)
        except Exception as exc:
            if not segment.stop.is_set():
                deliver(map_error(exc))
        finally:
            if body is not None:
                try:
                    body.close()  # by this thread, never another: see the module docstring
                except Exception:
                    log.debug("closing a Polly body failed", exc_info=True)
            deliver(None)
            engine._count(-1)

    def _release(self) -> None:
        """Stop every request (threads notice between reads) and drop whatever is still queued."""
        for segment in self._all:
            segment.stop.set()
            segment.channel[1].close()
        self._segments_send.close()
        self._segments.close()
        self.pipe.close()


def _drain(body: Any, limit: int, seconds: float) -> bool:
    """Read and discard the rest of ``body`` within ``limit`` bytes and ``seconds``; True at its end."""
    if limit <= 0:
        return False
    deadline, total = time.monotonic() + seconds, 0
    while total <= limit and time.monotonic() < deadline:
        data = body.read(min(65536, limit + 1 - total))
        if not data:
            return True
        total += len(data)
    return False
