"""The daemon warms its cloud voices at start-up (issue 17 §3): readiness waits for it, bounded by
VOICE_WARMUP_TIMEOUT; a voice that fails to warm is a readiness detail, never fatal."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import attrs
import pytest
import trio

from tests.amqp_support import open_rig, run_pod
from tests.services import require_rabbitmq
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voice import VoiceEngine, VoiceSpec, VoiceStream
from tts_streamer.supervisor.daemon import _warm_voices
from tts_streamer.supervisor.ops.health import Readiness


@attrs.define
class WarmingEngine:
    """A synthetic voice whose warm-up takes ``seconds`` (or raises)."""

    inner: SyntheticEngine
    seconds: float = 0.0
    fail: bool = False
    warmed: int = 0
    name: str = "warming"

    def open_stream(self, voice: VoiceSpec) -> AbstractAsyncContextManager[VoiceStream]:
        return self.inner.open_stream(voice)

    @property
    def open_streams(self) -> int:
        return self.inner.open_streams

    async def warm(self) -> None:
        await trio.sleep(self.seconds)
        if self.fail:
            raise ConnectionError("vendor unreachable")
        self.warmed += 1


async def test_not_ready_while_warming_then_ready_with_the_failures_listed(autojump_clock) -> None:
    readiness = Readiness(command_plane_connected=True)
    slow = WarmingEngine(SyntheticEngine(), seconds=30.0)
    broken = WarmingEngine(SyntheticEngine(), fail=True)
    fine = WarmingEngine(SyntheticEngine(), seconds=1.0)
    engines: dict[str, VoiceEngine] = {
        "slow": slow,
        "broken": broken,
        "fine": fine,
        "espeak": SyntheticEngine(),
    }
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_warm_voices, engines, readiness, 5.0)
        await trio.sleep(0.5)
        assert readiness.reasons() == ["vendors_warming"]
        await trio.sleep(6.0)
    assert readiness.ready() and fine.warmed == 1
    assert set(readiness.vendors_not_warmed) == {"slow", "broken"}
    assert "5 s" in readiness.vendors_not_warmed["slow"]
    assert "vendor unreachable" in readiness.vendors_not_warmed["broken"]


@pytest.mark.realtime
async def test_serve_warms_its_voices_at_start_and_reports_failures() -> None:
    require_rabbitmq()
    with trio.fail_after(30):
        async with open_rig() as rig:
            good = WarmingEngine(SyntheticEngine(), name="good")
            bad = WarmingEngine(SyntheticEngine(), fail=True, name="bad")
            engines: dict[str, VoiceEngine] = {rig.engine.name: rig.engine, "good": good, "bad": bad}
            async with run_pod(rig, engines=engines, voice_warmup_timeout=2.0) as pod:
                readiness = pod.handle.readiness
                assert readiness is not None
                while readiness.vendors_warming or not (good.warmed or readiness.vendors_not_warmed):  # noqa: ASYNC110
                    await trio.sleep(0.01)
                assert good.warmed == 1
                assert list(readiness.vendors_not_warmed) == ["bad"]
