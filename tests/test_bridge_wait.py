"""Waiting for the bridge before the first audio (issue 15 §7, chan_websocket.md §8), in virtual time.

Asterisk says nothing when the media leg joins its bridge; audio sent before the join is lost. The
first audio waits until ``bridge_timeout`` after MEDIA_START, less if a caller frame proves the join.
"""

from __future__ import annotations

import pytest
import trio

from tests.support import media_uri, open_sim_supervisor
from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import SayAdd, SayFinish, SayInit
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.adapters.synthetic import SyntheticEngine, fill_byte
from tts_streamer.simulator.asterisk import AsteriskSimulator, SimCall, SimConfig
from tts_streamer.supervisor.config import ConfigError, DaemonConfig

TEXT = "x" * 10  # one second of audio at 0.1 s per char
FRAMES = 50
WAIT = 0.2
PHASE = 0.01  # Asterisk's ticks at MEDIA_START + 0.01 + k * 0.02

# voipbin's topology: a spy-less snoop in a simple_bridge sends the media leg nothing, ever.
SNOOP = SimConfig.snoop(bridge_delay=0.005, tick_phase=PHASE)
# A softmix bridge: caller frames at 50/s from 8 ms after the join.
SOFTMIX = SimConfig.softmix(bridge_delay=0.005, tick_phase=PHASE)


async def first_audio_after_say(
    nursery: trio.Nursery, config: SimConfig, *, say_after: float, wait: float = WAIT
) -> tuple[float, SimCall]:
    """Start a session, say TEXT ``say_after`` s later; (first audio's arrival - say time, the call)."""
    sim = AsteriskSimulator(config)
    call = sim.expect("c1")
    engine = SyntheticEngine(seconds_per_char=0.1)
    pacing = PacingConfig(bridge_timeout=wait)
    async with open_sim_supervisor(sim, engine, nursery, pacing=pacing) as (sup, sink):
        await sup.start_session("c1", media_uri("c1"))
        await trio.sleep(say_after)
        said_at = trio.current_time()
        await sup.call("c1", SayInit())
        await sup.call("c1", SayAdd(TEXT))
        await sup.call("c1", SayFinish())
        await sink.wait_for(ev.PlayFinished, "c1")
    return call.messages[0].time - said_at, call


def heard_frames(call: SimCall) -> int:
    return sum(1 for f in call.played if f.bridged and f.data[0] == fill_byte(TEXT))


@pytest.mark.parametrize("config", [SNOOP, SOFTMIX], ids=["snoop", "softmix"])
async def test_a_say_long_after_the_join_goes_out_at_once(nursery, autojump_clock, config):
    # Before: the wait was counted from the first audio, so without caller frames every first audio
    # waited the full bridge timeout, however long ago the leg had joined.
    delay, call = await first_audio_after_say(nursery, config, say_after=1.0)
    assert delay < 0.001
    assert call.frames_lost_unbridged == 0 and heard_frames(call) == FRAMES


async def test_a_say_at_once_without_caller_frames_waits_until_the_bridge_wait_after_media_start(
    nursery, autojump_clock
):
    delay, call = await first_audio_after_say(nursery, SNOOP, say_after=0.0)
    assert call.media_start_at is not None
    assert call.messages[0].time == pytest.approx(call.media_start_at + WAIT)
    assert delay == pytest.approx(WAIT)
    assert call.frames_lost_unbridged == 0 and heard_frames(call) == FRAMES


async def test_a_caller_frame_ends_the_wait_at_once(nursery, autojump_clock):
    delay, call = await first_audio_after_say(nursery, SOFTMIX, say_after=0.0)
    # Joined at 5 ms; softmix sends caller frames from 8 ms after the join, so the first one goes out
    # on the tick at 30 ms; the audio follows it at once instead of waiting the full 200 ms.
    assert call.caller_frames_sent > 0
    assert delay == pytest.approx(PHASE + 0.020)
    assert call.frames_lost_unbridged == 0 and heard_frames(call) == FRAMES


async def test_a_join_slower_than_the_wait_loses_exactly_the_audio_before_it(nursery, autojump_clock):
    # Joined 300 ms after MEDIA_START; the wait gives up at 200 ms and audio goes out then. The ticks
    # at 210, 230, ..., 290 ms play into nothing: the first 100 ms of the speech are lost. That is what
    # a default shorter than the slowest join trades for a prompter start.
    slow = SimConfig(send_caller_audio=False, bridge_delay=0.3, tick_phase=PHASE)
    delay, call = await first_audio_after_say(nursery, slow, say_after=0.0)
    assert delay == pytest.approx(WAIT)
    assert call.frames_lost_unbridged == 5
    assert heard_frames(call) == FRAMES - 5
    assert call.played[0].data[0] == fill_byte(TEXT) and not call.played[0].bridged


async def test_no_wait_at_all_loses_the_audio_before_a_fast_join(nursery, autojump_clock):
    quick = SimConfig(send_caller_audio=False, bridge_delay=0.02, tick_phase=PHASE)
    delay, call = await first_audio_after_say(nursery, quick, say_after=0.0, wait=0.0)
    assert delay < 0.001
    assert call.frames_lost_unbridged == 1  # the tick at 10 ms, before the join at 20 ms
    assert heard_frames(call) == FRAMES - 1


def test_bridge_wait_setting() -> None:
    assert DaemonConfig().bridge_wait_ms == 200 == PacingConfig().bridge_timeout * 1000
    assert DaemonConfig.from_env({"BRIDGE_WAIT_MS": "0"}).bridge_wait_ms == 0
    assert DaemonConfig.from_env({"BRIDGE_WAIT_MS": "750"}).bridge_wait_ms == 750
    with pytest.raises(ConfigError, match="BRIDGE_WAIT_MS"):
        DaemonConfig.from_env({"BRIDGE_WAIT_MS": "-1"})
    with pytest.raises(ValueError, match="bridge_timeout"):
        PacingConfig(bridge_timeout=-0.1)
