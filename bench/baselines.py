"""Pacing the bench compares tts-streamer's absolute timeline against (benchmarks only).

Each is a ``PacingConfig.step`` factory: called once per MediaSocket, it returns the step the
MediaSocket runs for each frame due (``MediaSocket.send_due`` writes the head of its queue; ``t0``
and ``n`` are its timeline; ``alarm.wait_until`` waits and returns False when a flush ended the wait).
Lateness is still recorded against an absolute slot, so the sender's stats show the drift.

- ``sleep_after_write``: the Go service *before* its pacing change: after each write, sleep one ptime
  per frame written beyond the lead, so write time and late wake-ups accumulate as drift (behind).
- ``go_today``: the Go service as it is today: a fresh 20 ms ticker per vendor chunk, one 160-byte
  message per frame (run it with frames_per_message=1), a tick awaited between a chunk's frames but
  none after its last, so every chunk of k frames takes k - 1 ticks: it runs ahead of real time (by
  one frame per chunk) and Asterisk's queue grows until the audio ends or XOFF.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from tts_streamer.actors.media_socket import MediaSocket

Step = Callable[[], Awaitable[None]]

# The bench's synthetic vendor yields 800-byte chunks (bench/driver.py), i.e. 5 frames per chunk.
GO_CHUNK_FRAMES = 5


def sleep_after_write(media: MediaSocket) -> Step:
    lead = media.lead_frames

    async def step() -> None:
        if media.t0 is None:
            media.t0 = trio.current_time()
        sent_before = media.n
        await media.send_due(media.t0 + max(0, media.n - lead) * media.ptime)
        beyond_lead = media.n - max(sent_before, lead)
        if beyond_lead > 0:
            await media.alarm.wait_until(trio.current_time() + beyond_lead * media.ptime)

    return step


def go_today(media: MediaSocket, chunk_frames: int = GO_CHUNK_FRAMES) -> Step:
    ticker = {"start": 0.0, "index": 0}

    async def step() -> None:
        now = trio.current_time()
        if media.t0 is None:  # first audio, or after a flush: a new chunk
            media.t0 = now
            ticker["index"] = 0
        if ticker["index"] == 0:
            ticker["start"] = now  # time.NewTicker for this chunk
        await media.send_due(media.t0 + media.n * media.ptime)
        ticker["index"] += 1
        if ticker["index"] >= chunk_frames:
            ticker["index"] = 0  # the chunk's last frame: straight on to the next chunk
            return
        await media.alarm.wait_until(ticker["start"] + ticker["index"] * media.ptime)

    return step


STEPS: dict[str, Callable[[MediaSocket], Step] | None] = {
    "absolute": None,
    "sleep_after_write": sleep_after_write,
    "go_today": go_today,
}


def step_for(mode: str) -> Callable[[MediaSocket], Step] | None:
    """The PacingConfig.step for a scenario's mode name ("absolute" is what ships: None)."""
    try:
        return STEPS[mode]
    except KeyError:
        raise ValueError(f"mode must be one of {', '.join(STEPS)}: {mode!r}") from None
