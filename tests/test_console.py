"""The admin console: commands against live sessions on the simulator, and its transports.

Most tests run the console over in-memory streams (``Console.handle_stream``) under the autojump
clock, with sessions on the in-memory chan_websocket simulator. Tests marked ``realtime`` use a real
unix or TCP socket with the real clock and short ``fail_after`` bounds.

Over the ~400-line guide: every console command against live sessions, sharing one rig; the
transports' tests are at the end.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, redirect_stdout
from functools import partial
from io import StringIO
from typing import Any

import attrs
import h11
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from tests.support import media_uri, tasks_of
from tts_streamer.actors import events as ev
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.http_serving import HttpServer
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig, memory_dialer
from tts_streamer.supervisor.event_bus import EventBus
from tts_streamer.supervisor.ops.console import (
    GREETING,
    Console,
    ConsoleConfigError,
    ConsoleTimeouts,
    serve_console,
)
from tts_streamer.supervisor.ops.console_client import run_console_client, with_json
from tts_streamer.supervisor.ops.console_commands import ConsoleError, parse
from tts_streamer.supervisor.ops.console_views import HISTORY_TEXT_CHARS, EventHistory
from tts_streamer.supervisor.ops.health import Readiness, health_routes
from tts_streamer.supervisor.ops.metrics import Metrics
from tts_streamer.supervisor.sessions import Supervisor, open_supervisor

LONG_TEXT = "x" * 100  # 10 s of synthetic audio at 0.1 s per character


# -- helpers --------------------------------------------------------------------------------------------


class LineClient:
    """The client side of the line protocol, over any trio stream (memory or socket)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._buffer = bytearray()

    async def send_line(self, line: str) -> None:
        await self.stream.send_all(line.encode() + b"\n")

    async def read_line(self) -> str | None:
        while b"\n" not in self._buffer:
            data = await self.stream.receive_some(4096)
            if not data:
                return None
            self._buffer += data
        end = self._buffer.index(b"\n")
        line = self._buffer[:end].decode()
        del self._buffer[: end + 1]
        return line

    async def read_response(self) -> list[str]:
        rows: list[str] = []
        while (line := await self.read_line()) is not None and line != "":
            rows.append(line)
        return rows

    async def command(self, line: str) -> list[str]:
        await self.send_line(line)
        return await self.read_response()

    async def json_rows(self, line: str) -> list[dict[str, object]]:
        return [json.loads(row) for row in await self.command(line)]


