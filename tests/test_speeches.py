"""POST /v1/speeches end to end (real broker, the embedded espeak voice) and the media HTTP server."""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

from tests.amqp_support import open_rig, run_pod
from tests.amqp_vhost import private_amqp_url
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tts_streamer.adapters.espeak import EspeakEngine
from tts_streamer.adapters.media_files import MediaCache
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voice import VoiceEngine, VoiceSpec, VoiceStream
from tts_streamer.adapters.wav import read_wav
from tts_streamer.supervisor.services.media_http import MediaHttpServer, Unsatisfiable, parse_range
from tts_streamer.supervisor.services.speeches import (
    audio_level,
    media_base_url,
    media_host,
    media_name,
    normalize_text,
    provider_chain,
)

pytestmark = pytest.mark.realtime
__all__ = ["private_amqp_url"]  # imported so this module's rigs run in a private vhost


@attrs.define
class CountingEngine:
    """Counts the streams (syntheses) opened on the wrapped engine; ``delay`` holds each one open."""

    inner: Any
    name: str = "espeak"
    delay: float = 0.0
    opened: int = 0

    @property
    def open_streams(self) -> int:
        return int(self.inner.open_streams)

    @asynccontextmanager
    async def open_stream(self, voice: VoiceSpec) -> AsyncIterator[VoiceStream]:
        self.opened += 1
        await trio.sleep(self.delay)
        async with self.inner.open_stream(voice) as stream:
            yield stream


@pytest.fixture
async def espeak() -> AsyncIterator[EspeakEngine]:
    engine = EspeakEngine()
    try:
        yield engine
    finally:
        await engine.aclose()


@attrs.frozen
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes


async def http(port: int, *requests: tuple[str, str, dict[str, str]]) -> list[HttpReply]:
    """(method, target, headers) requests in turn on one kept-alive connection to 127.0.0.1:port."""
    replies = []
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            conn = h11.Connection(h11.CLIENT)
            for method, target, headers in requests:
                if conn.our_state is h11.DONE:
                    conn.start_next_cycle()
                head = [("host", "media"), *headers.items()]
                await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=head)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
                response: h11.Response | None = None
                body = bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                    elif isinstance(event, h11.Response):
                        response = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert response is not None
                replies.append(
                    HttpReply(
                        response.status_code,
                        {k.decode(): v.decode() for k, v in response.headers},
                        bytes(body),
                    )
                )
    return replies


async def test_speech_is_a_valid_audible_wav_cached_synthesised_once_and_served(
    espeak: EspeakEngine, private_amqp_url: str
) -> None:
    require_rabbitmq()
    engine = CountingEngine(espeak, delay=0.2)  # holds each synthesis open so identical requests overlap
    with trio.fail_after(40):
        async with (
            open_rig(pods=0) as rig,
            run_pod(rig, engines={"espeak": engine}, pod_ip="10.164.0.12") as pod,
        ):
            speeches, port = pod.handle.speeches, pod.handle.media_http_port
            assert speeches is not None
            text = "Hello world. This is the batch speech route speaking."
            request = {"call_id": str(uuid.uuid4()), "text": text, "language": "en-US"}
            reply = await rig.request(SHARED_QUEUE, "/v1/speeches", "POST", request)
            assert reply.status_code == 200, reply
            name = media_name(f"<speak>{text}</speak>", "en-US", "espeak", "")
            assert reply.data == {
                "provider": "espeak",  # no cloud voice configured: the offline voice spoke it
                "text": f"<speak>{text}</speak>",
                "language": "en-US",
                "media_filepath": f"http://10-164-0-12.bin-manager.pod.cluster.local:{port}/{name}",
            }
            path = Path(pod.handle.config.media_dir) / name
            raw = path.read_bytes()
            fmt, rate, samples = read_wav(path)
            assert (fmt, rate) == (1, 8000) and struct.unpack("<H", raw[34:36])[0] == 16  # 8 kHz 16-bit PCM
            assert 1.5 < len(samples) / 2 / 8000 < 8  # seconds of speech
            assert audio_level(samples) > 0.02  # audible, not silence

            again = await rig.request(SHARED_QUEUE, "/v1/speeches", "POST", request)
            assert again.data == reply.data and engine.opened == 1 and speeches.stats.cache_hits == 1

            same = {"call_id": str(uuid.uuid4()), "text": "<speak>Four at once.</speak>", "language": "en-US"}
            replies: list[Any] = []

            async def ask() -> None:
                replies.append(await rig.request(SHARED_QUEUE, "/v1/speeches", "POST", same))

            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(ask)
            assert [r.status_code for r in replies] == [200] * 4
            assert len({r.data["media_filepath"] for r in replies}) == 1
            assert replies[0].data["text"] == "<speak>Four at once.</speak>"  # SSML kept as given
            assert engine.opened == 2 and speeches.stats.synthesized == 2  # one synthesis for the four

            whole, head, first, tail, past = await http(
                port,
                ("GET", f"/{name}", {}),
                ("HEAD", f"/{name}", {}),
                ("GET", f"/{name}", {"range": "bytes=0-43"}),
                ("GET", f"/{name}", {"range": "bytes=-100"}),
                ("GET", f"/{name}", {"range": f"bytes={len(raw)}-"}),
            )
    assert (whole.status, whole.headers["content-type"], whole.body) == (200, "audio/wav", raw)
    assert whole.headers["accept-ranges"] == "bytes"
    assert (head.status, head.headers["content-length"], head.body) == (200, str(len(raw)), b"")
    assert (first.status, first.headers["content-range"], first.body) == (
        206,
        f"bytes 0-43/{len(raw)}",
        raw[:44],
    )
    assert (tail.status, tail.body) == (206, raw[-100:])
    assert (past.status, past.headers["content-range"]) == (416, f"bytes */{len(raw)}")


