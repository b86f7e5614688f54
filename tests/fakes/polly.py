"""A loopback AWS Polly ``SynthesizeSpeech`` endpoint (``POST /v1/speech``) on a stdlib ThreadingHTTPServer.

It checks the SigV4 ``Authorization`` header's shape, validates the enums, sample rates and the text
limit, answers errors the way Polly does (status, ``x-amzn-ErrorType: <Code>``, ``{"message": ...}``) so
boto3 raises its real exception classes, and streams audio with ``Transfer-Encoding: chunked``: PCM
s16le whose samples decode from ``fake_fill_byte(text)`` (so after the client's mu-law encoding the
bytes identify the text), ``chunk_bytes`` every ``chunk_interval`` seconds. It records each request and
whether the client went away mid-body. Faults come from ``faults``, one per request.
Point boto3 at it with ``endpoint_url=fake.endpoint_url`` and any keys.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import attrs

from tests.fakes.vendor_faults import Fault, FaultQueue, fake_fill_byte
from tts_streamer.adapters.codecs import ULAW_DECODE_TABLE

THREAD_PREFIX = "fake-polly"
MAX_CHARACTERS = 6000
FORMATS = {
    "pcm": ("8000", "16000"),
    "mulaw": ("8000",),
    "alaw": ("8000",),
    "mp3": ("8000", "16000", "22050", "24000"),
}
ENGINES = ("standard", "neural", "long-form", "generative")


@attrs.define
class SpeechRequest:
    number: int
    started_at: float  # time.monotonic()
    text: str = ""
    voice: str = ""
    engine: str = ""
    output_format: str = ""
    sample_rate: str = ""
    language: str = ""
    bytes_sent: int = 0
    first_byte_at: float | None = None
    ended_at: float | None = None
    outcome: str = ""  # completed | disconnected | rejected:<Code> | fault:<kind>
    fault: Fault | None = None

    @property
    def ended(self) -> bool:
        return self.ended_at is not None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: PollyFake

    def process_request(self, request: Any, client_address: Any) -> None:
        # One call per accepted connection: a client that reuses its pool opens few of them.
        with self.fake._lock:
            self.fake.connections += 1
            self.fake._sockets.add(request)
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"{THREAD_PREFIX}-request",
            daemon=True,
        )
        thread.start()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.server.fake._serve(self)

    def do_GET(self) -> None:
        """``DescribeVoices`` (``GET /v1/voices``): what a warm-up sends; answers an empty list."""
        auth = self.headers.get("Authorization", "")
        status, payload = (200, b'{"Voices": []}') if auth.startswith("AWS4-HMAC-SHA256") else (403, b"{}")
        if self.path.split("?")[0] != "/v1/voices":
            status, payload = 404, b'{"message": "not found"}'
        self.server.fake.describe_calls += 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class PollyFake:
    def __init__(
        self,
        *,
        seconds_per_char: float = 0.05,
        chunk_bytes: int = 3200,
        chunk_interval: float = 0.01,
        first_audio_delay: float = 0.05,
    ) -> None:
        self.seconds_per_char = seconds_per_char
        self.chunk_bytes = chunk_bytes
        self.chunk_interval = chunk_interval
        self.first_audio_delay = first_audio_delay
        self.faults = FaultQueue()
        self.requests: list[SpeechRequest] = []
        self.connections = 0  # accepted TCP connections (keep-alive: a reused one is not counted again)
        self.describe_calls = 0
        self._sockets: set[Any] = set()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def endpoint_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def open_requests(self) -> list[SpeechRequest]:
        return [r for r in self.requests if not r.ended]

    def start(self) -> PollyFake:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.05,), name=f"{THREAD_PREFIX}-serve"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            sockets, self._sockets = list(self._sockets), set()
        for sock in sockets:  # idle keep-alive connections: their threads wait in a read
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(2)

    def __enter__(self) -> PollyFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pcm_for(self, text: str) -> bytes:
        sample = int(ULAW_DECODE_TABLE[fake_fill_byte(text)])
        samples = round(len(text.strip()) * self.seconds_per_char * 8000)
        return struct.pack("<h", sample) * samples

    # --- request threads ---

    def _serve(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        body = handler.rfile.read(length)
        with self._lock:
            record = SpeechRequest(len(self.requests) + 1, time.monotonic(), fault=self.faults.next())
            self.requests.append(record)
        try:
            self._respond(handler, body, record)
        except (BrokenPipeError, ConnectionResetError):
            record.outcome = record.outcome or "disconnected"
        finally:
            record.ended_at = time.monotonic()
            # Keep-alive after a whole response (as AWS does), so a client's pool can reuse it.
            handler.close_connection = not (
                record.outcome == "completed" or record.outcome.startswith("rejected:")
            )

    def _respond(self, handler: _Handler, body: bytes, record: SpeechRequest) -> None:
        auth = handler.headers.get("Authorization", "")
        if not (auth.startswith("AWS4-HMAC-SHA256 Credential=") and "/polly/aws4_request" in auth):
            return self._error(
                handler, record, 403, "UnrecognizedClientException", "Missing SigV4 signature."
            )
        try:
            params = json.loads(body)
        except ValueError:
            return self._error(handler, record, 400, "ValidationException", "Malformed JSON body.")
        record.text = str(params.get("Text", ""))
        record.voice, record.engine = str(params.get("VoiceId", "")), str(params.get("Engine", "standard"))
        record.output_format = str(params.get("OutputFormat", ""))
        record.sample_rate, record.language = (
            str(params.get("SampleRate", "")),
            str(params.get("LanguageCode", "")),
        )
        rates = FORMATS.get(record.output_format)
        if rates is None or not record.voice or record.engine not in ENGINES:
            return self._error(handler, record, 400, "ValidationException", "1 validation error detected.")
        if record.sample_rate and record.sample_rate not in rates:
            return self._error(handler, record, 400, "InvalidSampleRateException", "Invalid sample rate.")
        if len(record.text) > MAX_CHARACTERS:
            return self._error(handler, record, 400, "TextLengthExceededException", "Text too long.")
        fault = record.fault
        if fault and fault.kind == "slow_first_byte":
            self._sleep(fault.delay)
        if fault and fault.kind == "error" and fault.after_bytes == 0:
            return self._error(handler, record, 500, "ServiceFailureException", "Service failure.")
        if fault and fault.kind == "malformed":
            return self._send_malformed(handler, record)
        audio = self.pcm_for(record.text)
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/pcm")
        handler.send_header("x-amzn-RequestCharacters", str(len(record.text)))
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        self._sleep(self.first_audio_delay)
        for start in range(0, len(audio), self.chunk_bytes):
            if fault and fault.kind in ("stall", "error", "drop") and record.bytes_sent >= fault.after_bytes:
                return self._fault(handler, record, fault)
            chunk = audio[start : start + self.chunk_bytes]
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            handler.wfile.flush()
            record.bytes_sent += len(chunk)
            record.first_byte_at = record.first_byte_at or time.monotonic()
            self._sleep(self.chunk_interval)
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
        record.outcome = "completed"

    def _fault(self, handler: _Handler, record: SpeechRequest, fault: Fault) -> None:
        record.outcome = f"fault:{fault.kind}"
        sock: socket.socket = handler.connection
        if fault.kind == "stall":
            while not self._stopping.is_set():  # hold the connection until the client gives up
                readable, _, _ = select.select([sock], [], [], 0.02)
                if readable and not sock.recv(1, socket.MSG_PEEK):
                    record.outcome = "fault:stall:disconnected"
                    return
            return
        if fault.kind == "drop":  # RST: the connection vanishes mid-body
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # error: the body just ends without its last chunk

    def _send_malformed(self, handler: _Handler, record: SpeechRequest) -> None:
        record.outcome = "fault:malformed"
        payload = b'{"not": "audio"'
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    @staticmethod
    def _error(handler: _Handler, record: SpeechRequest, status: int, code: str, message: str) -> None:
        record.outcome = f"rejected:{code}"
        payload = json.dumps({"message": message}).encode()
        handler.send_response(status)
        handler.send_header("x-amzn-ErrorType", f"{code}:http://internal.amazon.com/coral/com.amazonaws.tts/")
        handler.send_header("Content-Type", "application/x-amz-json-1.1")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)
