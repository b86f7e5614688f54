"""Vendor latency as production will see it: the real adapters, through TLS and a one-way network delay, to
their loopback fakes, driven by real sessions speaking into the Asterisk simulator. ``python -m
bench.vendors`` (``make bench`` runs it; ``--quick`` is the smoke form ``make test`` uses).

Each vendor's fake sits behind a ``bench.netem.DelayProxy`` (TLS with a CA generated at run time, ``--delay``
one way, a new connection costing a TCP and a TLS round trip). One process: the supervisor with the
shipped session config, a websocket dialer to the simulator on loopback, the fakes and the proxies. All
times are Trio's clock, stamped where the simulator read a message (``on the wire``). Per vendor:

- cold first audio: a fresh engine (new channel / pool / socket), say_add of a call's first utterance ->
  its first audio message at the simulator; "no warm-up" and "warmed" (``warm()`` awaited first, as the
  daemon does at start-up);
- first audio, first utterance of later calls, and of later utterances of a call (warm engine);
- flush: say_flush (barge-in, mid-utterance) -> FLUSH_MEDIA read by the simulator; -> the command answered;
  -> the vendor released at the fake (RPC ended / context closed or socket closed / body dropped);
  audio messages of the flushed utterance read after FLUSH_MEDIA;
- the fallback chain (elevenlabs > gcp > aws): first audio when the primary fails before any audio, and
  the longest silence heard (the simulator's empty ticks inside an utterance) when it stalls mid-utterance.
- connections: TLS handshakes at each proxy during the warm part, and during later utterances of a call.

Targets (with --delay 0.04): first audio of a later utterance <= one round trip + the fake's own delay (p50,
with ALLOWANCE_MS for processing; an extra round trip costs 80 ms) and no TLS handshake for it;
FLUSH_MEDIA p99 < 5 ms after the command, whatever the vendor.

Over the ~400-line guide: one scenario (three fakes behind their proxies, the sessions, the
measurement and its table) that reads top to bottom; its engines live in bench/voices.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.netem import Certificates, make_certificates
from bench.voices import cloud_engine
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFlush, SayInit
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.chan_websocket.client import websocket_dialer
from tts_streamer.adapters.engines import warm_engine
from tts_streamer.adapters.fallback import FallbackEngine
from tts_streamer.adapters.voice import VoiceEngine
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimCall, serve_asterisk_simulator
from tts_streamer.supervisor.gc_tuning import tune_gc
from tts_streamer.supervisor.sessions import Supervisor, open_supervisor

TEXT = "Hello there, this is a sentence of ordinary length. And here is another one to follow it."
FALLBACK_TEXT = "This is the fallback test, spoken by whichever vendor is up. It goes on for a while."
POLL = 0.0005
FAR_POLL = 0.001  # asking the far side costs a pipe round trip
ROOT = Path(__file__).resolve().parent.parent
CLOUD = ("gcp", "elevenlabs", "aws")  # the order the rows are measured in
WAIT = 10.0  # bound on every wait for audio, a flush or a release


@attrs.frozen
class Settings:
    delay: float = 0.04
    fake_delay: float = 0.05
    calls: int = 10
    utterances: int = 5
    cold: int = 5
    speak_before_flush: float = 0.15
    fallback_runs: int = 5
    quick: bool = False

    @property
    def rtt(self) -> float:
        return 2 * self.delay


class NullSink:
    def emit(self, event: ev.SessionEvent) -> None:
        pass


@attrs.define
class Figures:
    cold: list[float] = attrs.Factory(list)
    cold_warmed: list[float] = attrs.Factory(list)
    cold_connections: list[int] = attrs.Factory(list)  # handshakes a cold first utterance caused
    warmed_connections: list[int] = attrs.Factory(list)  # handshakes after warm(), during the utterance
    first_of_call: list[float] = attrs.Factory(list)
    later: list[float] = attrs.Factory(list)
    flush_media: list[float] = attrs.Factory(list)
    flush_ack: list[float] = attrs.Factory(list)
    released: list[float] = attrs.Factory(list)
    stale_after_flush: int = 0
    utterances: int = 0
    connections: int = 0  # handshakes during the warm-engine part
    later_connections: int = 0  # of those, while a later utterance of a call spoke (a per-call socket: 0)


class FarSide:
    """The fakes and proxies in their own process (``bench.vendor_fakes``), asked over its stdin/stdout."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self._process = process
        self._stdin = process.stdin
        self._stdout = process.stdout
        self._buffer = b""
        self._lock = trio.Lock()
        self.ports: dict[str, int] = {}

    async def read(self) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            while b"\n" not in self._buffer:
                data = await self._stdout.receive_some(65536)
                if not data:
                    raise RuntimeError("bench.vendor_fakes ended")
                self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        value: dict[str, Any] = json.loads(line)
        return value

    async def ask(self, command: str) -> dict[str, Any]:
        async with self._lock:
            await self._stdin.send_all(command.encode() + b"\n")
            return await self.read()

    async def released(self, vendor: str) -> bool:
        return bool((await self.ask("state"))["open"][vendor] == 0)

    async def connections(self, vendor: str) -> int:
        return int((await self.ask("state"))["connections"][vendor])


