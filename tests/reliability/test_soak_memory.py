"""The soak's leak judgement, on readings shaped like the daemon's (no broker, no daemon)."""

from __future__ import annotations

import gc
import sys
from typing import Any

import pytest
import trio

from tests.amqp_support import open_rig
from tests.amqp_vhost import private_amqp_url
from tests.fakes.daemon_process import LEAK_ENV, inject_leak
from tests.reliability.common import delete, metric_until, not_ok, set_up_streaming
from tests.reliability.soak_memory import (
    LEAK_BLOCKS_PER_SESSION,
    LEAK_BLOCKS_SLACK,
    URL_CACHE_BLOCKS,
    URL_CACHE_SIZE,
    allowed_growth,
    judge_memory,
    probes_to_roll_over,
    read_idle,
)
from tests.services import require_rabbitmq
from tts_streamer.actors import events as ev
from tts_streamer.simulator.asterisk import SimConfig
from tts_streamer.supervisor.event_bus import EventBus

__all__ = ["private_amqp_url"]  # the fixture, imported so the daemon test gets a private vhost


def reading(other_blocks: int) -> dict[str, Any]:
    return {"other_blocks": other_blocks}


def test_a_flat_heap_passes_and_a_leak_of_a_few_blocks_a_session_fails_once_there_are_enough():
    base, warm = 368_000, 270  # the 180 s soak: ~270 sessions before the first reading, ~700 after
    # What normal 180 s soaks measured after the warm-up: a few hundred blocks either way.
    assert judge_memory(reading(base), reading(base - 300), 700, warm) is None
    assert judge_memory(reading(base), reading(base + 600), 700, warm) is None
    # The injected leak (four blocks a session) over the same sessions.
    lost = judge_memory(reading(base), reading(base + 4 * 700), 700, warm)
    assert lost is not None and "700 sessions" in lost
    # The bound scales with the sessions served: the same leak over a few sessions is under the slack,
    # the same growth over many sessions is no leak.
    assert judge_memory(reading(base), reading(base + 4 * 100), 100, warm) is None
    assert judge_memory(reading(base), reading(base + 4 * 700), 4 * 700, warm) is None
    assert judge_memory(reading(base), reading(base + 4 * 3000), 3000, warm) is not None
    # Detectable from the sessions on where the leak outgrows the bound.
    worst = int(LEAK_BLOCKS_SLACK / (4 - LEAK_BLOCKS_PER_SESSION)) + 1
    assert judge_memory(reading(base), reading(base + 4 * worst), worst, warm) is not None


def test_a_short_warm_up_allows_for_the_url_cache_still_filling():
    # The quick form reads after ~25 sessions: urlsplit's cache has ~100 media URIs to take yet.
    filling = URL_CACHE_BLOCKS * (URL_CACHE_SIZE - 25)
    assert judge_memory(reading(0), reading(filling + 500), 50, 25) is None
    assert judge_memory(reading(0), reading(filling + 500), 50, URL_CACHE_SIZE) is not None
    assert allowed_growth(50, 25) - allowed_growth(50, 1000) == filling


def test_alignment_leaves_the_probe_on_a_fresh_connection_with_a_few_uses():
    uses, margin = 200, 10

    def used_after(probed: int, sent: int) -> int:
        """Uses of the current connection after ``probed`` + ``sent`` probes (queue_probe.QueueProbe)."""
        total = probed + sent
        return (total - 1) % uses + 1

    for probed in (0, 1, 77, 199, 200, 201, 865):
        sent = probes_to_roll_over(probed, uses, margin)
        assert used_after(probed, sent) == margin, probed
        assert margin <= sent <= uses + margin
        # The harness may have counted a few creates the daemon never probed: still rolled over.
        assert used_after(probed - 3, sent) == margin - 3


async def test_the_injected_leak_keeps_four_blocks_of_every_ended_session(monkeypatch):
    monkeypatch.setattr(EventBus, "emit", EventBus.emit)  # undone after the test
    leaked = inject_leak(1)
    bus = EventBus()
    call_ids = [f"call-{n}" for n in range(2000)]
    gc.collect()
    blocks = sys.getallocatedblocks()
    for call_id in call_ids:
        bus.emit(ev.Stopped(call_id, "deleted"))
    gc.collect()
    assert len(leaked) == 2000
    # Four blocks a session, give or take what the rest of the test process frees meanwhile.
    assert 3.5 <= (sys.getallocatedblocks() - blocks) / 2000 <= 4.5


@pytest.mark.realtime
@pytest.mark.parametrize("records", [0, 50], ids=["no-leak", "leak"])
async def test_the_check_flags_a_real_daemon_that_leaks_and_only_that(
    records: int, private_amqp_url: str
) -> None:
    """A ``tts-streamer serve`` child read idle as the soak reads it, around 20 sessions: flagged when it
    leaks 50 records (200 blocks, 60 KiB) a session, not otherwise. (The soak's one-off run with one
    record a session is in bench/results/2026-12-03-reliability.md.)"""
    require_rabbitmq()
    probed = 0
    with trio.fail_after(150):
        async with open_rig(child=True, child_env={LEAK_ENV: str(records)}) as rig:
            daemon = rig.child
            assert daemon is not None
            rig.call_manager.leg_config = SimConfig(record_frames=False)

            async def sessions(count: int) -> None:
                nonlocal probed
                for _ in range(count):
                    probed += 1
                    sid = await set_up_streaming(rig, [])
                    assert not not_ok(await delete(rig, sid))
                with trio.fail_after(30):
                    await metric_until(daemon, lambda m: m["tts_streamer_active_sessions"] == 0)

            await sessions(5)  # warm-up
            first = await read_idle(rig, daemon, probed)
            probed += first["alignment_probes"]
            await sessions(20)
            last = await read_idle(rig, daemon, probed)
    lost = judge_memory(first, last, 20, 5)
    print(f"other blocks {first['other_blocks']} -> {last['other_blocks']}: {lost}")
    assert (lost is not None) == bool(records), lost
