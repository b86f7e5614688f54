"""Google Cloud TTS ``StreamingSynthesize`` (bidirectional gRPC), MULAW 8 kHz, Chirp 3 HD voices.

The RPC is started with ``client.transport.streaming_synthesize(requests)``, which returns a call object at
once (the gapic method blocks until the first audio, before which nothing can be cancelled). Requests go
through a ``queue.Queue`` that gRPC's consumer thread drains; responses are iterated by one worker thread
per RPC under the engine's own CapacityLimiter (a reader holds a token all stream long, so Trio's default
40-token limiter would starve the 41st call), abandoned on cancellation, which hands each response to
Trio with ``TrioToken.run_sync_soon`` and never waits for Trio: a ``to_thread`` round trip per response
(two thread wake-ups and a Trio task switch each, under one GIL) made 200 streams read slower than the
vendor sent (bench/results/2026-12-03-vendors.md). On every exit path the
call is cancelled **and** a STOP sentinel goes into the request queue: without the sentinel gRPC's request
consumer thread leaks, one per stream.

The server aborts a stream after 5 s without input, so after ``idle_half_close`` (4 s) with nothing to say
the stream half-closes (ends its requests), lets the server finish, and the next text opens a new RPC;
an ABORTED end is treated as a normal end. One channel per engine (``channel`` or ``transport`` injected),
one RPC per utterance stretch.
"""

from __future__ import annotations

import logging
import math
import queue
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import trio
from google.api_core import exceptions as gexc
from google.cloud.texttospeech import (
    AudioEncoding,
    StreamingAudioConfig,
    StreamingSynthesisInput,
    StreamingSynthesizeConfig,
    StreamingSynthesizeRequest,
    VoiceSelectionParams,
)
from google.cloud.texttospeech_v1.services.text_to_speech.transports.grpc import TextToSpeechGrpcTransport

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

DEFAULT_HOST = "texttospeech.googleapis.com"
MAX_REQUEST_BYTES = 5000
_STOP = object()  # ends the request iterator: gRPC's consumer thread exits and the call half-closes
# Keep the channel's HTTP/2 connection alive across pauses between calls (the RPC idle limit is separate).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]

_ERROR_KINDS: list[tuple[type[gexc.GoogleAPICallError], str]] = [
    (gexc.InvalidArgument, "invalid_request"),
    (gexc.Unauthenticated, "auth"),
    (gexc.PermissionDenied, "auth"),
    (gexc.ResourceExhausted, "throttled"),
    (gexc.ServiceUnavailable, "unavailable"),
    (gexc.DeadlineExceeded, "timeout"),
    (gexc.Cancelled, "cancelled"),
]


def map_grpc_error(exc: grpc.RpcError) -> VoiceError:
    """A gRPC failure as a VoiceError with a short kind (via google.api_core's from_grpc_error)."""
    api_error = gexc.from_grpc_error(exc)  # type: ignore[no-untyped-call]
    kind = "vendor_error"
    for cls, label in _ERROR_KINDS:
        if isinstance(api_error, cls):
            kind = label
            break
    if isinstance(api_error, gexc.InternalServerError) and "deserializ" in str(api_error.message):
        kind = "protocol"  # a response the SDK's message class could not parse
    return VoiceError(f"gcp: {api_error}", kind=kind)


class GoogleTTSEngine:
    """The VoiceEngine for Google streaming synthesis. ``aclose()``/``close()`` closes the channel."""

    name = "gcp"

    def __init__(
        self,
        transport: TextToSpeechGrpcTransport | None = None,
        *,
        channel: grpc.Channel | None = None,
        max_streams: int = 1000,
        idle_half_close: float = 4.0,
        server_idle_limit: float = 5.0,
        response_timeout: float = 10.0,
        credentials: Any = None,
    ) -> None:
        if transport is None:
            if channel is None:
                raise ValueError("GoogleTTSEngine needs a transport or a channel")
            transport = TextToSpeechGrpcTransport(channel=channel)
        self.transport = transport
        self.limiter = trio.CapacityLimiter(max_streams)
        self.idle_half_close = idle_half_close
        self.server_idle_limit = server_idle_limit
        self.response_timeout = response_timeout
        self.rpcs_started = 0
        self._open = 0
        # The channel's call credentials, when we built them: warm() fetches the first token early.
        self._credentials = credentials

    @property
    def open_streams(self) -> int:
        return self._open

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[GoogleStream]:
        stream = GoogleStream(self, voice)
        self._open += 1
        try:
            async with background_nursery("gcp") as nursery:
                nursery.start_soon(guarded, stream.pipe, stream._drive, "gcp", name="gcp-stream")
                yield stream
        finally:
            self._open -= 1
            stream._release()

    async def warm(self) -> None:
        """Fetch the access token and connect the channel (DNS, TCP, TLS, HTTP/2) now, at start-up,
        instead of inside a call's first utterance. Later RPCs reuse both (one channel per engine)."""
        if self._credentials is not None and not getattr(self._credentials, "valid", True):
            await trio.to_thread.run_sync(_refresh, self._credentials, abandon_on_cancel=True)
        future = grpc.channel_ready_future(self.transport.grpc_channel)
        try:
            await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except grpc.FutureCancelledError:
            raise VoiceError("gcp: channel did not connect", kind="connection") from None
        finally:
            future.cancel()  # an abandoned waiter thread wakes and exits

    def close(self) -> None:
        self.transport.close()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def _start_rpc(self, requests: Iterator[Any]) -> Any:
        self.rpcs_started += 1
        rpc: Any = self.transport.streaming_synthesize
        return rpc(requests)