@attrs.define
class Rig:
    """One vendor: its fake behind a proxy (far side), and a factory for fresh engines pointed at it."""

    name: str
    far: FarSide
    make: Callable[[], VoiceEngine]

    async def released(self) -> bool:
        return await self.far.released(self.name)

    async def connections(self) -> int:
        return await self.far.connections(self.name)


def _ms(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] * 1000


def _p(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values) * 1000:.1f} / {_ms(values, 0.9):.1f} / {_ms(values, 0.99):.1f}"


async def _until(predicate: Callable[[], bool]) -> float:
    with trio.fail_after(WAIT):
        while not predicate():  # noqa: ASYNC110 - the simulator exposes state, not events
            await trio.sleep(POLL)
    return trio.current_time()


async def _until_released(rig: Rig) -> float:
    with trio.fail_after(WAIT):
        while not await rig.released():  # noqa: ASYNC110 - another process's state, polled
            await trio.sleep(FAR_POLL)
    return trio.current_time()


def _first_audio_after(call: SimCall, since: float, start: int) -> float | None:
    for message in call.messages[start:]:
        if message.time >= since and message.length > 0:
            return message.time
    return None


async def _speak_first_audio(sup: Supervisor, sim: AsteriskSimulator, cid: str, text: str) -> float:
    call = sim.calls[cid]
    start = len(call.messages)
    sent = trio.current_time()
    await sup.call(cid, SayAdd(text))
    await _until(lambda: _first_audio_after(call, sent, start) is not None)
    at = _first_audio_after(call, sent, start)
    assert at is not None
    return at - sent


async def _flush(sup: Supervisor, sim: AsteriskSimulator, cid: str, rig: Rig, figures: Figures) -> None:
    call = sim.calls[cid]
    controls = len(call.controls)
    sent = trio.current_time()
    await sup.call(cid, SayFlush())
    figures.flush_ack.append(trio.current_time() - sent)

    def flush_media() -> float | None:
        for control in call.controls[controls:]:
            if "FLUSH_MEDIA" in control.raw:
                return control.time
        return None

    await _until(lambda: flush_media() is not None)
    at = flush_media()
    assert at is not None
    figures.flush_media.append(at - sent)
    figures.released.append(await _until_released(rig) - sent)
    figures.stale_after_flush += sum(1 for m in call.messages if m.time > at and m.length > 0)


async def _session(sup: Supervisor, uri: str, cid: str, engine: str) -> None:
    await sup.start_session(cid, uri + cid, engine=engine)
    await sup.call(cid, SayInit())


