"""Shared pieces of the reliability scenarios: settings, the result row, and request/event helpers."""

from __future__ import annotations

import collections
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
import trio

from tests import amqp_support
from tests.amqp_support import Rig
from tests.fakes.daemon_process import DaemonProcess
from tests.test_amqp_resilience import (
    poll_until,
)
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.adapters.voipbin.envelope import Event, Response

T = TypeVar("T")

LEAD_FRAMES = PacingConfig().lead_frames  # the pacer's cushion: a gap longer than this is audible loss
TICK = 0.020
CREATE_DEADLINE = 3.0  # voipbin callers give up after 3 s


@attrs.frozen
class Settings:
    quick: bool = True
    soak_seconds: float = 20.0


@attrs.define
class Row:
    name: str
    injected: str
    sessions: int = 0
    lost: int = 0
    figures: str = ""
    skipped: str | None = None
    losses: list[str] = attrs.field(factory=list)  # what was lost, for the report

    def lose(self, what: str, count: int = 1) -> None:
        if count:
            self.lost += count
            self.losses.append(what if count == 1 else f"{what} (x{count})")


Scenario = Callable[[Settings], Awaitable[Row]]

# ------------------------------------------------------------------------------------------ helpers


def sid_of(event: Event) -> str | None:
    data = event.data if isinstance(event.data, dict) else {}
    found = data.get("streaming_id", data.get("id"))
    return str(found) if found is not None else None


def counts_by_streaming(events: Sequence[Event]) -> dict[str, collections.Counter[str]]:
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for event in events:
        sid = sid_of(event)
        if sid is not None:
            out[sid][event.type] += 1
    return out


def check_once(row: Row, rig: Rig, sids: Sequence[str], types: Sequence[str]) -> None:
    """Lose one for every (streaming, event type) not delivered exactly once."""
    counts = counts_by_streaming(rig.caller.events)
    for kind in types:
        wrong = [counts[sid][kind] for sid in sids if counts[sid][kind] != 1]
        if wrong:
            row.lose(f"{kind} not exactly once (seen {sorted(set(wrong))} times)", len(wrong))


async def wait_for_events(rig: Rig, sids: Sequence[str], kind: str, within: float) -> set[str]:
    """Wait until every streaming in ``sids`` has an event ``kind``; returns those still missing."""

    def missing() -> set[str]:
        have = {sid_of(e) for e in rig.caller.events if e.type == kind}
        return set(sids) - have

    with trio.move_on_after(within):
        await poll_until(lambda: not missing(), interval=0.05)
    return missing()


async def gather(items: Sequence[T], fn: Callable[[T], Awaitable[Any]], limit: int = 10) -> list[Any]:
    """``fn`` over ``items`` with at most ``limit`` at once; results in order."""
    results: list[Any] = [None] * len(items)
    limiter = trio.CapacityLimiter(limit)

    async def one(index: int, item: T) -> None:
        async with limiter:
            results[index] = await fn(item)

    async with trio.open_nursery() as nursery:
        for index, item in enumerate(items):
            nursery.start_soon(one, index, item)
    return results


def create_body() -> dict[str, Any]:
    return {
        "customer_id": str(uuid.uuid4()),
        "reference_type": "call",
        "reference_id": str(uuid.uuid4()),
        "language": "en-US",
        "direction": "out",
    }


async def set_up_streaming(rig: Rig, retried: list[Response | None], attempts: int = 3) -> str:
    """A create for a scenario's set-up, where a create's fate is not what is judged: on a machine at load
    10, ten creates at once overran the daemon's 2.5 s and were rolled back, which failed the scenario
    before its fault was injected. A create not answered 200 is retried (each recorded in ``retried``);
    the last failure raises."""
    for attempt in range(attempts):
        reply = await rig.caller.call(rig.pod_queue(), "/v1/streamings", "POST", create_body())
        if reply is not None and reply.status_code == 200:
            sid: str = reply.data["id"]
            return sid
        retried.append(reply)
        if attempt + 1 < attempts:
            await trio.sleep(1.0)
    raise AssertionError(f"set-up create failed {attempts} times: {retried[-1]}")


async def command(rig: Rig, sid: str, action: str, data: Any = None) -> Response | None:
    """A per-pod command as Go's callers send it; None when unanswered within 3 s."""
    return await rig.caller.call(rig.pod_queue(), f"/v1/streamings/{sid}/{action}", "POST", data)


async def say(rig: Rig, sid: str, text: str, *, finish: bool) -> str:
    """say_init + say_add (+ say_finish); these are set-up steps, so a failure raises."""
    message_id = str(uuid.uuid4())
    steps: list[tuple[str, dict[str, str]]] = [
        ("say_init", {"message_id": message_id}),
        ("say_add", {"message_id": message_id, "text": text}),
    ]
    if finish:
        steps.append(("say_finish", {"message_id": message_id}))
    for action, data in steps:
        reply = await command(rig, sid, action, data)
        assert reply is not None and reply.status_code == 200, (action, reply)
    return message_id


async def delete(rig: Rig, sid: str) -> Response | None:
    return await rig.caller.call(rig.pod_queue(), f"/v1/streamings/{sid}", "DELETE")


def orphaned_media(rig: Rig, sids: Sequence[str] | None = None) -> list[uuid.UUID]:
    """External medias the fake call-manager created and nobody deleted."""
    left = [m for m in rig.call_manager.created if m not in rig.call_manager.deleted]
    if sids is not None:
        wanted = {uuid.UUID(s) for s in sids}
        left = [m for m in left if m in wanted]
    return left


def daemon_idle(rig: Rig, index: int = 0) -> bool:
    daemon = rig.daemons[index]
    return not (daemon.plane._lanes or daemon.streamings.streamings or len(daemon.supervisor))


async def metric_until(daemon: DaemonProcess, predicate: Callable[[dict[str, float]], bool]) -> None:
    """Poll a child daemon's /metrics until ``predicate`` holds (another process: nothing to wait on)."""
    while True:
        if predicate(await daemon.metrics()):
            return
        await trio.sleep(0.05)


def broker_url() -> str:
    """The broker URL open_rig uses now (the runner and the pytest fixture point it at a private vhost)."""
    url: str = vars(amqp_support)["RABBITMQ_URL"]
    return url


def not_ok(response: Response | None) -> bool:
    return response is None or response.status_code != 200
