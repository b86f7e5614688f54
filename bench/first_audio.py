"""First audio after create, per bridge topology: ``python -m bench.first_audio``.

The daemon runs as its own process (``tests.fakes.daemon_process``, a synthetic voice whose
audio is ready at once, so the figures are the bridge wait's and the command plane's, not a vendor's).
This process plays the chan_websocket simulator, a fake call-manager and a Go-style caller. For each
topology and each delay between the create reply and the say, it creates streamings one at a time,
sends ``say_init`` and ``say_add`` and reports, from the moment the ``say_add`` was published, when the
first audio message reached the simulated Asterisk (p50 / max), plus the frames lost before the join.

Topologies (chan_websocket.md §8): ``snoop`` is voipbin's (the leg joins ``--join-ms`` after the
connection and never receives caller audio); ``softmix`` sends caller frames from 8 ms after the join.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack

import trio
from tests.fakes.call_manager import FakeCallManager, open_fake_call_manager
from tests.fakes.daemon_process import DaemonProcess, open_daemon_process, synthetic_env
from tests.fakes.voipbin_client import SHARED_QUEUE, VoipbinCaller, open_voipbin_caller

from bench.amqp_latency import DEFAULT_URL, _same, temporary_vhost
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimConfig, serve_asterisk_simulator

TEXT = "Hello there."


def leg_config(topology: str, join: float) -> SimConfig:
    if topology == "softmix":
        return SimConfig.softmix(bridge_delay=join, record_frames=True)
    return SimConfig.snoop(bridge_delay=join, record_frames=True)


async def one(
    caller: VoipbinCaller,
    daemon: DaemonProcess,
    fake: FakeCallManager,
    sim: AsteriskSimulator,
    say_after: float,
) -> tuple[float, float, int]:
    """(first audio - say_add sent, first audio - create reply, frames lost before the join)."""
    body = {"reference_type": "call", "reference_id": str(uuid.uuid4()), "direction": "out"}
    created = await caller.call(SHARED_QUEUE, "/v1/streamings", "POST", body)
    assert created is not None and created.status_code == 200, created
    replied = trio.current_time()
    sid = created.data["id"]
    call = sim.calls[fake.created[uuid.UUID(sid)]]
    await trio.sleep(say_after)
    message_id = str(uuid.uuid4())
    base = f"/v1/streamings/{sid}"
    await caller.call(daemon.pod_queue, f"{base}/say_init", "POST", {"message_id": message_id})
    said = trio.current_time()
    await caller.call(daemon.pod_queue, f"{base}/say_add", "POST", {"message_id": message_id, "text": TEXT})
    with trio.fail_after(5):
        while not call.messages:  # noqa: ASYNC110 - the simulator has no event for this; 1 ms polls
            await trio.sleep(0.001)
    first = call.messages[0].time
    await trio.sleep(0.5)  # let the join pass, so frames lost before it are counted
    lost = call.frames_lost_unbridged
    await caller.call(SHARED_QUEUE, base, "DELETE")
    return first - said, first - replied, lost


async def run(options: argparse.Namespace) -> int:
    sim = AsteriskSimulator(seed=1)
    env = synthetic_env(0.05, float("inf"))
    if options.bridge_wait_ms is not None:
        env["BRIDGE_WAIT_MS"] = str(options.bridge_wait_ms)
    with temporary_vhost(options.amqp) if options.private_vhost else _same(options.amqp) as url:
        async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
            port = await nursery.start(serve_asterisk_simulator, sim, "127.0.0.1", 0)
            fake = await stack.enter_async_context(open_fake_call_manager(url, sim, "127.0.0.1", port))
            caller = await stack.enter_async_context(open_voipbin_caller(url))
            daemon = await stack.enter_async_context(open_daemon_process(url, caller, env=env))
            wait = "default" if options.bridge_wait_ms is None else f"{options.bridge_wait_ms} ms"
            print(
                f"BRIDGE_WAIT_MS {wait}, join {options.join_ms} ms after the connection, "
                f"{options.trials} streamings per row, load average {os.getloadavg()[0]:.2f} "
                f"on {os.cpu_count()} CPUs"
            )
            print(
                "topology  say after create   first audio after say_add p50 / max   after create p50   lost"
            )
            for topology in options.topologies:
                fake.leg_config = leg_config(topology, options.join_ms / 1000)
                for say_after in options.say_after:
                    rows: list[tuple[float, float, int]] = []
                    for _ in range(options.trials):
                        rows.append(await one(caller, daemon, fake, sim, say_after))
                    after_say = sorted(r[0] * 1000 for r in rows)
                    after_create = [r[1] * 1000 for r in rows]
                    print(
                        f"{topology:9} {say_after:7.1f} s          "
                        f"{statistics.median(after_say):8.1f} / {after_say[-1]:6.1f} ms"
                        f"              {statistics.median(after_create):8.1f} ms     "
                        f"{sum(r[2] for r in rows)} frames"
                    )
            nursery.cancel_scope.cancel()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.first_audio", description=__doc__.split("\n")[0])
    parser.add_argument("--amqp", default=os.environ.get("RABBITMQ_ADDRESS", DEFAULT_URL))
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument(
        "--join-ms", type=float, default=20.0, help="the leg joins this long after connecting"
    )
    parser.add_argument("--bridge-wait-ms", type=int, default=None, help="the daemon's BRIDGE_WAIT_MS")
    parser.add_argument("--topologies", type=lambda raw: raw.split(","), default=["snoop", "softmix"])
    parser.add_argument(
        "--say-after", type=lambda raw: [float(x) for x in raw.split(",")], default=[0.0, 1.0]
    )
    parser.add_argument(
        "--no-private-vhost", dest="private_vhost", action="store_false", help="use the URL's vhost as is"
    )
    options = parser.parse_args(argv)
    started = time.monotonic()
    status = trio.run(run, options)
    print(f"({time.monotonic() - started:.1f} s in all)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