async def measure(rig: Rig, sup: Supervisor, sim: AsteriskSimulator, uri: str, s: Settings) -> Figures:
    figures = Figures()
    # Cold: a fresh engine per run (new channel, pool or socket), with and without warm-up.
    for run in range(s.cold * 2):
        warmed = run % 2 == 1
        engine = rig.make()
        if warmed:
            problem = await warm_engine(engine, within=5.0)
            if problem:
                raise RuntimeError(f"{rig.name} warm-up failed: {problem}")
        name = f"{rig.name}-cold{run}"
        sup.engines[name] = engine
        cid = f"{name}-call"
        await _session(sup, uri, cid, name)
        before = await rig.connections()
        first = await _speak_first_audio(sup, sim, cid, TEXT)
        (figures.cold_warmed if warmed else figures.cold).append(first)
        (figures.warmed_connections if warmed else figures.cold_connections).append(
            await rig.connections() - before
        )
        await _flush(sup, sim, cid, rig, Figures())
        await sup.stop(cid)
        del sup.engines[name]
        await _close(engine)
    # Warm: one engine for many calls and utterances, as the daemon runs.
    engine = rig.make()
    await warm_engine(engine, within=5.0)
    sup.engines[rig.name] = engine
    before = await rig.connections()
    for c in range(s.calls):
        cid = f"{rig.name}-{c}"
        await _session(sup, uri, cid, rig.name)
        for u in range(s.utterances):
            before_utterance = await rig.connections() if u > 0 else 0
            first = await _speak_first_audio(sup, sim, cid, TEXT)
            (figures.first_of_call if u == 0 else figures.later).append(first)
            figures.utterances += 1
            await trio.sleep(s.speak_before_flush)
            await _flush(sup, sim, cid, rig, figures)
            if u > 0:
                figures.later_connections += await rig.connections() - before_utterance
        await sup.stop(cid)
    figures.connections = await rig.connections() - before
    return figures


@attrs.define
class FallbackFigures:
    first_audio_primary_down: list[float] = attrs.Factory(list)
    silence_on_stall_ms: list[float] = attrs.Factory(list)


async def measure_fallback(
    rigs: dict[str, Rig],
    far: FarSide,
    sup: Supervisor,
    sim: AsteriskSimulator,
    uri: str,
    s: Settings,
) -> FallbackFigures:
    chain = [rigs["elevenlabs"].make(), rigs["gcp"].make(), rigs["aws"].make()]
    for engine in chain:
        await warm_engine(engine, within=5.0)
    fallback = FallbackEngine(chain, first_audio_timeout=2.0, stall_timeout=1.0, cooldown=0.0)
    sup.engines["fallback"] = fallback
    out = FallbackFigures()
    for run in range(s.fallback_runs):
        cid = f"fallback-error-{run}"
        await _session(sup, uri, cid, "fallback")
        await far.ask("fault elevenlabs error 0")
        out.first_audio_primary_down.append(await _speak_first_audio(sup, sim, cid, FALLBACK_TEXT))
        await trio.sleep(s.speak_before_flush)
        await sup.call(cid, SayFlush())
        await sup.stop(cid)
        await far.ask("clear")
    for run in range(s.fallback_runs):
        cid = f"fallback-stall-{run}"
        await _session(sup, uri, cid, "fallback")
        await far.ask("fault elevenlabs stall 1600")
        call = sim.calls[cid]
        start = trio.current_time()
        await _speak_first_audio(sup, sim, cid, FALLBACK_TEXT)
        await trio.sleep(2.5)  # past the stall timeout and the switch, while the next vendor speaks
        gaps = [g.ticks * 20.0 for g in call.gaps if g.start >= start]
        out.silence_on_stall_ms.append(max(gaps, default=0.0))
        await sup.call(cid, SayFlush())
        await sup.stop(cid)
        await far.ask("clear")
    del sup.engines["fallback"]
    for engine in chain:
        await _close(engine)
    return out


async def _close(engine: VoiceEngine) -> None:
    aclose: Callable[[], Awaitable[None]] | None = getattr(engine, "aclose", None)
    if aclose is not None:
        await aclose()


