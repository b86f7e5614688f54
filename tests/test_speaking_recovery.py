"""Orphaned speakings (issue 14 §6b) under the autojump clock: pods heartbeat into the fake store; a
pod that stops heartbeating has its live rows closed by another, with its last heartbeat as the end
time, one ``speaking_stopped`` each, ``streaming_deleted`` and the external media deleted; Go pods'
rows are never touched; a database outage for everyone sweeps nothing."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tests.fake_speaking_store import FakeCallManager, FakeEvents, FakeSpeakingStore, virtual_clock
from tts_streamer.adapters.voipbin.models import Speaking
from tts_streamer.supervisor.services.speaking_recovery import LivenessConfig, OrphanSweeper

CONFIG = LivenessConfig(heartbeat_every=5.0, owner_timeout=60.0)


def row(pod_id: str, status: str = "active", **kw: Any) -> Speaking:
    return Speaking(
        id=uuid.uuid4(),
        customer_id=uuid.uuid4(),
        reference_type="call",
        reference_id=uuid.uuid4(),
        language="en-US",
        provider="gcp",
        status=status,
        pod_id=pod_id,
        tm_create=kw.pop("tm_create", virtual_clock()),
        tm_update=virtual_clock(),
        **kw,
    )


class Pods:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.store = FakeSpeakingStore()
        self.events = FakeEvents()
        self.call_manager = FakeCallManager()
        self.nursery = nursery
        self.scopes: dict[str, trio.CancelScope] = {}
        self.sweepers: dict[str, OrphanSweeper] = {}

    async def start(self, pod_id: str, held: set[uuid.UUID] | None = None) -> OrphanSweeper:
        sweeper = OrphanSweeper(
            self.store,
            self.events,
            self.call_manager,
            pod_id=pod_id,
            config=CONFIG,
            is_held=(held or set()).__contains__,
            clock=virtual_clock,
        )

        async def run(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                await sweeper.beat()  # as the daemon does before it serves
                task_status.started(scope)
                await sweeper.serve()

        self.scopes[pod_id] = await self.nursery.start(run)
        self.sweepers[pod_id] = sweeper
        return sweeper

    def kill(self, pod_id: str) -> None:
        self.scopes[pod_id].cancel()

    def add(self, speaking: Speaking) -> Speaking:
        self.store.rows[speaking.id] = speaking
        return speaking


@pytest.fixture
async def pods() -> AsyncIterator[Pods]:
    async with trio.open_nursery() as nursery:
        yield Pods(nursery)
        nursery.cancel_scope.cancel()


async def test_a_dead_pods_rows_are_closed_by_another_at_its_last_heartbeat(
    pods: Pods, autojump_clock: Any
) -> None:
    await pods.start("pod-a")
    await pods.start("pod-b")
    await trio.sleep(100.0)  # both healthy for longer than the owner timeout
    active, half = pods.add(row("pod-a")), pods.add(row("pod-a", "initiating"))
    go_row = pods.add(row("tts-manager-6c8f7d9b5-x2k4p"))  # a Go pod: never heartbeats in our table
    await trio.sleep(12.0)
    pods.kill("pod-a")  # kill -9: no more heartbeats, nothing cleaned up
    last_seen = pods.store.pods["pod-a"]
    # Its last heartbeat was at most one interval before the kill: not closed before the owner timeout
    # counted from it, and closed within owner timeout + one interval of the kill.
    await trio.sleep(CONFIG.owner_timeout - CONFIG.heartbeat_every - 1.0)
    assert pods.store.rows[active.id].status == "active"
    await trio.sleep(2 * CONFIG.heartbeat_every + 1.0)
    assert pods.store.rows[active.id].status == "stopped"
    assert pods.store.rows[active.id].tm_update == last_seen  # the end: its last heartbeat
    assert pods.store.rows[half.id].status == "stopped"
    assert [e["tm_update"] for e in pods.events.of("speaking_stopped")] == [
        pods.store.rows[active.id].to_data()["tm_update"]
    ]  # the active one only: the initiating one was never announced
    assert {e["id"] for e in pods.events.of("streaming_deleted")} == {str(active.id), str(half.id)}
    assert sorted(pods.call_manager.deleted) == sorted([active.id, half.id])
    await trio.sleep(600.0)
    assert pods.store.rows[go_row.id].status == "active"  # Go's rows: not ours to judge
    assert len(pods.events.of("speaking_stopped")) == 1 and len(pods.call_manager.deleted) == 2


async def test_a_row_created_after_the_last_heartbeat_ends_at_its_creation(
    pods: Pods, autojump_clock: Any
) -> None:
    await pods.start("pod-b")
    await pods.store.heartbeat("pod-a", virtual_clock())
    await trio.sleep(2.0)
    late = pods.add(row("pod-a"))  # created between pod-a's last heartbeat and its death
    await trio.sleep(200.0)
    assert pods.store.rows[late.id].status == "stopped"
    assert pods.store.rows[late.id].tm_update == late.tm_create  # never a negative duration


async def test_several_pods_sweeping_at_once_close_each_orphan_once(pods: Pods, autojump_clock: Any) -> None:
    await pods.store.heartbeat("pod-a", virtual_clock())
    orphans = [pods.add(row("pod-a")) for _ in range(10)]
    for name in ("pod-b", "pod-c", "pod-d"):
        await pods.start(name)
    await trio.sleep(200.0)
    assert all(pods.store.rows[o.id].status == "stopped" for o in orphans)
    stopped = [e["id"] for e in pods.events.of("speaking_stopped")]
    assert sorted(stopped) == sorted(str(o.id) for o in orphans)  # one each
    assert sorted(pods.call_manager.deleted) == sorted(o.id for o in orphans)
    assert sum(s.stats.swept for s in pods.sweepers.values()) == 10


async def test_an_outage_for_everyone_sweeps_no_live_pod(pods: Pods, autojump_clock: Any) -> None:
    speaking = pods.add(row("pod-a"))
    await pods.start("pod-a", held={speaking.id})
    await pods.start("pod-b")
    await trio.sleep(100.0)
    pods.store.outage(300.0)  # every pod's heartbeat fails; all look dead once it is over
    await trio.sleep(300.0 + 60.0)
    assert pods.store.rows[speaking.id].status == "active"  # pod-b waited to be trusted again
    assert pods.sweepers["pod-b"].stats.swept == 0 and pods.sweepers["pod-a"].stats.heartbeat_failures > 0


async def test_a_pod_restarting_under_its_name_closes_its_earlier_runs_rows_at_its_last_heartbeat(
    pods: Pods, autojump_clock: Any
) -> None:
    await pods.start("pod-a")
    await trio.sleep(30.0)
    left = pods.add(row("pod-a", tm_create=virtual_clock() - dt.timedelta(seconds=20)))
    pods.kill("pod-a")
    last_seen = pods.store.pods["pod-a"]
    await trio.sleep(15.0)  # the pod is down for 15 s
    restarted = await pods.start("pod-a")  # its first beat recovers, before its first heartbeat
    assert restarted.stats.recovered_own == 1
    assert pods.store.rows[left.id].tm_update == last_seen  # the downtime is not billed
    assert len(pods.events.of("speaking_stopped")) == 1 and pods.call_manager.deleted == [left.id]


async def test_recovery_waits_for_the_database_and_keeps_the_earlier_runs_last_heartbeat(
    pods: Pods, autojump_clock: Any
) -> None:
    await pods.store.heartbeat("pod-a", virtual_clock())
    last_seen = pods.store.pods["pod-a"]
    left = pods.add(row("pod-a", tm_create=last_seen - dt.timedelta(seconds=10)))
    pods.store.outage(20.0)
    await trio.sleep(5.0)
    sweeper = await pods.start("pod-a")
    assert not sweeper.recovered
    await trio.sleep(30.0)
    assert sweeper.recovered and pods.store.rows[left.id].tm_update == last_seen


def test_liveness_settings_come_from_the_environment() -> None:
    from tts_streamer.supervisor.config import ConfigError, DaemonConfig

    config = DaemonConfig.from_env(
        {
            "SPEAKING_HEARTBEAT_INTERVAL": "2.5",
            "SPEAKING_OWNER_TIMEOUT": "30",
            "SPEAKING_STOP_RETRY_TIMEOUT": "120",
        }
    )
    assert (
        config.speaking_heartbeat_interval,
        config.speaking_owner_timeout,
        config.speaking_stop_retry_timeout,
    ) == (2.5, 30.0, 120.0)
    with pytest.raises(ConfigError, match="SPEAKING_OWNER_TIMEOUT"):
        DaemonConfig.from_env({"SPEAKING_OWNER_TIMEOUT": "0"})


async def test_an_owner_timeout_shorter_than_two_heartbeats_is_refused_at_start() -> None:
    from tts_streamer.adapters.synthetic import SyntheticEngine
    from tts_streamer.supervisor.config import ConfigError, DaemonConfig
    from tts_streamer.supervisor.daemon import serve_daemon

    engine = SyntheticEngine()
    config = DaemonConfig(
        default_engine=engine.name, speaking_heartbeat_interval=5.0, speaking_owner_timeout=8.0
    )
    with pytest.raises(ConfigError, match="at least twice SPEAKING_HEARTBEAT_INTERVAL"):
        await serve_daemon(config, engines={engine.name: engine}, handle_signals=False)