@attrs.define
class Daemon:
    """The daemon's parts as its entry point wires them: supervisor, bus, metrics, console, HTTP."""

    supervisor: Supervisor
    bus: EventBus
    metrics: Metrics
    console: Console
    readiness: Readiness
    http: HttpServer
    sim: AsteriskSimulator
    nursery: trio.Nursery
    _consoles: int = 0

    async def connect(self, *, greet: bool = True) -> LineClient:
        client_end, server_end = trio.testing.memory_stream_pair()
        self._consoles += 1
        self.nursery.start_soon(self.console.handle_stream, server_end, name=f"console[{self._consoles}]")
        client = LineClient(client_end)
        if greet:
            assert await client.read_response() == [GREETING]
        return client

    async def start(self, call_id: str, config: SimConfig | None = None) -> None:
        self.sim.expect(call_id, config)
        await self.supervisor.start_session(call_id, media_uri(call_id))

    async def http_get(self, target: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        """One request through the HTTP server's connection handler, parsed by h11's client side."""
        client_end, server_end = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.http.handle_connection, server_end, name="http[test]")
        client = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method=method, target=target, headers=[("host", "test"), ("connection", "close")]
        )
        await client_end.send_all(client.send(request) + client.send(h11.EndOfMessage()))
        status, headers, body = 0, {}, bytearray()
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(bytes(await client_end.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, headers, bytes(body)

    async def scrape(self) -> dict[str, float]:
        """/metrics as {sample name with sorted labels: value}."""
        status, headers, body = await self.http_get("/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples


@asynccontextmanager
async def open_daemon(
    nursery: trio.Nursery,
    *,
    engine: SyntheticEngine | None = None,
    token: str | None = None,
    timeouts: ConsoleTimeouts = ConsoleTimeouts(),
) -> AsyncIterator[Daemon]:
    sim = AsteriskSimulator(seed=42)
    engine = engine or SyntheticEngine(seconds_per_char=0.1, speed=2.0)
    bus = EventBus()
    metrics = Metrics()
    async with open_supervisor(
        engines={engine.name: engine},
        default_engine=engine.name,
        dialer=memory_dialer(sim, nursery),
        events=bus,
        config=SessionConfig(),
    ) as supervisor:
        metrics.attach(bus, supervisor)
        readiness = Readiness(command_plane_connected=True)
        console = Console(supervisor, bus, metrics=metrics, token=token, timeouts=timeouts)
        http = HttpServer(health_routes(supervisor, readiness, metrics))
        yield Daemon(supervisor, bus, metrics, console, readiness, http, sim, nursery)


async def wait_for_event(bus: EventBus, kind: type[ev.SessionEvent], call_id: str) -> ev.SessionEvent:
    with bus.subscribe("test") as subscription:
        async for event in subscription:
            if isinstance(event, kind) and event.call_id == call_id:
                return event
    raise AssertionError("bus closed")


def columns(rows: list[str]) -> list[dict[str, str]]:
    """Parse a console table (header + whitespace-separated rows) into dicts."""
    header = rows[0].lower().split()
    return [dict(zip(header, row.split(), strict=True)) for row in rows[1:]]


# -- "done means" ---------------------------------------------------------------------------------------


async def test_operator_lists_flushes_stops_reads_tasks_and_scrapes(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")
        await daemon.start("c2")
        console = await daemon.connect()
        with daemon.bus.subscribe("playing") as playing:
            assert (await console.command(f"say c1 {LONG_TEXT}"))[0].startswith("ok message_id=")
            assert (await console.command(f"say c2 {LONG_TEXT}"))[0].startswith("ok message_id=")
            started = set()
            async for event in playing:
                if isinstance(event, ev.PlayStarted):
                    started.add(event.call_id)
                    if started == {"c1", "c2"}:
                        break
        await trio.sleep(1.0)

        listed = columns(await console.command("sessions"))
        assert [row["id"] for row in listed] == ["c1", "c2"]
        assert {row["state"] for row in listed} == {"speaking"}
        assert all(int(row["frames_sent"]) >= 40 for row in listed)  # 1 s at 50 frames/s
        assert {row["vendor"] for row in listed} == {"synthetic/en-US"}
        assert {row["last_event"] for row in listed} == {"play_started"}

        flushed = await console.command("flush c1")
        assert len(flushed) == 1 and flushed[0].startswith("ok frames_dropped=")
        dropped = int(flushed[0].split()[1].split("=")[1])
        assert dropped > 0  # the vendor ran ahead at 2x real time: audio was queued
        assert await console.command("stop c2") == ["ok"]

        tree = await console.command("tasks")
        names = [line.strip().split("  @ ")[0] for line in tree]
        assert {"session[c1]", "media[c1]", "vendor[c1]"} <= set(names)
        assert not [name for name in names if "[c2]" in name]
        assert tasks_of("c2") == []  # cross-check with the test suite's own walk

        listed = columns(await console.command("sessions"))
        assert [(row["id"], row["state"], row["last_event"]) for row in listed] == [("c1", "idle", "flushed")]

        metrics = await daemon.scrape()
        assert metrics["tts_streamer_flushes_total"] == 1
        assert metrics["tts_streamer_frames_dropped_by_flush_total"] == dropped
        assert metrics["tts_streamer_flush_to_silence_seconds_count"] == 1
        assert metrics["tts_streamer_sessions_ended_total{reason=stopped}"] == 1
        assert metrics["tts_streamer_sessions_started_total"] == 2
        assert metrics["tts_streamer_active_sessions"] == 1
        assert metrics["tts_streamer_frames_sent_total"] >= 80
        assert metrics["tts_streamer_pacing_lateness_seconds_count"] > 0


# -- commands -------------------------------------------------------------------------------------------


async def test_unknown_command_and_bad_arguments_are_one_line_errors(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")
        console = await daemon.connect()
        assert await console.command("frobnicate") == [
            "error: unknown_command: unknown command 'frobnicate' (try help)"
        ]
        assert await console.command("show") == ["error: bad_argument: usage: show <id> [--json]"]
        assert await console.command("flush a b") == ["error: bad_argument: usage: flush <id> [--json]"]
        assert await console.command("say c1") == ["error: bad_argument: usage: say [--json] <id> <text>"]
        assert await console.command("sessions --all") == [
            "error: bad_argument: unknown option --all (usage: sessions [--json])"
        ]
        assert await console.command("flush nobody") == [
            "error: unknown_session: no session with id 'nobody'"
        ]
        assert await console.command("finish c1") == ["error: no_message: say_finish before say_init"]
        await console.send_line("say c1 \x00")
        assert await console.read_response() == ["error: bad_text: text contains a NUL character"]
        await console.stream.send_all(b"help \xff\n")
        assert (await console.read_response())[0].startswith("error: bad_text:")
        # Still usable, and nothing reached the session.
        assert columns(await console.command("sessions"))[0]["state"] == "idle"
        assert await console.command("") == []
        metrics = await daemon.scrape()
        assert metrics["tts_streamer_command_errors_total{kind=unknown_command}"] == 1
        assert metrics["tts_streamer_command_errors_total{kind=bad_argument}"] == 4
        assert metrics["tts_streamer_command_errors_total{kind=unknown_session}"] == 1
        assert metrics["tts_streamer_command_errors_total{kind=no_message}"] == 1
        assert metrics["tts_streamer_command_errors_total{kind=bad_text}"] == 1


async def test_json_output_parses_for_every_command(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")
        console = await daemon.connect()
        said = await console.json_rows("say --json c1 hello there --json")
        assert said[0]["ok"] is True and isinstance(said[0]["message_id"], str)
        await wait_for_event(daemon.bus, ev.PlayStarted, "c1")
        (row,) = await console.json_rows("sessions --json")
        assert row["id"] == "c1" and row["state"] == "speaking" and row["last_event"] == "play_started"
        assert isinstance(row["frames_sent"], int) and isinstance(row["lateness_p99_ms"], float)
        (shown,) = await console.json_rows("show c1 --json")
        assert shown["message_id"] == said[0]["message_id"]
        events = shown["events"]
        assert isinstance(events, list)
        assert [e["event"] for e in events] == ["initiated", "vendor_first_audio", "play_started"]
        (flushed,) = await console.json_rows("flush --json c1")
        assert flushed["ok"] is True and isinstance(flushed["frames_dropped"], int)
        tasks = await console.json_rows("tasks --json")
        assert tasks[0]["depth"] == 0 and {"session[c1]", "media[c1]"} <= {t["name"] for t in tasks}
        (stats,) = await console.json_rows("stats --json")
        assert stats["sessions_live"] == 1 and stats["sessions_started"] == 1 and stats["consoles_open"] == 1
        assert {h["command"] for h in await console.json_rows("help --json")} >= {"sessions", "quit"}
        (error,) = await console.json_rows("show nobody --json")
        assert error["error"] == "unknown_session"
        assert await console.json_rows("stop c1 --json") == [{"ok": True}]
        assert await console.json_rows("sessions --json") == []


async def test_say_opens_a_message_only_when_none_is_open(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")
        console = await daemon.connect()
        first = await console.command("say c1 one two")
        second = await console.command("say c1 three")
        assert first == second  # same message: the second say only added text
        assert await console.command("finish c1") == ["ok"]
        # Finished but still playing out: say starts a new message rather than failing.
        third = await console.command("say c1 four")
        assert third[0].startswith("ok message_id=") and third != first
        finished = await wait_for_event(daemon.bus, ev.PlayFinished, "c1")
        assert isinstance(finished, ev.PlayFinished) and finished.text == "one two three"


async def test_show_has_details_and_recent_events_even_shortly_after_stop(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")
        console = await daemon.connect()
        await console.command("say c1 hello")
        await wait_for_event(daemon.bus, ev.PlayStarted, "c1")
        shown = await console.command("show c1")
        details = dict(line.split(None, 1) for line in shown if not line.startswith(("events:", "  ")))
        assert details["id"] == "c1" and details["state"] == "speaking" and details["connection_id"] == "c1"
        assert details["media_uri"] == media_uri("c1") and int(details["frames_sent"]) > 0
        assert "events: 3 recent" in shown
        event_lines = [line.split() for line in shown if line.startswith("  ")]
        assert event_lines[0][:2] == ["AGO_S", "EVENT"]
        assert [line[1] for line in event_lines[1:]] == ["initiated", "vendor_first_audio", "play_started"]
        await console.command("stop c1")
        after = await console.command("show c1")
        assert after[:2] == ["id     c1", "state  ended"]
        assert after[-1].split()[1:3] == ["stopped", "reason=stopped"]


async def test_event_history_is_bounded_and_forgets_stopped_sessions(autojump_clock):
    history = EventHistory(per_session=3, retention=60.0)
    for n in range(5):
        history.record(ev.Initiated("c1", f"m{n}"))
    assert [e.message_id for _, _, e in history.recent("c1")] == ["m2", "m3", "m4"]  # type: ignore[union-attr]
    history.record(ev.Stopped("c1", "stopped"))
    await trio.sleep(59)
    assert history.recent("c1")
    await trio.sleep(2)
    assert history.recent("c1") == []


async def test_event_history_keeps_only_the_start_of_long_texts(autojump_clock):
    history = EventHistory()
    long_text = "word " * 2000
    history.record(ev.PlayFinished("c1", "m1", long_text, texts_added=3, frames_sent=500, flushes=0))
    [(_, _, kept)] = history.recent("c1")
    assert isinstance(kept, ev.PlayFinished) and kept.text == long_text[: HISTORY_TEXT_CHARS - 1] + "…"
    assert (kept.message_id, kept.texts_added, kept.frames_sent) == ("m1", 3, 500)


async def test_events_follows_live_and_ends_on_any_line(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")
        await daemon.start("c2")
        follower, operator = await daemon.connect(), await daemon.connect()
        await follower.send_line("events c1")
        assert await follower.read_line() == "# following events of session c1; send any line to stop"
        await operator.command("say c2 other call")
        await operator.command("say c1 hello")
        first = await follower.read_line()
        assert first is not None and first.split()[1:3] == ["c1", "initiated"]
        second = await follower.read_line()
        assert second is not None and second.split()[1:3] == ["c1", "vendor_first_audio"]
        third = await follower.read_line()
        assert third is not None and third.split()[1:3] == ["c1", "play_started"]
        await follower.send_line("")
        assert await follower.read_response() == []
        assert daemon.bus.subscriptions == []
        assert await follower.command("sessions --json") != []  # the console goes on after following

        await follower.send_line("events --json")
        await operator.command("flush c2")
        row = json.loads(await follower.read_line() or "")
        assert row["id"] == "c2" and row["event"] == "flushed" and "frames_dropped" in row
        await follower.send_line("stop")  # any line stops following; it is not run as a command
        assert await follower.read_response() == []
        assert [row["id"] for row in await follower.json_rows("sessions --json")] == ["c1", "c2"]


async def test_two_consoles_work_at_once(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")
        await daemon.start("c2")
        one, two = await daemon.connect(), await daemon.connect()
        results: dict[str, list[str]] = {}

        async def run(name: str, client: object, line: str) -> None:
            assert isinstance(client, LineClient)
            results[name] = await client.command(line)

        async with trio.open_nursery() as both:
            both.start_soon(run, "one", one, "say c1 from console one")
            both.start_soon(run, "two", two, "say c2 from console two")
        assert results["one"][0].startswith("ok") and results["two"][0].startswith("ok")
        stats = dict(line.split() for line in await one.command("stats"))
        assert stats["consoles_open"] == "2" and stats["consoles_total"] == "2"
        assert [name for name in (line.strip().split()[0] for line in await two.command("tasks"))].count(
            "console[1]"
        ) == 1


async def test_client_vanishing_mid_events_disturbs_nothing(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        await daemon.start("c1")
        follower, operator = await daemon.connect(), await daemon.connect()
        await follower.send_line("events")
        assert (await follower.read_line() or "").startswith("# following")
        await operator.command(f"say c1 {LONG_TEXT}")
        await follower.stream.aclose()  # gone without a word, mid-stream
        await trio.sleep(0.5)
        assert daemon.bus.subscriptions == []
        assert "console[1]" not in [name.strip().split()[0] for name in await operator.command("tasks")]
        stats = dict(line.split() for line in await operator.command("stats"))
        assert stats["consoles_open"] == "1"
        # The session kept speaking and still takes commands.
        assert columns(await operator.command("sessions"))[0]["state"] == "speaking"
        assert (await operator.command("flush c1"))[0].startswith("ok")


async def test_a_client_that_stops_reading_is_dropped_by_the_write_timeout(nursery, autojump_clock):
    async with open_daemon(nursery, timeouts=ConsoleTimeouts(write=2.0)) as daemon:
        await daemon.start("c1")
        # A lockstep stream has no buffer: the server's writes block until the client reads.
        _client_end, server_end = trio.testing.lockstep_stream_pair()
        done = trio.Event()

        async def serve() -> None:
            await daemon.console.handle_stream(server_end)
            done.set()

        nursery.start_soon(serve)
        with trio.fail_after(10):
            await done.wait()  # the greeting was never read
        operator = await daemon.connect()
        assert (await operator.command("say c1 still fine"))[0].startswith("ok")


async def test_idle_and_half_written_lines_time_out(nursery, autojump_clock):
    async with open_daemon(nursery, timeouts=ConsoleTimeouts(idle=60.0, line=5.0)) as daemon:
        idle = await daemon.connect()
        start = trio.current_time()
        assert await idle.read_response() == ["error: timeout: nothing received in time, closing"]
        assert await idle.read_line() is None
        assert trio.current_time() - start == pytest.approx(60.0)

        partial = await daemon.connect()
        await partial.stream.send_all(b"sess")
        start = trio.current_time()
        assert await partial.read_response() == ["error: timeout: nothing received in time, closing"]
        assert trio.current_time() - start == pytest.approx(5.0)


async def test_quit_closes_only_this_console(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        one, two = await daemon.connect(), await daemon.connect()
        assert await one.command("quit") == ["bye"]
        assert await one.read_line() is None
        assert await two.command("help") != []


async def test_token_must_be_the_first_line(nursery, autojump_clock):
    async with open_daemon(nursery, token="s3cret") as daemon:
        wrong = await daemon.connect(greet=False)
        await wrong.send_line("sessions")
        assert await wrong.read_response() == ["error: bad_token: the first line must be the console token"]
        assert await wrong.read_line() is None
        right = await daemon.connect(greet=False)
        await right.send_line("s3cret")
        assert await right.read_response() == [GREETING]
        assert await right.command("sessions") == [
            "ID  STATE  VENDOR  AGE_S  FRAMES_SENT  QUEUED_MS  LATENESS_P99_MS  LAST_EVENT"
        ]


def test_parse_keeps_say_text_and_finds_json_flags():
    assert parse("say c1   hello   world ").args == ["c1", "hello   world"]
    assert parse("say\t--json c1\thi").args == ["c1", "hi"]
    with pytest.raises(ConsoleError):
        parse("say --json c1")
    assert parse("say c1 use --json literally").json is False
    assert parse("say --json c1 hi").json is True
    assert parse("SESSIONS --json").name == "sessions"
    assert with_json("say c1 hi --json") == "say --json c1 hi --json"
    assert with_json("show c1") == "show c1 --json"
    assert with_json("sessions --json") == "sessions --json"


# -- real sockets, real clock ---------------------------------------------------------------------------


def idle_supervisor(nursery: trio.Nursery) -> tuple[Supervisor, EventBus]:
    engine = SyntheticEngine()
    bus = EventBus()
    dialer = memory_dialer(AsteriskSimulator(), nursery)
    return Supervisor(
        nursery, engines={engine.name: engine}, default_engine=engine.name, dialer=dialer, events=bus
    ), bus


@asynccontextmanager
async def serving_console(nursery: trio.Nursery, **options: Any) -> AsyncIterator[Any]:
    """serve_console on a real socket for the body's duration; yields the address it reports."""
    supervisor, bus = idle_supervisor(nursery)
    async with trio.open_nursery() as servers:
        yield await servers.start(partial(serve_console, supervisor, bus, **options))
        servers.cancel_scope.cancel()


async def start_console(nursery: trio.Nursery, **options: Any) -> object:
    supervisor, bus = idle_supervisor(nursery)
    return await nursery.start(partial(serve_console, supervisor, bus, **options))


@pytest.mark.realtime
async def test_unix_socket_is_private_replaces_stale_files_and_speaks_to_nc(nursery, tmp_path):
    path = str(tmp_path / "console.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a leftover socket file nobody listens on
    with trio.fail_after(5):
        async with serving_console(nursery, unix_path=path) as address:
            assert address == path
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            # nc -U style: raw lines, no client library, the last one without a newline.
            raw = await trio.open_unix_socket(path)
            await raw.send_all(b"stats\r\nsessions\nhelp")
            await raw.send_eof()
            received = bytearray()
            while data := await raw.receive_some(65536):
                received += data
            text = received.decode()
            assert text.startswith(GREETING + "\n\n")
            responses = text.split("\n\n")
            assert responses[1].startswith("uptime_s")
            assert responses[2].split()[:2] == ["ID", "STATE"]
            assert responses[3].startswith("sessions ")
            await raw.aclose()
            # A second daemon must not steal a live console's socket.
            with pytest.raises(ConsoleConfigError, match="another process"):
                await start_console(nursery, unix_path=path)
        not_a_socket = tmp_path / "plain-file"
        not_a_socket.write_text("keep me")
        with pytest.raises(ConsoleConfigError, match="not a socket"):
            await start_console(nursery, unix_path=str(not_a_socket))
        assert not_a_socket.read_text() == "keep me"
        assert not await trio.Path(path).exists()  # removed on shutdown


@pytest.mark.realtime
async def test_non_loopback_tcp_needs_a_token_and_loopback_tcp_works(nursery):
    with trio.fail_after(5):
        with pytest.raises(ConsoleConfigError, match="set a token"):
            await start_console(nursery, host="0.0.0.0", port=0)
        async with serving_console(nursery, host="0.0.0.0", port=0, token="t0ken") as address:
            assert isinstance(address, tuple)
            stream = await trio.open_tcp_stream("127.0.0.1", address[1])
            client = LineClient(stream)
            await client.send_line("t0ken")
            assert await client.read_response() == [GREETING]
            assert (await client.command("help"))[0].startswith("sessions")
            await stream.aclose()
        async with serving_console(nursery, host="127.0.0.1", port=0) as address:
            stream = await trio.open_tcp_stream("127.0.0.1", address[1])
            assert await LineClient(stream).read_response() == [GREETING]
            await stream.aclose()


@pytest.mark.realtime
async def test_console_client_runs_commands_against_the_socket(nursery, tmp_path, monkeypatch):
    path = str(tmp_path / "c.sock")
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    with trio.fail_after(5):
        async with serving_console(nursery, unix_path=path):

            def run(*argv: str) -> tuple[int, str]:
                out = StringIO()
                with redirect_stdout(out):
                    status = run_console_client(["--socket", path, *argv])
                return status, out.getvalue()

            status, out = await trio.to_thread.run_sync(run, "stats")
            assert status == 0 and "sessions_live" in out
            status, out = await trio.to_thread.run_sync(run, "--json", "sessions")
            assert status == 0 and out == ""
            status, out = await trio.to_thread.run_sync(run, "--json", "show", "nobody")
            assert status == 1 and json.loads(out)["error"] == "unknown_session"
            status, _ = await trio.to_thread.run_sync(
                run, "--timeout", "1", "--socket", str(tmp_path / "no.sock")
            )
            assert status == 1


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("unix sockets and modes as on Linux")