def _rigs(certs: Certificates, far: FarSide) -> dict[str, Rig]:
    # The ports are read when an engine is made: the far side reports them after it started.
    return {
        name: Rig(name, far, partial(lambda n: cloud_engine(n, far.ports, certs), name)) for name in CLOUD
    }


async def run(s: Settings, certs: Certificates) -> tuple[dict[str, Figures], FallbackFigures]:
    command = [sys.executable, "-m", "bench.vendor_fakes", str(certs.ca_file.parent), str(s.delay)]
    command.append(str(s.fake_delay))
    sim = AsteriskSimulator(accept_any=True)
    async with trio.open_nursery() as nursery:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
        )
        try:
            far = FarSide(process)
            far.ports = {k: int(v) for k, v in (await far.read())["ports"].items()}
            rigs = _rigs(certs, far)
            port = await nursery.start(serve_asterisk_simulator, sim, "127.0.0.1", 0)
            uri = f"ws://127.0.0.1:{port}/media/"
            placeholder = rigs["gcp"].make()
            async with open_supervisor(
                engines={"placeholder": placeholder},
                default_engine="placeholder",
                dialer=websocket_dialer(),
                events=NullSink(),
                config=SessionConfig(),
            ) as sup:
                results = {}
                for name, rig in rigs.items():
                    print(f"vendors: {name} ...", flush=True)
                    results[name] = await measure(rig, sup, sim, uri, s)
                print("vendors: fallback chain ...", flush=True)
                fallback = await measure_fallback(rigs, far, sup, sim, uri, s)
            await _close(placeholder)
        finally:
            with trio.move_on_after(5) as cleanup:
                cleanup.shield = True
                assert process.stdin is not None
                await process.stdin.aclose()  # EOF: the far side ends
                await process.wait()
            if process.returncode is None:
                process.kill()
        nursery.cancel_scope.cancel()
    return results, fallback


ALLOWANCE_MS = 20.0  # the adapters' and fakes' own processing; any extra round trip costs >= 2 x delay


def evaluate(s: Settings, results: dict[str, Figures]) -> list[tuple[str, str, str]]:
    """(target, PASS|FAIL, detail) per vendor. "No handshake" is judged twice: the p50 first audio of a
    later utterance within one round trip + the fake's delay + ALLOWANCE_MS, and no TLS handshake at
    the proxy while a warm engine spoke them (a call's own socket, opened at its start, is not one)."""
    budget = (s.rtt + s.fake_delay) * 1000 + ALLOWANCE_MS
    out = []
    for name, f in results.items():
        p50 = statistics.median(f.later) * 1000 if f.later else math.nan
        ok = p50 <= budget and f.later_connections == 0
        out.append(
            (
                f"{name}: first audio of a later utterance <= RTT + fake delay (+ {ALLOWANCE_MS:.0f} ms "
                f"processing) = {budget:.0f} ms, no handshake",
                "PASS" if ok else "FAIL",
                f"p50 {p50:.1f} ms, p90 {_ms(f.later, 0.9):.1f} ms over {len(f.later)} utterances; "
                f"{f.later_connections} TLS handshakes for {len(f.later)} later utterances "
                f"({f.connections} for all {f.utterances})",
            )
        )
        p99 = _ms(f.flush_media, 0.99)
        out.append(
            (
                f"{name}: FLUSH_MEDIA p99 < 5 ms after the command",
                "PASS" if p99 < 5.0 else "FAIL",
                f"p99 {p99:.2f} ms over {len(f.flush_media)} flushes",
            )
        )
    return out


