"""espeak-ng in worker processes: same audio, synthesis off the daemon, cancel at the next buffer, dead
workers replaced, nothing left behind. Real library and real processes; real clock (see test_espeak.py)."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

from tts_streamer.adapters import espeak_worker as wire
from tts_streamer.adapters.codecs import ulaw_decode
from tts_streamer.adapters.espeak import EspeakEngine, open_espeak_engine
from tts_streamer.adapters.espeak_pool import START_TIMEOUT
from tts_streamer.adapters.voice import VoiceError, VoiceSpec

pytestmark = pytest.mark.realtime

# One sentence with no sentence end: one job of about 200 s of speech, ~1,000 buffers of 200 ms.
ENDLESS = " ".join(["and then the caller waited on the line for a very long time"] * 50)
F_GETPIPE_SZ = 1032


@pytest.fixture
async def engine() -> AsyncIterator[EspeakEngine]:
    eng = EspeakEngine(workers=1)
    yield eng
    with trio.fail_after(3):
        await eng.aclose()


async def _speak(engine: EspeakEngine, text: str) -> bytes:
    with trio.fail_after(5):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(text)
            await stream.end_input()
            return b"".join([chunk async for chunk in stream.audio()])


def _maps(pid: int | str) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def _threads() -> list[str]:
    """This process's threads, less Trio's thread cache (``open_process`` starts Popen in one; idle
    ones exit by themselves)."""
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith("Trio thread"))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_frames_survive_any_split() -> None:
    data = (
        wire.synth_frame(7, 175, "en-us", "Héllo.")
        + wire.frame(wire.CANCEL, 7)
        + wire.frame(wire.AUDIO, 9, b"x")
    )
    decoder = wire.FrameDecoder()
    frames = [f for i in range(len(data)) for f in decoder.feed(data[i : i + 1])]
    assert [(kind, job) for kind, job, _ in frames] == [(wire.SYNTH, 7), (wire.CANCEL, 7), (wire.AUDIO, 9)]
    assert wire.parse_synth(frames[0][2]) == (175, "en-us", "Héllo.")
    assert frames[2][2] == b"x"


# Recorded from the in-process engine (one engine thread, the ctypes callback in the daemon) before the
# worker processes, speaking these three texts in this order on a fresh engine: espeak-ng's output depends
# on what it spoke before (the third differs from the first), so the worker must be a fresh single one.
GOLDEN = [
    (
        "Hello world. This is a test.",
        16956,
        "1670355d83706ae341bf8949d438c435ce0142b5d77c24e7e460ee397ad11f75",
    ),
    (
        "The quick brown fox jumps over the lazy dog.",
        23269,
        "1781ba336e52b3b88539d4f573fd2feee746b6b7fad430de275e11ec8dac9578",
    ),
    (
        "Hello world. This is a test.",
        16962,
        "445ababd86a213618544b35246bb9c92276e1cd4320a801d851ad02c373c5aa6",
    ),
]


@pytest.mark.skipif(
    (importlib.metadata.version("espeakng-loader"), importlib.metadata.version("soxr")) != ("0.2.4", "1.1.0"),
    reason="the golden audio was recorded with espeakng-loader 0.2.4 and soxr 1.1.0",
)
async def test_same_audio_as_the_in_process_engine(engine: EspeakEngine) -> None:
    for text, size, digest in GOLDEN:
        audio = await _speak(engine, text)
        assert (len(audio), hashlib.sha256(audio).hexdigest()) == (size, digest)


def _envelope(audio: bytes) -> np.ndarray[Any, Any]:
    pcm = ulaw_decode(audio).astype(np.float64)
    frames = pcm[: len(pcm) // 160 * 160].reshape(-1, 160)  # 20 ms
    envelope: np.ndarray[Any, Any] = np.sqrt(np.mean(frames**2, axis=1))
    return envelope


def _likeness(audio: bytes, reference: bytes) -> float:
    # espeak-ng's output depends a few samples on what the process spoke before, so the bytes of a
    # sentence differ from worker to worker: compare loudness contours instead.
    x, y = _envelope(audio), _envelope(reference)
    n = min(len(x), len(y))
    return float(np.corrcoef(x[:n], y[:n])[0, 1])


async def test_sentences_on_two_workers_come_in_order() -> None:
    long = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."
    short = "Yes."
    engine = EspeakEngine(workers=2)
    try:
        first, second = await _speak(engine, long), await _speak(engine, short)
        with trio.fail_after(START_TIMEOUT + 1):
            while len(engine.worker_pids) < 2:  # noqa: ASYNC110 (the second worker starts on its own)
                await trio.sleep(0.01)
        for _ in range(3):
            # One sentence per worker: the short one is done first, and held until the long one is.
            audio = await _speak(engine, f"{long} {short}")
            assert _likeness(audio, first + second) > 0.9
            assert _likeness(audio, first + second) > _likeness(audio, second + first) + 0.3
    finally:
        with trio.fail_after(3):
            await engine.aclose()


async def test_synthesis_runs_in_another_process(engine: EspeakEngine) -> None:
    threads = _threads()
    assert len(await _speak(engine, "Hello world.")) > 0
    [pid] = engine.worker_pids
    assert pid != os.getpid()
    # The daemon never loads the library, so no espeak callback can take its GIL, and it runs no thread.
    assert "libespeak-ng" not in _maps("self")
    assert _threads() == threads
    assert "libespeak-ng" in _maps(pid)


def _worker_argv() -> list[str]:
    """The command line of one espeak-ng worker process, driven directly by a test."""
    import espeakng_loader

    return [
        sys.executable,
        "-m",
        wire.__name__,
        f"--library={espeakng_loader.get_library_path()}",
        f"--data={espeakng_loader.get_data_path()}",
    ]


def test_cancel_stops_the_worker_within_one_buffer() -> None:
    argv = _worker_argv()
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None

        def read_frame() -> tuple[int, int, bytes]:
            assert proc.stdout is not None
            size, kind, job = wire.HEADER.unpack(proc.stdout.read(wire.HEADER.size))
            return kind, job, proc.stdout.read(size)

        assert read_frame()[0] == wire.READY
        proc.stdin.write(wire.synth_frame(1, 175, "en-us", ENDLESS))
        proc.stdin.flush()
        kind, job, first = read_frame()
        assert (kind, job) == (wire.AUDIO, 1)
        # Not reading fills the pipe: the worker blocks writing its next buffer, at most a pipe's worth on.
        pipe_size = fcntl.fcntl(proc.stdout.fileno(), F_GETPIPE_SZ)
        proc.stdin.write(wire.frame(wire.CANCEL, 1))
        proc.stdin.flush()
        after = 0
        while (frame := read_frame())[0] == wire.AUDIO:
            after += 1
        assert frame[:2] == (wire.DONE, 1)
        assert frame[2][0] == wire.DONE_CANCELLED
        # What was in the pipe when CANCEL arrived, the buffer being written, and no other.
        assert after <= pipe_size // len(first) + 2
        assert after < 200  # the sentence is ~1,000 buffers long
        proc.stdin.close()
        assert proc.wait(timeout=5) == 0


async def test_leaving_a_stream_stops_its_worker_job_at_once(engine: EspeakEngine) -> None:
    assert len(await _speak(engine, "Warm up.")) > 0
    with trio.fail_after(5):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(ENDLESS)
            await stream.end_input()
            async for _chunk in stream.audio():
                break
        assert engine.jobs_running == 1  # the CANCEL is on its way
        while engine.jobs_running:  # noqa: ASYNC110 (the worker's DONE clears it)
            await trio.sleep(0.001)
    # Stopped long before its ~200 s of speech: the next utterance gets the worker at once.
    assert len(await _speak(engine, "Next.")) > 0


async def test_a_dead_worker_fails_its_utterance_and_is_replaced(engine: EspeakEngine) -> None:
    assert len(await _speak(engine, "Warm up.")) > 0
    [pid] = engine.worker_pids
    with trio.fail_after(10):
        async with engine.open_stream(VoiceSpec()) as stream:
            await stream.send_text(ENDLESS)
            await stream.end_input()
            killed = False
            with pytest.raises(VoiceError) as info:
                async for _chunk in stream.audio():
                    if not killed:
                        os.kill(pid, signal.SIGKILL)
                        killed = True
        assert info.value.kind == "synth"
        while not engine.worker_pids:  # noqa: ASYNC110 (the pool restarts it in the background)
            await trio.sleep(0.01)
    [replacement] = engine.worker_pids
    assert replacement != pid and _gone(pid)
    assert len(await _speak(engine, "Replaced.")) > 0


async def test_close_leaves_no_process_and_no_thread() -> None:
    threads = _threads()
    engine = EspeakEngine(workers=2)
    assert len(await _speak(engine, "Hello.")) > 0
    with trio.fail_after(5):
        while len(engine.worker_pids) < 2:  # noqa: ASYNC110 (the second one starts in the background)
            await trio.sleep(0.01)
    pids = engine.worker_pids
    with trio.fail_after(3):
        await engine.aclose()
    assert all(_gone(pid) for pid in pids)  # exited and reaped
    assert _threads() == threads
    assert engine.worker_pids == []


async def test_open_espeak_engine_closes_its_workers_on_exit() -> None:
    async with open_espeak_engine(workers=1) as engine:
        assert len(await _speak(engine, "Hello.")) > 0
        pids = engine.worker_pids
    assert pids and all(_gone(pid) for pid in pids)


def test_workers_end_with_the_trio_run_even_unclosed() -> None:
    pids: list[int] = []

    async def speak_and_leave() -> None:
        engine = EspeakEngine(workers=1)
        assert len(await _speak(engine, "Hello.")) > 0
        pids.extend(engine.worker_pids)

    trio.run(speak_and_leave)
    assert pids and all(_gone(pid) for pid in pids)


async def test_init_failure_is_a_voice_error_and_retried(tmp_path: Path) -> None:
    engine = EspeakEngine(data_path=str(tmp_path), workers=1)
    for _attempt in range(2):
        with trio.fail_after(5), pytest.raises(VoiceError) as info:
            await engine.start()
        assert info.value.kind == "init" and "phontab" in str(info.value)
    assert engine.worker_pids == []
    await engine.aclose()


def test_the_worker_protocol_has_no_trio() -> None:
    code = "import sys, tts_streamer.adapters.espeak_worker; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ready_frame_names_the_worker_pid() -> None:
    argv = _worker_argv()
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        size, kind, _job = wire.HEADER.unpack(proc.stdout.read(wire.HEADER.size))
        rate, pid = struct.unpack("<II", proc.stdout.read(size))
        proc.stdin.close()  # EOF: the worker exits
        assert (kind, rate, pid) == (wire.READY, 22050, proc.pid)
        assert proc.wait(timeout=5) == 0


async def test_a_hung_worker_is_killed_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    # Says READY, then reads its jobs and never answers.
    hung = (
        "import os, struct, sys; out = sys.stdout.buffer; "
        f"out.write(struct.pack('<IBI', 8, {wire.READY}, 0) + struct.pack('<II', 22050, os.getpid())); "
        "out.flush(); sys.stdin.buffer.read()"
    )
    monkeypatch.setattr("tts_streamer.adapters.espeak_pool.STALL_TIMEOUT", 0.4)
    engine = EspeakEngine(workers=1, worker_command=[sys.executable, "-c", hung])
    try:
        await engine.start()
        [pid] = engine.worker_pids
        with trio.fail_after(5):
            async with engine.open_stream(VoiceSpec()) as stream:
                await stream.send_text("Anybody there?")
                await stream.end_input()
                with pytest.raises(VoiceError):
                    async for _chunk in stream.audio():
                        pass  # pragma: no cover
            while engine.worker_pids in ([], [pid]):  # noqa: ASYNC110 (replaced in the background)
                await trio.sleep(0.01)
        assert _gone(pid)
    finally:
        with trio.fail_after(3):
            await engine.aclose()


def test_espeak_workers_setting() -> None:
    from tts_streamer.adapters.engines import build_engines

    assert getattr(build_engines({"ESPEAK_WORKERS": "3"})[0]["espeak"], "workers", None) == 3
    default = len(os.sched_getaffinity(0))
    for bad in ("", "-2", "many"):
        assert getattr(build_engines({"ESPEAK_WORKERS": bad})[0]["espeak"], "workers", None) == default


def test_a_worker_defers_to_the_daemon_for_the_cpu() -> None:
    """Its bursts must not hold the daemon's loop off the CPU: lower priority and no wake-up preemption."""
    argv = _worker_argv()
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        wire.HEADER.unpack(proc.stdout.read(wire.HEADER.size))  # READY: the worker has set itself up
        try:
            expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
            assert os.getpriority(os.PRIO_PROCESS, proc.pid) == expected
            assert os.sched_getscheduler(proc.pid) == os.SCHED_BATCH
        finally:
            proc.stdin.close()
            assert proc.wait(timeout=5) == 0
