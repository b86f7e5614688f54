"""The far side of ``bench.vendors``' network, in its own process: the three vendor fakes, each behind a
``DelayProxy`` (TLS + one-way delay). Keeping them out of the measured process keeps their threads off
its GIL and its Trio loop, as a real vendor is.

``python -m bench.vendor_fakes CERT_FOLDER DELAY FAKE_DELAY [STREAMS]``: STREAMS (default 32) bounds the
Google fake's concurrent RPCs, one worker thread each (bench.run's voice rows hold one per call). Prints
one JSON line with the proxies' ports, then answers one JSON line per line read on stdin: ``state`` (open
vendor resources and proxy connection counts), ``fault <vendor> <kind> <after_bytes>``, ``clear``. EOF on
stdin ends it. Every 5 s it writes ``pace.json`` into CERT_FOLDER: how late the Google and ElevenLabs
fakes sent their chunks (against their own schedule, and ``behind`` real time from each text's start)
and how late each proxy forwarded toward the client, so a slow voice row shows which side fell behind.
The ElevenLabs fake is served on its proxy's stream in this process (``DelayProxy(local=...)``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import trio
from tests.fakes.elevenlabs import ElevenLabsFake
from tests.fakes.google_tts import GoogleTTSFake
from tests.fakes.polly import PollyFake
from tests.fakes.vendor_faults import Fault, percentiles

from bench.netem import Certificates, DelayProxy

VENDORS = ("gcp", "elevenlabs", "aws")


def _eleven_unreleased(fake: ElevenLabsFake) -> int:
    """Contexts neither closed nor final on a connection still open."""
    return sum(
        1
        for conn in fake.connections
        if conn.closed_at is None
        for ctx in conn.contexts.values()
        if ctx.closed_at is None and ctx.final_at is None
    )


async def serve(folder: Path, delay: float, fake_delay: float, streams: int = 32) -> None:
    certs = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    tls = certs.server_context()
    with (
        GoogleTTSFake(first_audio_delay=fake_delay, max_workers=streams) as google,
        PollyFake(first_audio_delay=fake_delay) as polly,
    ):
        eleven = ElevenLabsFake(first_audio_delay=fake_delay)
        polly_port = int(polly.endpoint_url.rsplit(":", 1)[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(eleven.serve)
            proxies = {
                "gcp": DelayProxy(("127.0.0.1", google.port), delay, tls),
                # In this process already: served on the proxy's stream, no second loopback hop.
                "elevenlabs": DelayProxy(None, delay, tls, local=eleven.serve_stream),
                "aws": DelayProxy(("127.0.0.1", polly_port), delay, tls),
            }
            ports = {name: await nursery.start(proxy.serve) for name, proxy in proxies.items()}
            faults = {"gcp": google.faults, "elevenlabs": eleven.faults, "aws": polly.faults}
            stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
            stdout = trio.lowlevel.FdStream(sys.stdout.fileno())

            async def reply(value: dict[str, Any]) -> None:
                await stdout.send_all(json.dumps(value).encode() + b"\n")

            nursery.start_soon(_write_pace, folder / "pace.json", google, eleven, proxies)
            await reply({"ports": ports})
            buffer = b""
            while True:
                data = await stdin.receive_some(65536)
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    words = line.decode().split()
                    if words == ["state"]:
                        await reply(
                            {
                                "open": {
                                    "gcp": len(google.open_rpcs),
                                    "elevenlabs": _eleven_unreleased(eleven),
                                    "aws": len(polly.open_requests),
                                },
                                "connections": {n: p.connections for n, p in proxies.items()},
                            }
                        )
                    elif words and words[0] == "fault":
                        faults[words[1]].add(Fault(words[2], after_bytes=int(words[3])))
                        await reply({"ok": True})
                    elif words == ["clear"]:
                        for queue in faults.values():
                            queue.clear()
                        await reply({"ok": True})
                    else:
                        await reply({"error": f"unknown command {words!r}"})
            nursery.cancel_scope.cancel()


async def _write_pace(
    path: Path, google: GoogleTTSFake, eleven: ElevenLabsFake, proxies: dict[str, DelayProxy]
) -> None:
    """Every 5 s, into ``path``: how late the fakes sent their chunks (against their own schedule and
    against real time) and how late the proxies forwarded them (send begun / done), so a slow row can
    tell the far side's lag from the client's."""
    while True:
        await trio.sleep(5.0)
        out: dict[str, Any] = {"gcp": google.pace.summary(), "elevenlabs": eleven.pace.summary()}
        for name, proxy in proxies.items():
            out[f"{name}_proxy"] = {
                "begin": percentiles([a for a, _ in proxy.out_lags]),
                "end": percentiles([b for _, b in proxy.out_lags]),
            }
        await trio.Path(path).write_text(json.dumps(out))


def main() -> int:
    streams = int(sys.argv[4]) if len(sys.argv) > 4 else 32
    trio.run(serve, Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), streams)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
