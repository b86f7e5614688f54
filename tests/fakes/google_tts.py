"""A loopback Google Cloud TTS ``StreamingSynthesize`` server: real gRPC, the SDK's own message classes.

No servicer base class ships with the SDK, so the method is registered with a generic handler. It checks
the config first (voice must be Chirp 3 HD, encoding one of the streaming ones), speaks audio
proportional to each input text in chunks whose bytes identify the text (``fake_fill_byte``), checks
``context.is_active()`` per chunk, aborts after ``idle_abort`` seconds without input with the real text,
and records why each RPC ended (``context.add_callback``). Faults come from ``faults`` (one per RPC).
Point the real client at it with ``TextToSpeechGrpcTransport(channel=grpc.insecure_channel(fake.address))``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import attrs
import grpc
from google.cloud.texttospeech import (
    AudioEncoding,
    StreamingSynthesizeRequest,
    StreamingSynthesizeResponse,
)

from tests.fakes.vendor_faults import Fault, FaultQueue, PaceLog, fake_fill_byte

SERVICE = "google.cloud.texttospeech.v1.TextToSpeech"
STREAMING_ENCODINGS = {AudioEncoding.PCM, AudioEncoding.ALAW, AudioEncoding.MULAW, AudioEncoding.OGG_OPUS}
IDLE_ABORT_TEXT = (
    "Stream aborted due to long duration elapsed without input sent. Please send input to keep the "
    "stream alive or close the stream."
)
THREAD_PREFIX = "fake-gtts"
_END = object()


@attrs.define
class RpcRecord:
    """One StreamingSynthesize RPC as the fake saw it (times are ``time.monotonic()``)."""

    number: int
    opened_at: float
    voice: str = ""
    language: str = ""
    encoding: str = ""
    sample_rate: int = 0
    speaking_rate: float = 0.0
    texts: list[str] = attrs.field(factory=list)
    bytes_sent: int = 0
    first_audio_at: float | None = None
    half_closed_at: float | None = None
    ended_at: float | None = None
    # completed | cancelled (client went away) | aborted | invalid | fault:<kind>
    outcome: str = ""
    fault: Fault | None = None

    @property
    def ended(self) -> bool:
        return self.ended_at is not None


class GoogleTTSFake:
    """``start()`` binds 127.0.0.1:0; ``address`` is ``host:port``; ``stop()`` ends everything."""

    def __init__(
        self,
        *,
        seconds_per_char: float = 0.05,
        chunk_bytes: int = 800,
        chunk_interval: float = 0.01,
        first_audio_delay: float = 0.05,
        idle_abort: float = 5.0,
        max_workers: int = 32,
    ) -> None:
        self.seconds_per_char = seconds_per_char
        self.chunk_bytes = chunk_bytes
        self.chunk_interval = chunk_interval
        self.first_audio_delay = first_audio_delay
        self.idle_abort = idle_abort
        self.faults = FaultQueue()
        self.pace = PaceLog()
        self.rpcs: list[RpcRecord] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix=THREAD_PREFIX)
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> GoogleTTSFake:
        server = grpc.server(self._executor)
        handler = grpc.stream_stream_rpc_method_handler(
            self._handle,
            request_deserializer=StreamingSynthesizeRequest.deserialize,
            response_serializer=_serialize,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"StreamingSynthesize": handler}),)
        )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=0).wait(2)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> GoogleTTSFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def open_rpcs(self) -> list[RpcRecord]:
        return [r for r in self.rpcs if not r.ended]

    def audio_for(self, text: str) -> bytes:
        return bytes([fake_fill_byte(text)]) * round(len(text.strip()) * self.seconds_per_char * 8000)

    # --- server threads ---

    def _handle(self, requests: Iterator[StreamingSynthesizeRequest], context: Any) -> Iterator[Any]:
        with self._lock:
            record = RpcRecord(
                number=len(self.rpcs) + 1, opened_at=time.monotonic(), fault=self.faults.next()
            )
            self.rpcs.append(record)

        def on_done() -> None:
            if record.ended_at is None:
                record.ended_at = time.monotonic()
            if not record.outcome:
                record.outcome = "cancelled"

        context.add_callback(on_done)
        inbox: queue.Queue[Any] = queue.Queue()
        threading.Thread(
            target=_pump_requests, args=(requests, inbox), name=f"{THREAD_PREFIX}-reader", daemon=True
        ).start()
        try:
            yield from self._speak(record, inbox, context)
        finally:
            if record.ended_at is None and not context.is_active():
                record.outcome = record.outcome or "cancelled"

    def _speak(self, record: RpcRecord, inbox: queue.Queue[Any], context: Any) -> Iterator[Any]:
        try:
            first = inbox.get(timeout=self.idle_abort)
        except queue.Empty:
            self._finish(record, "aborted")
            context.abort(grpc.StatusCode.ABORTED, IDLE_ABORT_TEXT)
        if first is _END or isinstance(first, BaseException) or "streaming_config" not in first:
            self._finish(record, "invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "The first request must carry streaming_config.")
        config = first.streaming_config
        record.voice, record.language = config.voice.name, config.voice.language_code
        audio_config = config.streaming_audio_config
        record.encoding = AudioEncoding(audio_config.audio_encoding).name
        record.sample_rate, record.speaking_rate = audio_config.sample_rate_hertz, audio_config.speaking_rate
        if audio_config.audio_encoding not in STREAMING_ENCODINGS:
            self._finish(record, "invalid")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Unsupported audio encoding for streaming.")
        if "Chirp3-HD" not in record.voice:
            self._finish(record, "invalid")
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"Voice {record.voice} does not support streaming."
            )
        fault = record.fault
        delay = self.first_audio_delay + (fault.delay if fault and fault.kind == "slow_first_byte" else 0)
        while True:
            try:
                item = inbox.get(timeout=self.idle_abort)
            except queue.Empty:
                self._finish(record, "aborted")
                context.abort(grpc.StatusCode.ABORTED, IDLE_ABORT_TEXT)
            if item is _END:
                record.half_closed_at = time.monotonic()
                self._finish(record, "completed")
                return
            if isinstance(item, BaseException):  # the client cancelled while we read its requests
                self._finish(record, "cancelled")
                return
            text = item.input.text
            record.texts.append(text)
            audio = self.audio_for(text)
            due = plays_at = time.monotonic()
            for start in range(0, len(audio), self.chunk_bytes):
                due += delay
                plays_at = max(plays_at, due)
                time.sleep(delay)
                delay = self.chunk_interval
                if not context.is_active():
                    self._finish(record, "cancelled")
                    return
                if fault and fault.kind != "slow_first_byte" and record.bytes_sent >= fault.after_bytes:
                    yield from self._fault(record, fault, context)
                    return
                chunk = audio[start : start + self.chunk_bytes]
                record.bytes_sent += len(chunk)
                record.first_audio_at = record.first_audio_at or time.monotonic()
                yield StreamingSynthesizeResponse(audio_content=chunk)
                self.pace.sent(due, plays_at)
                plays_at += len(chunk) / 8000

    def _fault(self, record: RpcRecord, fault: Fault, context: Any) -> Iterator[Any]:
        if fault.kind == "stall":
            while context.is_active():
                time.sleep(0.01)
            self._finish(record, "cancelled")
        elif fault.kind == "error":
            self._finish(record, "fault:error")
            context.abort(grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.")
        elif fault.kind == "malformed":
            self._finish(record, "fault:malformed")
            yield b"\xff\xff\xff\xff\x0f"  # not a StreamingSynthesizeResponse: the client cannot parse it
        elif fault.kind == "drop":
            self._finish(record, "fault:drop")
            server = self._server
            if server is not None:  # the whole server goes away, as a lost connection would
                threading.Thread(target=server.stop, args=(0,), name=f"{THREAD_PREFIX}-drop").start()
            while context.is_active():
                time.sleep(0.01)

    @staticmethod
    def _finish(record: RpcRecord, outcome: str) -> None:
        if not record.outcome:
            record.outcome = outcome
        if record.ended_at is None:
            record.ended_at = time.monotonic()


def _pump_requests(requests: Iterator[StreamingSynthesizeRequest], inbox: queue.Queue[Any]) -> None:
    try:
        for request in requests:
            inbox.put(request)
        inbox.put(_END)
    except BaseException as exc:  # grpc raises when the RPC is cancelled under the iterator
        inbox.put(exc)


def _serialize(message: Any) -> bytes:
    if isinstance(message, bytes):  # malformed fault: raw bytes straight onto the wire
        return message
    data: bytes = StreamingSynthesizeResponse.serialize(message)
    return data