@pytest.mark.parametrize(
    ("provider", "voice", "expect_provider", "expect_voice"),
    [
        ("", "v1", "aws", ""),  # gcp first (fails), then aws with an empty voice
        ("gcp", "v1", "aws", ""),
        ("aws", "Joanna", "aws", "Joanna"),  # aws first, with its voice
    ],
)
async def test_provider_order_and_fallback(
    provider: str, voice: str, expect_provider: str, expect_voice: str, private_amqp_url: str
) -> None:
    require_rabbitmq()
    gcp = SyntheticEngine(name="gcp", fail_after_bytes=0)  # fails before any audio
    aws = SyntheticEngine(name="aws", seconds_per_char=0.01)
    engines: dict[str, VoiceEngine] = {"gcp": gcp, "aws": aws}
    with trio.fail_after(20):
        async with open_rig(pods=0) as rig, run_pod(rig, engines=engines, default_engine="aws") as pod:
            data = {"call_id": str(uuid.uuid4()), "text": "Fallback", "language": "en-US"}
            data |= {"provider": provider, "voice_id": voice}
            reply = await rig.request(SHARED_QUEUE, "/v1/speeches", "POST", data)
            assert reply.status_code == 200, reply
            assert reply.data["provider"] == expect_provider
            assert reply.data.get("voice_id", "") == expect_voice
            name = media_name("<speak>Fallback</speak>", "en-US", expect_provider, expect_voice)
            assert reply.data["media_filepath"].endswith(f":{pod.handle.media_http_port}/{name}")
            assert (Path(pod.handle.config.media_dir) / name).is_file()
            assert gcp.streams_opened == (0 if provider == "aws" else 1)


async def test_no_provider_can_speak_it_is_500(private_amqp_url: str) -> None:
    require_rabbitmq()
    broken = SyntheticEngine(name="gcp", fail_after_bytes=0)
    with trio.fail_after(20):
        async with open_rig(pods=0) as rig, run_pod(rig, engines={"gcp": broken}, default_engine="gcp"):
            data = {"call_id": str(uuid.uuid4()), "text": "nobody", "language": "en-US"}
            reply = await rig.request(SHARED_QUEUE, "/v1/speeches", "POST", data)
            assert (reply.status_code, reply.data_type) == (500, "")
            bad = await rig.request(SHARED_QUEUE, "/v1/speeches", "POST", {"call_id": "x", "text": "t"})
            assert (bad.status_code, bad.data_type) == (500, "")


