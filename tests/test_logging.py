"""Structured logs: every line of a call carries its call id (from any of its tasks) and the pod id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from tests.support import media_uri, open_sim_supervisor
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayInit
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.simulator.asterisk import AsteriskSimulator
from tts_streamer.supervisor.ops.logging_setup import configure_logging


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("INFO", pod_id="pod-a", stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


async def test_a_vendor_task_log_line_is_json_with_call_and_pod(nursery, autojump_clock, log_stream):
    sim = AsteriskSimulator(seed=1)
    sim.expect("call-7")
    engine = SyntheticEngine(seconds_per_char=0.1, fail_after_bytes=800)
    async with open_sim_supervisor(sim, engine, nursery) as (sup, sink):
        await sup.start_session("call-7", media_uri("call-7"))
        await sup.call("call-7", SayInit())
        await sup.call("call-7", SayAdd("this fails after a little audio"))
        await sup.call("call-7", SayFinish())
        await sink.wait_for(ev.PlayFinished, "call-7")
        logging.getLogger("outside").info("not in a call")
    lines = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    failure = next(line for line in lines if "failed" in line["event"] and line["logger"].endswith("vendor"))
    assert failure["call_id"] == "call-7" and failure["pod_id"] == "pod-a"
    assert failure["level"] == "warning" and failure["timestamp"].endswith("Z")
    outside = next(line for line in lines if line["event"] == "not in a call")
    assert "call_id" not in outside and outside["pod_id"] == "pod-a"
