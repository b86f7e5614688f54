"""The soak's memory judgement: live Python blocks read in the idle daemon, and what must be left out.

Memory is judged on live objects, read in the daemon with its console's ``memory`` command (a full
collection, then ``sys.getallocatedblocks()``: supervisor/ops/console_memory.py) while it is idle,
once at the warm-up mark (the workers end their sessions and wait meanwhile) and once at the end. Four
stores grow on purpose and are bounded, so they are kept out of the comparison:

- the console's event history and the command plane's recent latencies: the command counts their
  blocks apart, and ``other_blocks`` is the rest;
- cancelled asyncio timers of the broker operations of the last AMQP_TIMEOUT: the reading waits
  QUIET_SECONDS after the last;
- the reply-queue probe's connection (adapters/amqp/queue_probe.py): aio-pika keeps ~45 blocks of
  every channel a connection opened, and the probe replaces its connection every
  PROBE_CONNECTION_USES creates, so what it holds is a sawtooth of up to ~9,000 blocks. Before each
  reading ``align_probes`` sends creates whose reply queue does not exist (the daemon probes them,
  finds the caller gone and starts nothing) until the probe is on a fresh connection with a few uses.

What is left must not grow with the sessions served. The bound scales with them:
LEAK_BLOCKS_PER_SESSION per session ended between the readings, plus LEAK_BLOCKS_SLACK for one-off
allocations and the probe alignment's error, plus, when the warm-up served fewer than 128 sessions, what
urlsplit's cache of the last 128 media URIs still adds (the quick form). Measured in
bench/results/2026-12-03-reliability.md: after the warm-up the heap grows by well under a block per
session (normal runs) against four for the injected 1 KiB leak.
"""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika
import attrs
import trio

from tests.amqp_support import Rig
from tests.fakes.daemon_process import DaemonProcess
from tests.fakes.voipbin_client import aio
from tests.reliability.common import create_body, metric_until
from tts_streamer.adapters.amqp.queue_probe import PROBE_CONNECTION_USES
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.supervisor.config import DaemonConfig

LEAK_BLOCKS_PER_SESSION = 1.0
LEAK_BLOCKS_SLACK = 1000
# Uses of the probe's fresh connection at a reading: more than the creates the harness may have
# counted but the daemon never probed (expired before their turn), so the connection has rolled over.
PROBE_MARGIN = 10
QUIET_SECONDS = DaemonConfig().amqp_timeout + 2.0
# urllib.parse.urlsplit keeps its last 128 distinct URLs (functools.lru_cache), ~7 blocks each, and
# every session's media URI is new: a warm-up of fewer sessions leaves that much growth to come.
URL_CACHE_SIZE = 128
URL_CACHE_BLOCKS = 8


def allowed_growth(sessions: int, before: int) -> float:
    """Blocks the heap may grow by over ``sessions`` sessions when ``before`` were served before the
    first reading (the URL cache's share is gone once the warm-up served URL_CACHE_SIZE)."""
    unfilled = max(0, URL_CACHE_SIZE - before)
    return LEAK_BLOCKS_PER_SESSION * sessions + LEAK_BLOCKS_SLACK + URL_CACHE_BLOCKS * unfilled


def judge_memory(first: dict[str, Any], last: dict[str, Any], sessions: int, before: int) -> str | None:
    """What was lost to a leak between two idle ``memory`` readings ``sessions`` apart, ``before``
    sessions after the daemon started (None: nothing). A leak of k blocks a session shows as k *
    sessions."""
    grew = int(last["other_blocks"]) - int(first["other_blocks"])
    allowed = allowed_growth(sessions, before)
    if grew > allowed:
        return (
            f"live Python blocks grew by {grew} over {sessions} sessions ({grew / max(sessions, 1):.1f} a "
            f"session; allowed {allowed:.0f}: {LEAK_BLOCKS_PER_SESSION:g} a session + {LEAK_BLOCKS_SLACK}"
            + (f" + the URL cache's {URL_CACHE_SIZE - before} unfilled)" if before < URL_CACHE_SIZE else ")")
        )
    return None


def probes_to_roll_over(probed: int, uses: int = PROBE_CONNECTION_USES, margin: int = PROBE_MARGIN) -> int:
    """Creates to send so that a probe that has served ``probed`` creates since the daemon started (its
    first connection opened idle, a new one at the first probe after ``uses``) is on a fresh
    connection used ``margin`` times."""
    used = (probed - 1) % uses + 1 if probed else 0
    return uses - used + margin


@attrs.define
class Gate:
    """Holds the soak's workers at a session boundary (none of their sessions live) until reopened."""

    closing: bool = False
    parked: int = 0
    reopened: trio.Event = attrs.field(factory=trio.Event)

    async def hold(self) -> None:
        self.parked += 1
        await self.reopened.wait()
        self.parked -= 1


async def align_probes(rig: Rig, daemon: DaemonProcess, probed: int) -> int:
    """Send creates whose reply queue does not exist, so that the probe is on a fresh connection
    (``probes_to_roll_over``), and wait until the daemon has taken them all; how many were sent."""
    count = probes_to_roll_over(probed)
    before = (await daemon.metrics())["tts_streamer_requests_not_started_total"]
    channel = await aio(rig.caller.connection.channel)()
    try:
        for _ in range(count):
            request = envelope.make_request("/v1/streamings", "POST", create_body(), publisher="soak")
            message = aio_pika.Message(
                envelope.render_request(request),
                content_type="text/plain",
                reply_to=f"soak-gone-{uuid.uuid4().hex}",
            )
            await aio(channel.default_exchange.publish)(message, routing_key=rig.pod_queue())
    finally:
        await aio(channel.close)()
    with trio.fail_after(60):
        await metric_until(daemon, lambda m: m["tts_streamer_requests_not_started_total"] >= before + count)
    return count


async def read_idle(rig: Rig, daemon: DaemonProcess, probed: int) -> dict[str, Any]:
    """The daemon's ``memory`` reading with the probe aligned; ``probes`` says how many that took."""
    sent = await align_probes(rig, daemon, probed)
    # Every broker operation runs under asyncio.wait_for(timeout=AMQP_TIMEOUT), and trio-asyncio keeps
    # a cancelled timer until it would have fired: a few blocks per reply, probe and publish of the last
    # 3 s (~2,000 blocks after the alignment). Quiet for longer than that, they are gone.
    await trio.sleep(QUIET_SECONDS)
    reading: dict[str, Any] = (await daemon.console("memory"))[0]
    reading["alignment_probes"] = sent
    return reading
