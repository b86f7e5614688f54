"""Helpers for the cloud-voice tests: a simulated call per engine on the real clock, thread accounting."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio._core._thread_cache as trio_thread_cache

from tests.fakes.vendor_faults import fake_fill_byte
from tests.support import RecordingSink, media_uri, open_sim_supervisor
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayInit
from tts_streamer.adapters.voice import VoiceEngine
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimCall
from tts_streamer.supervisor.sessions import Supervisor

FAULTS = ["slow_first_byte", "stall", "error", "drop", "malformed"]


def client_threads() -> int:
    """``threading.active_count()`` less the fakes' own server threads (named ``fake-*``)."""
    return threading.active_count() - sum(1 for t in threading.enumerate() if t.name.startswith("fake-"))


def short_thread_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle Trio worker threads normally linger 10 s in Trio's cache; make them leave at once so the
    thread count can be compared with its baseline within a test."""
    monkeypatch.setattr(trio_thread_cache, "IDLE_TIMEOUT", 0.05)


async def wait_until(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``predicate``; returns the seconds it took, fails the test after ``within``."""
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > within:
            raise AssertionError(f"not within {within} s: {what}")
        await trio.sleep(0.002)
    return time.perf_counter() - start


async def assert_threads_back(baseline: int, within: float = 2.0) -> float:
    return await wait_until(lambda: client_threads() <= baseline, within, f"threads back to {baseline}")


@asynccontextmanager
async def vendor_call(
    engine: VoiceEngine, nursery: trio.Nursery, call_id: str = "c1"
) -> AsyncIterator[tuple[Supervisor, RecordingSink, SimCall]]:
    sim = AsteriskSimulator(seed=1)
    call = sim.expect(call_id)
    async with open_sim_supervisor(sim, engine, nursery) as (sup, sink):
        await sup.start_session(call_id, media_uri(call_id))
        yield sup, sink, call


async def say(sup: Supervisor, *texts: str, finish: bool = True, call_id: str = "c1") -> None:
    await sup.call(call_id, SayInit())
    for text in texts:
        await sup.call(call_id, SayAdd(text))
    if finish:
        await sup.call(call_id, SayFinish())


async def finished(sink: RecordingSink, within: float = 5.0, n: int = 1) -> ev.PlayFinished:
    with trio.fail_after(within):
        await sink.wait_for(ev.PlayFinished, where=lambda _: len(sink.of(ev.PlayFinished)) >= n)
    return sink.of(ev.PlayFinished)[n - 1]


def frames_of(call: SimCall, text: str) -> int:
    """Frames the caller heard that a fake spoke for ``text`` (its fill byte)."""
    fill = fake_fill_byte(text)
    return sum(1 for f in call.played if f.bridged and f.data[0] == fill)
