"""Health endpoints, the h11 server under them, and the Prometheus metrics fed by sessions."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.support import task_names
from tests.test_console import LONG_TEXT, idle_supervisor, open_daemon, wait_for_event
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import CommandError, SayAdd, SayFlush, SayInit
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.adapters.http_serving import HttpRequest, HttpResponse, HttpServer, HttpTimeouts
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.simulator.asterisk_call import SimConfig
from tts_streamer.supervisor.ops.health import Readiness, serve_http
from tts_streamer.supervisor.ops.metrics import BucketHistogram, Metrics, metric_names

# -- readiness --------------------------------------------------------------------------------------------


async def test_readiness_reasons(nursery):
    supervisor, _bus = idle_supervisor(nursery)
    readiness = Readiness()
    assert readiness.reasons(supervisor) == ["command_plane_disconnected"]
    readiness.command_plane_connected = True
    assert readiness.ready(supervisor) and readiness.reasons() == []
    readiness.draining = True
    supervisor.accepting = False
    assert readiness.reasons(supervisor) == ["draining", "not_accepting_sessions"]


async def test_health_endpoints(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        status, headers, body = await daemon.http_get("/health/live")
        assert (status, body) == (200, b"ok\n")
        status, headers, body = await daemon.http_get("/health/ready")
        assert status == 200 and json.loads(body) == {
            "ready": True,
            "reasons": [],
            "vendors_unavailable": {},
            "vendors_not_warmed": {},
        }
        assert headers["content-type"] == "application/json"
        daemon.readiness.command_plane_connected = False
        status, _, body = await daemon.http_get("/health/ready")
        assert status == 503 and json.loads(body) == {
            "ready": False,
            "reasons": ["command_plane_disconnected"],
            "vendors_unavailable": {},
            "vendors_not_warmed": {},
        }
        daemon.readiness.command_plane_connected = True
        await daemon.supervisor.stop_all("shutdown", grace=1.0)  # what SIGTERM does: stop accepting
        status, _, body = await daemon.http_get("/health/ready")
        assert status == 503 and json.loads(body)["reasons"] == ["not_accepting_sessions"]
        status, headers, body = await daemon.http_get("/health/live", method="HEAD")
        assert (status, headers["content-length"], body) == (200, "3", b"")
        status, _, _ = await daemon.http_get("/nope")
        assert status == 404
        status, headers, _ = await daemon.http_get("/metrics", method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"


# -- the HTTP server itself -----------------------------------------------------------------------------


async def exchange(server: HttpServer, raw: bytes, nursery: trio.Nursery) -> bytes:
    """Send raw bytes, then read everything the server says until it closes the connection."""
    client, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, server_end)
    await client.send_all(raw)
    received = bytearray()
    while data := await client.receive_some(65536):
        received += data
    return bytes(received)


def routes_for_tests() -> HttpServer:
    async def hello(request: HttpRequest) -> HttpResponse:
        return HttpResponse.text(200, f"hello {request.query or 'anyone'} {len(request.body)}")

    async def broken(request: HttpRequest) -> HttpResponse:
        raise RuntimeError("handler bug")

    async def slow(request: HttpRequest) -> HttpResponse:
        await trio.sleep(60)
        return HttpResponse.text(200, "too late")

    async def streamed(request: HttpRequest) -> HttpResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"ab", b"", b"cd"):
                yield part

        return HttpResponse(200, chunks())

    return HttpServer(
        {
            ("GET", "/hello"): hello,
            ("POST", "/hello"): hello,
            ("GET", "/broken"): broken,
            ("GET", "/slow"): slow,
            ("GET", "/stream"): streamed,
        },
        timeouts=HttpTimeouts(idle=30.0, request=5.0, handler=2.0, write=3.0),
        max_body_bytes=10,
    )


async def test_keep_alive_and_pipelined_requests(nursery, autojump_clock):
    server = routes_for_tests()
    raw = (
        b"GET /hello?one HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody"
        b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    reply = await exchange(server, raw, nursery)
    assert reply.count(b"HTTP/1.1 200 OK") == 3
    assert b"hello one 0\n" in reply and b"hello anyone 4\n" in reply
    assert b"Transfer-Encoding: chunked" in reply and reply.endswith(b"2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n")


async def test_bad_requests_get_clear_statuses(nursery, autojump_clock):
    server = routes_for_tests()
    assert (await exchange(server, b"NONSENSE\r\n\r\n", nursery)).startswith(b"HTTP/1.1 400 Bad Request")
    too_big = b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n" + b"x" * 11
    assert (await exchange(server, too_big, nursery)).startswith(b"HTTP/1.1 413 ")
    broken = await exchange(server, b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n", nursery)
    assert broken.startswith(b"HTTP/1.1 500 ")
    start = trio.current_time()
    slow = await exchange(server, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", nursery)
    assert slow.startswith(b"HTTP/1.1 503 ") and trio.current_time() - start == pytest.approx(2.0)


async def test_a_request_head_past_16_kb_is_refused_before_it_is_all_in(nursery, autojump_clock):
    """The head is buffered until complete: a bound on it is a bound on memory per connection."""
    server = routes_for_tests()
    client, server_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, server_end)
    await client.send_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 17000)  # never ends
    reply = bytearray()
    while data := await client.receive_some(65536):
        reply += data
    assert reply.startswith(b"HTTP/1.1 431 ") and b"connection: close" in reply.lower()
    assert trio.current_time() < 1.0  # refused on arrival, not at the header deadline


async def receive_until(stream: trio.abc.Stream, end: bytes) -> bytes:
    received = bytearray()
    while not received.endswith(end):
        data = await stream.receive_some(65536)
        assert data, bytes(received)
        received += data
    return bytes(received)


async def test_every_connection_is_bounded_in_time(nursery, autojump_clock):
    server = routes_for_tests()
    start = trio.current_time()
    assert await exchange(server, b"", nursery) == b""  # a new connection that says nothing: closed
    assert trio.current_time() - start == pytest.approx(2.0)  # the header timeout, not the idle one
    start = trio.current_time()
    reply = await exchange(server, b"GET /hello HTTP/1.1\r\nHo", nursery)  # a head that never ends
    assert reply.startswith(b"HTTP/1.1 408 ") and trio.current_time() - start == pytest.approx(2.0)
    start = trio.current_time()
    raw = b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbo"  # a body that never ends
    reply = await exchange(server, raw, nursery)
    assert reply.startswith(b"HTTP/1.1 408 ") and trio.current_time() - start == pytest.approx(5.0)

    # Kept alive after a request: idle for up to 30 s, then closed quietly; a next request that is
    # begun has the header timeout from its first byte.
    idle, idle_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, idle_end)
    await idle.send_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    await receive_until(idle, b"hello anyone 0\n")
    start = trio.current_time()
    assert await idle.receive_some(65536) == b""
    assert trio.current_time() - start == pytest.approx(30.0)
    kept, kept_end = trio.testing.memory_stream_pair()
    nursery.start_soon(server.handle_connection, kept_end)
    await kept.send_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    await receive_until(kept, b"hello anyone 0\n")
    await trio.sleep(20)
    start = trio.current_time()
    await kept.send_all(b"GET /hel")
    assert (await kept.receive_some(65536)).startswith(b"HTTP/1.1 408 ")
    assert trio.current_time() - start == pytest.approx(2.0)

    # A client that sends a request and never reads the response is dropped by the write timeout.
    client, server_end = trio.testing.lockstep_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        await server.handle_connection(server_end)
        done.set()

    nursery.start_soon(serve)
    await client.send_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    start = trio.current_time()
    with trio.fail_after(10):
        await done.wait()
    assert trio.current_time() - start == pytest.approx(3.0)


# -- metrics ----------------------------------------------------------------------------------------------


def test_bucket_histogram_matches_prometheus_le_semantics():
    histogram = BucketHistogram((0.001, 0.01))
    for value in (0.0005, 0.001, 0.002, 0.5):
        histogram.observe(value)
    family = histogram.family("x_seconds", "doc")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.001": 2, "0.01": 3, "+Inf": 4}
    assert histogram.count == 4 and histogram.total == pytest.approx(0.5035)


def test_every_family_of_issue_3_is_exposed():
    assert set(metric_names(Metrics())) == {
        "tts_streamer_active_sessions",
        "tts_streamer_sessions_started",
        "tts_streamer_sessions_failed_to_start",
        "tts_streamer_sessions_ended",
        "tts_streamer_frames_sent",
        "tts_streamer_frames_dropped_by_flush",
        "tts_streamer_flushes",
        "tts_streamer_pacing_lateness_seconds",
        "tts_streamer_flush_to_silence_seconds",
        "tts_streamer_vendor_first_audio_seconds",
        "tts_streamer_vendor_errors",
        "tts_streamer_websocket_disconnects",
        "tts_streamer_command_errors",
        "tts_streamer_tasks",
        "tts_streamer_broker_connected",
        "tts_streamer_broker_reconnects",
        "tts_streamer_events_published",
        "tts_streamer_events_dropped",
        "tts_streamer_events_pending",
        "tts_streamer_requests_not_started",
        "tts_streamer_events_refused",
        "tts_streamer_provider_unavailable",
        # prometheus_client's ProcessCollector (Linux): the standard process families
        "process_cpu_seconds",
        "process_max_fds",
        "process_open_fds",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_virtual_memory_bytes",
    }


async def test_frames_and_lateness_of_ended_sessions_are_kept(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")
        await daemon.start("c2")
        sup = daemon.supervisor
        for call_id in ("c1", "c2"):
            await sup.call(call_id, SayInit())
            await sup.call(call_id, SayAdd(LONG_TEXT))
        # Two seconds of speech after the first audio's wait for the bridge (no caller frames here),
        # plus half a slot so the scrape below never falls on c2's 20 ms send times (it would race).
        await trio.sleep(PacingConfig().bridge_timeout + 2.0 + 0.01)
        c1 = sup.get("c1").media
        assert c1 is not None
        await sup.stop("c1")
        await trio.sleep(1.0)
        c2 = sup.get("c2").media
        assert c2 is not None
        metrics = await daemon.scrape()
        frames = c1.stats.frames_sent + c2.stats.frames_sent
        assert c1.stats.frames_sent >= 100 and metrics["tts_streamer_frames_sent_total"] == frames
        # One lateness sample per message sent, from both the ended and the live session.
        messages = c1.stats.messages_sent + c2.stats.messages_sent
        assert metrics["tts_streamer_pacing_lateness_seconds_count"] == messages
        assert metrics["tts_streamer_active_sessions"] == 1
        assert metrics["tts_streamer_sessions_ended_total{reason=stopped}"] == 1
        assert daemon.sim.calls["c1"].frames_played <= c1.stats.frames_sent


async def test_the_task_gauge_counts_a_session_s_tasks_and_returns_to_idle(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        idle = (await daemon.scrape())["tts_streamer_tasks"]
        assert idle >= len(task_names())  # every task of the run: the test's and the HTTP handler's too
        await daemon.start("c1")
        await daemon.supervisor.call("c1", SayInit())
        await daemon.supervisor.call("c1", SayAdd(LONG_TEXT))
        await trio.sleep(0.5)
        assert (await daemon.scrape())["tts_streamer_tasks"] > idle
        await daemon.supervisor.stop("c1")
        await trio.sleep(1.0)
        assert (await daemon.scrape())["tts_streamer_tasks"] == idle


async def test_hangups_and_vendor_errors_are_counted(nursery, autojump_clock):
    engine = SyntheticEngine(seconds_per_char=0.1, fail_after_bytes=1600)
    async with open_daemon(nursery, engine=engine) as daemon:
        await daemon.start("gone", SimConfig(close_after=0.5))
        await daemon.start("bad")
        await daemon.supervisor.call("bad", SayInit())
        await daemon.supervisor.call("bad", SayAdd(LONG_TEXT))
        await wait_for_event(daemon.bus, ev.SessionError, "bad")
        await trio.sleep(1.0)
        metrics = await daemon.scrape()
    assert metrics["tts_streamer_sessions_ended_total{reason=hangup}"] == 1
    assert metrics["tts_streamer_websocket_disconnects_total{reason=hangup}"] == 1
    assert metrics["tts_streamer_vendor_errors_total{kind=injected,vendor=synthetic}"] == 1
    assert "tts_streamer_vendor_errors_total{kind=injected,vendor=unknown}" not in metrics


async def test_command_plane_path_times_flushes_and_counts_refusals(nursery, autojump_clock):
    async with open_daemon(nursery, engine=SyntheticEngine(seconds_per_char=0.1, speed=2.0)) as daemon:
        await daemon.start("c1")
        await daemon.supervisor.call("c1", SayInit())
        await daemon.supervisor.call("c1", SayAdd(LONG_TEXT))
        await wait_for_event(daemon.bus, ev.PlayStarted, "c1")
        await daemon.supervisor.call("c1", SayFlush())
        with pytest.raises(CommandError):
            await daemon.supervisor.call("c1", SayAdd(""))
        scraped = await daemon.scrape()
    assert scraped["tts_streamer_flush_to_silence_seconds_count"] == 1
    assert scraped["tts_streamer_command_errors_total{kind=empty_text}"] == 1


async def test_a_failing_metrics_listener_never_reaches_the_session(nursery, autojump_clock, monkeypatch):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")

        def explode(event: ev.SessionEvent) -> None:
            raise RuntimeError("metrics bug")

        monkeypatch.setattr(daemon.metrics, "_count", explode)
        await daemon.supervisor.call("c1", SayInit())  # emits Initiated through the broken listener
        await daemon.supervisor.call("c1", SayAdd("still speaks"))
        await wait_for_event(daemon.bus, ev.PlayStarted, "c1")
        assert daemon.supervisor.get("c1").state == "speaking"


# -- over real loopback HTTP ------------------------------------------------------------------------------


@pytest.mark.realtime
async def test_serve_http_over_loopback(nursery):
    supervisor, bus = idle_supervisor(nursery)
    metrics = Metrics()
    metrics.attach(bus, supervisor)
    readiness = Readiness()
    with trio.fail_after(5):
        port = await nursery.start(
            partial(serve_http, supervisor, readiness, metrics, host="127.0.0.1", port=0)
        )

        def fetch(path: str) -> tuple[int, str, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                    return response.status, response.headers["content-type"], response.read()
            except urllib.error.HTTPError as error:
                return error.code, error.headers["content-type"], error.read()

        assert (await trio.to_thread.run_sync(fetch, "/health/live"))[::2] == (200, b"ok\n")
        status, _, body = await trio.to_thread.run_sync(fetch, "/health/ready")
        assert status == 503 and json.loads(body)["reasons"] == ["command_plane_disconnected"]
        status, content_type, body = await trio.to_thread.run_sync(fetch, "/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        families = {family.name for family in text_string_to_metric_families(body.decode())}
        assert "tts_streamer_active_sessions" in families and "tts_streamer_frames_sent" in families
