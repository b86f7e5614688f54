"""Pacing modes: the absolute timeline absorbs write time; the bench baselines (bench/baselines.py)
drift behind (sleep after write) or run ahead (the Go service today)."""

from __future__ import annotations

from typing import cast

import pytest
import trio
from bench.baselines import go_today, sleep_after_write, step_for

from tts_streamer.actors.audio import AudioChunk, AudioItem, UtteranceEnd
from tts_streamer.actors.media_socket import MediaSocket, PacingConfig
from tts_streamer.adapters.chan_websocket.client import MediaConnection
from tts_streamer.adapters.chan_websocket.protocol import ControlFormat, MediaStart

FRAMES = 250
WRITE_TIME = 0.001  # every write takes 1 ms of (virtual) time


class SlowConnection:
    """Just enough of a MediaConnection: bridged, never paused, and each write takes WRITE_TIME."""

    def __init__(self) -> None:
        self.media_start = MediaStart(
            connection_id="c1",
            channel="WebSocket/c1",
            format="ulaw",
            optimal_frame_size=160,
            ptime=20,
            control_format=ControlFormat.TEXT,
        )
        self.connection_id = "c1"
        self.started_at = 0.0
        self.bridged = trio.Event()
        self.bridged.set()
        self.paused = False
        self.writes: list[tuple[float, int]] = []  # (time the write started, bytes)

    async def wait_resumed(self) -> None:
        pass

    async def send_audio(self, payload: bytes) -> None:
        self.writes.append((trio.current_time(), len(payload)))
        await trio.sleep(WRITE_TIME)

    async def send_command(self, command: object) -> None:
        pass

    def forget_marks(self) -> None:
        pass

    def on_mark(self, mark_id: str, handler: object) -> None:
        pass


class Listener:
    def __init__(self) -> None:
        self.played = trio.Event()

    def on_first_frame(self, utterance: int) -> None:
        pass

    def on_frames_sent(self, utterance: int, frames: int) -> None:
        pass

    def on_utterance_played(self, utterance: int) -> None:
        self.played.set()


async def pace(config: PacingConfig, frames: int = FRAMES) -> list[tuple[float, int]]:
    """Pace one utterance of ``frames`` frames through a slow connection; the write log, times from 0."""
    conn = SlowConnection()
    send, recv = trio.open_memory_channel[AudioItem](8)
    listener = Listener()
    media = MediaSocket(cast(MediaConnection, conn), recv, listener, config)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(media.serve)
        await send.send(AudioChunk(0, b"\x10" * 160 * frames))
        await send.send(UtteranceEnd(0))
        await listener.played.wait()
        nursery.cancel_scope.cancel()
    start = conn.writes[0][0]
    return [(t - start, size) for t, size in conn.writes]


async def test_absolute_timeline_absorbs_write_time(autojump_clock):
    writes = await pace(PacingConfig(lead_frames=0, frames_per_message=1))
    assert len(writes) == FRAMES
    # Frame n starts at exactly n * 20 ms: the 1 ms spent writing each frame never accumulates.
    assert all(t == pytest.approx(n * 0.020, abs=1e-9) for n, (t, _) in enumerate(writes))


async def test_sleep_after_write_baseline_drifts_by_the_write_time(autojump_clock):
    writes = await pace(PacingConfig(lead_frames=0, frames_per_message=1, step=sleep_after_write))
    assert len(writes) == FRAMES
    # Each frame comes 21 ms after the previous one: after 250 frames the drift is 249 ms.
    assert all(t == pytest.approx(n * 0.021, abs=1e-9) for n, (t, _) in enumerate(writes))
    drift = writes[-1][0] - (FRAMES - 1) * 0.020
    assert drift == pytest.approx((FRAMES - 1) * WRITE_TIME, abs=1e-9)


async def test_sleep_after_write_keeps_the_lead_and_batches(autojump_clock):
    writes = await pace(PacingConfig(lead_frames=3, frames_per_message=5, step=sleep_after_write), 20)
    assert [size for _, size in writes] == [800] * 4
    # The first message carries the lead (it is slept off only beyond it), then 5 frames per 5 ptimes.
    starts = [t for t, _ in writes]
    assert starts == pytest.approx([0.0, 0.001 + 0.040, 0.002 + 0.140, 0.003 + 0.240], abs=1e-9)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        step_for("sleep")


async def test_go_today_baseline_runs_ahead_one_frame_per_chunk(autojump_clock):
    """A fresh ticker per 5-frame chunk and no tick after a chunk's last frame: 5 frames per 81 ms."""
    writes = await pace(PacingConfig(lead_frames=0, frames_per_message=1, step=go_today), 20)
    assert [size for _, size in writes] == [160] * 20
    chunk = [0.0, 0.020, 0.040, 0.060, 0.080]
    expected = [c * (0.080 + WRITE_TIME) + t for c in range(4) for t in chunk]
    assert [t for t, _ in writes] == pytest.approx(expected, abs=1e-9)
    assert writes[-1][0] < 19 * 0.020 - 0.050  # ahead of real time by ~one frame per chunk