async def test_media_server_refuses_traversal_and_anything_outside_the_directory(tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "ok.wav").write_bytes(b"RIFF-ok")
    (tmp_path / "secret.wav").write_bytes(b"secret")
    (media / "out.wav").symlink_to(tmp_path / "secret.wav")
    (media / "passwd.wav").symlink_to("/etc/passwd")
    (media / "alias.wav").symlink_to(media / "ok.wav")  # a link that stays inside is fine
    (media / "sub").mkdir()
    (media / "sub" / "x.wav").write_bytes(b"x")
    (media / ".hidden.wav").write_bytes(b"h")
    server = MediaHttpServer(media)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        targets = [
            "/../secret.wav",
            "/%2e%2e/secret.wav",
            "/..%2fsecret.wav",
            "/%2E%2E%2Fsecret.wav",
            "/sub/../../secret.wav",
            "//etc/passwd",
            "/etc/passwd",
            "/" + str(tmp_path / "secret.wav"),
            "/out.wav",
            "/passwd.wav",
            "/sub",
            "/sub/x.wav",
            "/.hidden.wav",
            "/ok.wav%00",
            "/..\\secret.wav",
            "/missing.wav",
            "/",
        ]
        replies = await http(port, *[("GET", t, {}) for t in targets])
        assert {t: r.status for t, r in zip(targets, replies, strict=True)} == dict.fromkeys(targets, 404)
        assert all(b"secret" not in r.body and b"root:" not in r.body for r in replies)
        ok, alias, post = await http(
            port, ("GET", "/ok.wav", {}), ("GET", "/alias.wav", {}), ("POST", "/ok.wav", {})
        )
        assert (ok.status, ok.body, alias.status, alias.body) == (200, b"RIFF-ok", 200, b"RIFF-ok")
        assert (post.status, post.headers["allow"]) == (405, "GET, HEAD")
        nursery.cancel_scope.cancel()


def test_range_header_forms() -> None:
    assert parse_range(None, 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=90-500", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-500", 100) == (0, 99)
    assert parse_range("bytes=0-1,5-6", 100) is None  # several ranges: the whole file
    assert parse_range("items=0-1", 100) is None and parse_range("bytes=5-1", 100) is None
    assert parse_range("bytes=x-y", 100) is None
    for unsatisfiable in ("bytes=100-", "bytes=100-200", "bytes=-0"):
        with pytest.raises(Unsatisfiable):
            parse_range(unsatisfiable, 100)


async def test_cache_is_bounded_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    cache = MediaCache(tmp_path, max_bytes=2500)
    await cache.setup()
    names = [media_name(str(i), "en-US", "gcp", "") for i in range(4)]
    for index, name in enumerate(names[:2]):
        await cache.store(name, b"a" * 1000)
        os.utime(cache.path(name), (1000 + index, 1000))  # a older than b
    assert await cache.hit(names[0])  # a is used again: now b is the least recently used
    await cache.store(names[2], b"c" * 1000)  # 3000 > 2500: one must go
    assert sorted(os.listdir(tmp_path)) == sorted([names[0], names[2]])
    await cache.store(names[3], b"d" * 3000)  # the new file is kept even alone over the bound
    assert os.listdir(tmp_path) == [names[3]]
    assert cache.evicted == 3 and not await cache.hit(names[1])


def test_naming_and_url_rules_match_the_go_service() -> None:
    # The Go service's own test vector (ttshandler tts_test.go): same text, language, provider, voice.
    assert media_name("<speak>Hello world</speak>", "en-US", "gcp", "en-US-Wavenet-F") == (
        "d27dff3751181a10e4fc7f216a936c9c3f33c339.wav"
    )
    assert normalize_text("Hello") == "<speak>Hello</speak>"
    assert normalize_text('<speak>Hi <break time="1s"/></speak>') == '<speak>Hi <break time="1s"/></speak>'
    assert normalize_text("Tom & Jerry <3") == "<speak>Tom &amp; Jerry &lt;3</speak>"  # Go: 500
    assert media_host("10.96.0.112") == "10-96-0-112.bin-manager.pod.cluster.local"
    assert media_host("voipbin-tts-manager-http") == "voipbin-tts-manager-http"  # Compose: verbatim
    assert media_base_url("10.96.0.112", 80) == "http://10-96-0-112.bin-manager.pod.cluster.local"
    assert media_base_url("localhost", 8080) == "http://localhost:8080"
    assert provider_chain("aws", "Joanna", "espeak") == [("aws", "Joanna"), ("gcp", ""), ("espeak", "")]
    assert provider_chain("", "x", "espeak") == [("gcp", "x"), ("aws", ""), ("espeak", "")]