class GoogleStream:
    def __init__(self, engine: GoogleTTSEngine, voice: VoiceSpec) -> None:
        self._engine = engine
        resolved = select_voice("gcp", voice)
        self.voice_name = resolved.voice_id
        self.language = resolved.language if resolved.source != "explicit" else _locale_of(resolved.voice_id)
        self.speaking_rate = min(2.0, max(0.25, voice.speaking_rate or 1.0))
        self.pipe = AudioPipe()
        self._texts_send, self._texts = trio.open_memory_channel[str](math.inf)
        self._carry: list[str] = []
        self._aborted_at: float | None = None
        self._requests: queue.Queue[Any] | None = None
        self._call: Any = None
        self._half_closed = False

    async def send_text(self, text: str) -> None:
        await trio.lowlevel.checkpoint()
        for piece in _pieces(text):
            self._texts_send.send_nowait(piece)  # ClosedResourceError after end_input, as the contract wants

    async def end_input(self) -> None:
        await trio.lowlevel.checkpoint()
        self._texts_send.close()

    def audio(self) -> AsyncGenerator[bytes, None]:
        return self.pipe.audio()

    # --- driver task ---

    async def _drive(self) -> None:
        while True:
            texts, self._carry = self._carry, []
            if not texts:
                try:
                    texts = [await self._texts.receive()]
                except trio.EndOfChannel:
                    return
            await self._run_rpc(texts)

    def _config_request(self) -> StreamingSynthesizeRequest:
        return StreamingSynthesizeRequest(
            streaming_config=StreamingSynthesizeConfig(
                voice=VoiceSelectionParams(language_code=self.language, name=self.voice_name),
                streaming_audio_config=StreamingAudioConfig(
                    audio_encoding=AudioEncoding.MULAW,
                    sample_rate_hertz=8000,
                    speaking_rate=self.speaking_rate,
                ),
            )
        )

    async def _run_rpc(self, texts: list[str]) -> None:
        requests: queue.Queue[Any] = queue.Queue()
        requests.put(self._config_request())
        sent = [(trio.current_time(), text) for text in texts]
        for text in texts:
            requests.put(_input(text))
        self._requests = requests
        self._aborted_at = None
        self._half_closed = False
        self._call = call = self._engine._start_rpc(iter(requests.get, _STOP))
        ended = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                read_scope = trio.CancelScope(deadline=trio.current_time() + self._engine.response_timeout)
                nursery.start_soon(self._read, call, read_scope, ended, name="gcp-read")
                with trio.CancelScope() as feed_scope:
                    nursery.start_soon(_cancel_when, ended, feed_scope)
                    while True:
                        with trio.move_on_after(self._engine.idle_half_close) as idle:
                            try:
                                text = await self._texts.receive()
                            except trio.EndOfChannel:
                                break
                        if idle.cancelled_caught:
                            break  # half-close before the server's 5 s idle abort; reopen on the next text
                        if ended.is_set():  # the server ended the RPC under us: speak it on a new one
                            self._carry.append(text)
                            break
                        requests.put(_input(text))
                        sent.append((trio.current_time(), text))
                        if read_scope.deadline == math.inf:
                            read_scope.deadline = trio.current_time() + self._engine.response_timeout
                requests.put(_STOP)
                # Half-closed: the server must finish and end the RPC, with audio at most
                # response_timeout apart.
                self._half_closed = True
                read_scope.deadline = min(
                    read_scope.deadline, trio.current_time() + self._engine.response_timeout
                )
        finally:
            _release(call, requests)
            self._call, self._requests = None, None
        if self._aborted_at is not None:
            # Idle-aborted: the server saw no input for its idle limit, so whatever we sent within that
            # limit before the abort never reached it (a race with our half-close): send it again.
            unseen = [text for at, text in sent if at > self._aborted_at - self._engine.server_idle_limit]
            self._carry[:0] = unseen

    async def _read(self, call: Any, scope: trio.CancelScope, ended: trio.Event) -> None:
        """Audio from the RPC's reader thread into the pipe, within the response deadline."""
        responses_send, responses = trio.open_memory_channel[bytes | grpc.RpcError](math.inf)
        first_chunk = True
        failure: grpc.RpcError | None = None
        try:
            async with trio.open_nursery() as reader:
                reader.start_soon(self._read_in_thread, call, responses_send, name="gcp-reader")
                with scope:
                    async for item in responses:
                        if isinstance(item, grpc.RpcError):
                            failure = item
                            break
                        chunk = item
                        if first_chunk and chunk.startswith(b"RIFF"):
                            chunk = _strip_wav_header(chunk)
                        first_chunk = False
                        self.pipe.put(chunk)
                        # Audio is flowing: wait for more without a deadline until the next text or
                        # the half-close sets one again (a pause between texts is not a stall).
                        timeout = self._engine.response_timeout
                        scope.deadline = trio.current_time() + timeout if self._half_closed else math.inf
                reader.cancel_scope.cancel()  # the thread is abandoned; cancelling the call ends it
        finally:
            responses.close()  # what the thread still hands over is dropped
            ended.set()
        if failure is not None:
            if failure.code() is grpc.StatusCode.ABORTED:
                log.debug("gcp stream ended by the server after idling: %s", failure)
                self._aborted_at = trio.current_time()
                return
            raise map_grpc_error(failure) from None
        if scope.cancelled_caught:
            raise VoiceError(
                f"gcp: no audio for {self._engine.response_timeout:g} s (voice {self.voice_name})",
                kind="timeout",
            )

    async def _read_in_thread(
        self, call: Any, responses: trio.MemorySendChannel[bytes | grpc.RpcError]
    ) -> None:
        """One worker thread per RPC iterates its responses and hands each to Trio without waiting for
        it (no Trio round trip per response, as Polly's reader does); the end closes the channel."""
        deliver = thread_deliverer(trio.lowlevel.current_trio_token(), responses)
        await trio.to_thread.run_sync(
            _iterate, call, deliver, abandon_on_cancel=True, limiter=self._engine.limiter
        )

    def _release(self) -> None:
        """Cancel the RPC and end its request iterator; never blocks (threads are abandoned)."""
        if self._call is not None and self._requests is not None:
            _release(self._call, self._requests)
        self._texts_send.close()
        self._texts.close()
        self.pipe.close()


