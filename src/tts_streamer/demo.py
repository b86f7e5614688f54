"""``tts-streamer demo``: the whole path on loopback, with no cloud keys.

Starts the Asterisk simulator on a real loopback port, dials it like a production session, speaks a
sentence and cuts it off with a flush, speaks a second one to the end, then writes what the simulated
caller heard to a WAV file and prints the events and the pacing figures measured at the receiver.
"""

from __future__ import annotations

import uuid

import attrs
import trio

from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.actors.media_socket import MediaStats, PacingConfig
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.chan_websocket.client import websocket_dialer
from tts_streamer.adapters.synthetic import SyntheticEngine, tone
from tts_streamer.adapters.voice import VoiceEngine
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimCall, serve_asterisk_simulator
from tts_streamer.supervisor.sessions import open_supervisor
from tts_streamer.supervisor.signals import serve_shutdown_signals

FIRST = (
    "This first sentence is much too long, and it will be interrupted by a barge-in from the caller "
    "before it ever reaches its end, which nobody will hear."
)
SECOND = "Flush worked. This second sentence plays to the end, and then the call hangs up."


@attrs.frozen
class DemoOptions:
    wav_path: str = "demo.wav"
    engine: str = "espeak"
    hold: bool = False
    lead_frames: int = PacingConfig().lead_frames  # what serve ships (PacingConfig's defaults)
    frames_per_message: int = PacingConfig().frames_per_message
    flush_after: float = 1.5


@attrs.define
class PrintingSink:
    started_at: float
    events: list[ev.SessionEvent] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def emit(self, event: ev.SessionEvent) -> None:
        fields = ", ".join(f"{k}={v!r}" for k, v in attrs.asdict(event).items() if k != "call_id")
        print(
            f"{trio.current_time() - self.started_at:7.3f}s  {type(event).__name__:<13} {fields}", flush=True
        )
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, kind: type[ev.SessionEvent]) -> None:
        while not any(isinstance(e, kind) for e in self.events):
            await self._changed.wait()


class DemoError(Exception):
    """A one-line reason the demo cannot run (e.g. the voice asked for is not installed)."""


def _make_engine(name: str) -> VoiceEngine:
    if name == "synthetic":
        return SyntheticEngine(seconds_per_char=0.06, speed=20.0, pattern=tone(440.0, 1.0))
    if name == "piper":
        from tts_streamer.adapters.piper_model import piper_unavailable_reason

        reason = piper_unavailable_reason()
        if reason is not None:
            raise DemoError(f"the piper voice is not available: {reason}")
        from tts_streamer.adapters.piper import PiperEngine

        return PiperEngine()
    from tts_streamer.adapters.espeak import EspeakEngine

    return EspeakEngine()


async def run_demo(options: DemoOptions) -> int:
    sim = AsteriskSimulator(accept_any=True)
    engine = _make_engine(options.engine)
    start = getattr(engine, "start", None)
    if start is not None:
        await start()  # load the voice before the call, as the daemon would have (Piper: ~0.7 s)
    sink = PrintingSink(trio.current_time())
    pacing = PacingConfig(lead_frames=options.lead_frames, frames_per_message=options.frames_per_message)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_asterisk_simulator, sim, "127.0.0.1", 0)
        connection_id = str(uuid.uuid4())
        media_uri = f"ws://127.0.0.1:{port}/media/{connection_id}"
        print(f"simulated Asterisk on 127.0.0.1:{port}; voice engine: {engine.name}", flush=True)
        async with open_supervisor(
            engines={engine.name: engine},
            default_engine=engine.name,
            dialer=websocket_dialer(),
            events=sink,
            config=SessionConfig(pacing=pacing),
        ) as supervisor:
            shutdown = trio.Event()
            await nursery.start(serve_shutdown_signals, shutdown)
            await supervisor.start_session("demo", media_uri)
            await supervisor.call("demo", SayInit())
            await supervisor.call("demo", SayAdd(FIRST))
            await sink.wait_for(ev.PlayStarted)
            await trio.sleep(options.flush_after)
            await supervisor.call("demo", SayFlush())
            await supervisor.call("demo", SayAdd(SECOND))
            await supervisor.call("demo", SayFinish())
            await sink.wait_for(ev.PlayFinished)
            media = supervisor.get("demo").media
            assert media is not None
            sender = media.stats
            if options.hold:
                print("holding the call; send SIGINT or SIGTERM to stop", flush=True)
                await shutdown.wait()
            await supervisor.stop("demo")
        nursery.cancel_scope.cancel()
    call = sim.calls[connection_id]
    call.write_wav(options.wav_path)
    _report(call, sender, options)
    return 0


def _report(call: SimCall, stats: MediaStats, options: DemoOptions) -> None:
    heard = sum(1 for f in call.played if f.bridged)
    lateness = stats.lateness
    print(
        f"frames sent {stats.frames_sent} in {stats.messages_sent} messages, frames played "
        f"{call.frames_played} ({heard / 50:.2f} s of audio heard), underruns at the receiver "
        f"{call.underruns}, flushes {call.flushes}",
        flush=True,
    )
    print(
        f"pacing lateness against the absolute timeline: p50 {lateness.percentile(50) * 1000:.3f} ms, "
        f"p99 {lateness.percentile(99) * 1000:.3f} ms, max {lateness.maximum * 1000:.3f} ms "
        f"({lateness.count} messages)",
        flush=True,
    )
    print(f"wrote {options.wav_path} ({len(call.played_audio()) / 8000:.2f} s, 8 kHz mu-law)", flush=True)