def render(s: Settings, results: dict[str, Figures], fallback: FallbackFigures, note: str) -> str:
    today = datetime.date.today().isoformat()
    lines = [
        f"# Vendor adapters through TLS and a {s.delay * 1000:.0f} ms one-way delay, {today}"
        + (" (quick smoke run)" if s.quick else ""),
        "",
        f"- the fakes answer after {s.fake_delay * 1000:.0f} ms; round trip {s.rtt * 1000:.0f} ms; a new "
        "connection costs TCP + TLS 1.3 (two round trips) before the request",
        f"- {s.calls} calls x {s.utterances} utterances per vendor, each flushed "
        f"{s.speak_before_flush * 1000:.0f} ms after its first audio; cold rows: {s.cold} fresh engines each",
        "- sessions: the shipped SessionConfig (PacingConfig defaults) and tune_gc(), real websocket dialer, "
        "the Asterisk simulator on loopback, in the measured process; the fakes and the proxies in another; "
        "times are where the simulator read each message",
        f"- {note}" if note else "",
        "",
        "Figures: p50 / p90 / p99 ms.",
        "",
        "| vendor | cold first audio, no warm-up | cold first audio, warmed "
        "| first utterance of a later call | later utterance | FLUSH_MEDIA after command "
        "| flush answered | vendor released at the fake | audio after FLUSH_MEDIA "
        "| TLS handshakes: cold / warmed utterance; warm part |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, f in results.items():
        lines.append(
            f"| {name} | {_p(f.cold)} | {_p(f.cold_warmed)} | {_p(f.first_of_call)} | {_p(f.later)} "
            f"| {_p(f.flush_media)} | {_p(f.flush_ack)} | {_p(f.released)} | {f.stale_after_flush} "
            f"| {sum(f.cold_connections)}/{len(f.cold)} / {sum(f.warmed_connections)}/{len(f.cold_warmed)}; "
            f"{f.connections} for {f.utterances} utterances |"
        )
    silence = fallback.silence_on_stall_ms
    lines += [
        "",
        "Fallback chain elevenlabs > gcp > aws (cooldown off, so every run starts at ElevenLabs):",
        "",
        "| case | figure |",
        "|---|---|",
        f"| primary errors before any audio: first audio (p50 / p90 / p99 ms) | "
        f"{_p(fallback.first_audio_primary_down)} |",
        f"| primary stalls after 200 ms of audio: longest silence heard, ms (each run) | "
        f"{', '.join(f'{x:.0f}' for x in silence) or '-'} |",
        "",
        "## Targets",
        "",
    ]
    lines += [f"- **{status}** {name}: {detail}" for name, status, detail in evaluate(s, results)]
    return "\n".join(line for line in lines) + "\n"


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench.vendors", description=__doc__)
    parser.add_argument("--delay", type=float, default=0.04, help="one-way delay, seconds (default 0.04)")
    parser.add_argument("--fake-delay", type=float, default=0.05, help="the fakes' own first-audio delay")
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--utterances", type=int, default=5)
    parser.add_argument("--cold", type=int, default=5, help="fresh engines for the cold rows")
    parser.add_argument("--fallback-runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 calls x 2 utterances, 1 cold")
    parser.add_argument("--note", default="", help="a line for the results file (e.g. machine load)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    s = Settings(
        delay=args.delay,
        fake_delay=args.fake_delay,
        calls=2 if args.quick else args.calls,
        utterances=2 if args.quick else args.utterances,
        cold=1 if args.quick else args.cold,
        fallback_runs=1 if args.quick else args.fallback_runs,
        quick=args.quick,
    )
    return s, args


def main(argv: list[str] | None = None) -> int:
    s, args = parse_args(argv)
    tune_gc()  # as `serve` does before serving: the measured process runs as the daemon ships
    with tempfile.TemporaryDirectory(prefix="tts-bench-tls-") as folder:
        # A throwaway CA per run: the adapters trust it through their custom-CA options.
        results, fallback = trio.run(run, s, make_certificates(Path(folder)))
    text = render(s, results, fallback, args.note)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if s.quick else ""
    path = args.out / f"{datetime.date.today().isoformat()}-vendors{suffix}.md"
    path.write_text(text)
    print(f"results written to {path}")
    verdicts = evaluate(s, results)
    return 0 if s.quick or all(status == "PASS" for _, status, _ in verdicts) else 1


if __name__ == "__main__":
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    raise SystemExit(main())