def _refresh(credentials: Any) -> None:
    import google.auth.transport.requests

    credentials.refresh(google.auth.transport.requests.Request())


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _iterate(call: Any, deliver: Callable[[bytes | grpc.RpcError | None], None]) -> None:
    """In the reader thread: every response's audio, then the RPC's error if it ended with one."""
    try:
        for response in call:
            deliver(bytes(response.audio_content))
    except grpc.RpcError as exc:
        deliver(exc)
    finally:
        deliver(None)


def _release(call: Any, requests: queue.Queue[Any]) -> None:
    call.cancel()
    requests.put(_STOP)


def _input(text: str) -> StreamingSynthesizeRequest:
    return StreamingSynthesizeRequest(input=StreamingSynthesisInput(text=text))


def _pieces(text: str) -> list[str]:
    """One request per text, split only when over the 5,000-byte request limit."""
    text = text.strip()
    if not text:
        return []
    if len(text.encode()) <= MAX_REQUEST_BYTES:
        return [text]
    out: list[str] = []
    for sentence in split_sentences(text):
        out.extend(split_under(sentence, MAX_REQUEST_BYTES // 4))  # 4 bytes per char at worst in UTF-8
    return out


def _strip_wav_header(chunk: bytes) -> bytes:
    at = chunk.find(b"data", 12)
    return chunk[at + 8 :] if at >= 0 else chunk[44:]


def _locale_of(voice_name: str) -> str:
    parts = voice_name.split("-")
    return "-".join(parts[:2]) if len(parts) >= 3 else "en-US"
