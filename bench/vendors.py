"""First-audio and flush-release figures per cloud vendor, with the real adapters against the loopback
fakes (which answer after a configurable first-audio delay). ``python -m bench.vendors``.

first audio: from opening a stream and sending text to its first audio chunk.
context exit: from leaving the stream's context (a flush) to control returning (Trio waits for nothing).
released: from leaving the context until the fake sees the vendor resource gone (RPC ended, socket
closed, HTTP body dropped and our worker thread out).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import grpc
import trio

from tts_streamer.adapters.elevenlabs import ElevenLabsEngine
from tts_streamer.adapters.google_tts import GoogleTTSEngine
from tts_streamer.adapters.polly import PollyEngine, make_client
from tts_streamer.adapters.voice import VoiceEngine, VoiceSpec
from tts_streamer.fakes.elevenlabs import ElevenLabsFake
from tts_streamer.fakes.google_tts import GoogleTTSFake
from tts_streamer.fakes.polly import PollyFake

TEXT = "Hello there, this is a sentence of ordinary length. And here is another one to follow it."
Samples = tuple[list[float], list[float], list[float]]


def _summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))]
    return f"{statistics.median(ordered) * 1000:.1f} / {p90 * 1000:.1f} / {ordered[-1] * 1000:.1f}"


async def _measure(engine: VoiceEngine, released: Callable[[], bool], runs: int) -> Samples:
    firsts: list[float] = []
    exits: list[float] = []
    releases: list[float] = []
    for _ in range(runs):
        opened = time.monotonic()
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(TEXT)
            async for _chunk in stream.audio():
                firsts.append(time.monotonic() - opened)
                break
            await trio.sleep(0.05)  # mid-utterance, then the flush
            left = time.monotonic()
        exits.append(time.monotonic() - left)
        with trio.fail_after(5):
            while not released():  # noqa: ASYNC110 - polling a fake's state, which has no event
                await trio.sleep(0.0005)
        releases.append(time.monotonic() - left)
    return firsts, exits, releases


async def run(runs: int, delay: float) -> list[tuple[str, Samples]]:
    rows: list[tuple[str, Samples]] = []
    with GoogleTTSFake(first_audio_delay=delay) as google, PollyFake(first_audio_delay=delay) as polly:
        gcp = GoogleTTSEngine(channel=grpc.insecure_channel(google.address))
        await _measure(gcp, lambda: not google.open_rpcs, 2)  # warm-up: channel and thread start
        rows.append(("gcp (RPC ended at the fake)", await _measure(gcp, lambda: not google.open_rpcs, runs)))
        session = boto3.Session(aws_access_key_id="A", aws_secret_access_key="x", region_name="us-east-1")
        aws = PollyEngine(make_client(session, endpoint_url=polly.endpoint_url))

        def aws_released() -> bool:
            return not polly.open_requests and aws.threads_running == 0

        await _measure(aws, aws_released, 2)
        rows.append(("aws (disconnect seen, worker out)", await _measure(aws, aws_released, runs)))
        fake = ElevenLabsFake(first_audio_delay=delay)
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.serve)
            eleven = ElevenLabsEngine("test-key", base_url=fake.base_url)
            await _measure(eleven, lambda: not fake.open_connections, 2)
            rows.append(
                (
                    "elevenlabs (socket closed)",
                    await _measure(eleven, lambda: not fake.open_connections, runs),
                )
            )
            nursery.cancel_scope.cancel()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--delay", type=float, default=0.05, help="the fakes' first-audio delay, seconds")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    rows = trio.run(run, args.runs, args.delay)
    today = datetime.date.today().isoformat()
    lines = [
        f"# Vendor adapters against the loopback fakes, {today}",
        "",
        f"{args.runs} utterances each; the fakes answer after {args.delay * 1000:.0f} ms.",
        "Figures: p50 / p90 / max ms.",
        "",
        "| vendor | first audio | context exit (flush) | released at the fake |",
        "|---|---|---|---|",
        *(f"| {name} | {_summary(f)} | {_summary(e)} | {_summary(r)} |" for name, (f, e, r) in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{today}-vendors.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
