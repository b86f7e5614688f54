"""The console's ``memory`` command: live Python blocks after a full collection, the history apart."""

from __future__ import annotations

import gc
import random
import sys
import uuid
from typing import Any

import trio

from tests.test_console import open_daemon, wait_for_event
from tts_streamer.actors import events as ev
from tts_streamer.supervisor.ops.console_memory import held_blocks
from tts_streamer.supervisor.ops.console_views import EventHistory
from tts_streamer.supervisor.services.command_plane import PlaneStats


def fill(history: EventHistory, plane: PlaneStats, sessions: int) -> None:
    """Events as the soak's sessions leave them: five messages, some flushed, then Stopped."""
    rng = random.Random(7)
    for _ in range(sessions):
        call_id = str(uuid.uuid4())
        for _ in range(5):
            message_id = str(uuid.uuid4())
            history.record(ev.Initiated(call_id, message_id))
            history.record(ev.PlayStarted(call_id, message_id))
            if rng.random() < 0.3:
                history.record(ev.Flushed(call_id, message_id, rng.randrange(1000)))
            text = "x" * rng.randrange(10, 50)
            history.record(ev.PlayFinished(call_id, message_id, text, 1, rng.randrange(300, 3000), 0))
            for _ in range(10):
                plane.latency.record(rng.random())
        history.record(ev.Stopped(call_id, "deleted"))


async def test_held_blocks_match_what_the_allocator_counts(autojump_clock):
    # The soak subtracts these from sys.getallocatedblocks() to judge leaks: an estimate off by a block
    # a session would hide a leak of that size.
    history, plane = EventHistory(), PlaneStats()
    gc.collect()
    blocks, held = sys.getallocatedblocks(), held_blocks([*history.contents(), plane.latency])
    fill(history, plane, 1200)  # past both bounds: 1,000 ended sessions, 10,000 latencies
    gc.collect()
    grown = sys.getallocatedblocks() - blocks
    counted = held_blocks([*history.contents(), plane.latency]) - held
    assert history.held()[0] == 1000 and plane.latency.count == 60_000
    assert grown > 50_000
    assert abs(grown - counted) < 0.01 * grown, (grown, counted)


async def test_memory_collects_then_counts_live_blocks_apart_from_the_history(nursery, autojump_clock):
    async with open_daemon(nursery) as daemon:
        console = await daemon.connect()
        before: dict[str, Any] = (await console.json_rows("memory --json"))[0]
        await daemon.start("c1")
        assert (await console.command("say c1 hello there"))[0].startswith("ok")
        await wait_for_event(daemon.bus, ev.PlayStarted, "c1")
        assert await console.command("stop c1") == ["ok"]
        cycle: list[object] = []
        cycle.append(cycle)
        del cycle  # garbage only a collection frees
        kept = [str(n) * 3 for n in range(1000, 21_000)]  # 20,000 live blocks outside any bounded store
        await trio.sleep(1)
        after: dict[str, Any] = (await console.json_rows("memory --json"))[0]
        assert after["collected"] >= 1
        assert after["history_sessions"] == before["history_sessions"] + 1
        assert after["history_blocks"] > before["history_blocks"]
        assert after["allocated_blocks"] == (
            after["history_blocks"] + after["latency_blocks"] + after["other_blocks"]
        )
        assert 20_000 <= after["other_blocks"] - before["other_blocks"] < 30_000
        assert after["gc_objects"] > 0 and len(after["gc_collections"]) == 3 and after["rss_kib"] > 0
        rows = dict(row.split(None, 1) for row in await console.command("memory"))
        assert int(rows["allocated_blocks"]) > 0 and rows["gc_collections"].count("/") == 2
        assert len(kept) == 20_000
