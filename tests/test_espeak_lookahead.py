"""The espeak pool's scheduling of sentences: the current one and its lookahead (adapters/espeak_pool.py).

No worker processes: the pool's workers are marked ready by hand, the SYNTH and CANCEL frames it posts are
read from their outboxes, and the AUDIO and DONE frames a worker would send are fed to the pool's frame
handlers, so every interleaving is chosen by the test. No clock is involved (nothing here waits).
"""

from __future__ import annotations

import random

import pytest
import trio

from tts_streamer.adapters import espeak_worker as wire
from tts_streamer.adapters.espeak import EspeakEngine, EspeakStream
from tts_streamer.adapters.espeak_pool import WorkerPool
from tts_streamer.adapters.voice import VoiceError, VoiceSpec

SENTENCES = [f"This is sentence number {i}, of a fairly ordinary length." for i in range(18)]


def _pool(workers: int) -> WorkerPool:
    pool = WorkerPool(EspeakEngine(workers=workers), [], workers)
    for worker in pool.workers:
        worker.ready = True
    return pool


def _posted(pool: WorkerPool, slot: int) -> list[tuple[int, int, str]]:
    """(kind, job id, sentence or "") of the frames posted to a worker since last asked."""
    worker = pool.workers[slot]
    frames = wire.FrameDecoder().feed(b"".join(worker.outbox))
    worker.outbox.clear()
    return [(kind, job, wire.parse_synth(p)[2] if kind == wire.SYNTH else "") for kind, job, p in frames]


def _job_id(pool: WorkerPool, text: str) -> int:
    for worker in pool.workers:
        for job in worker.jobs.values():
            if job.text == text:
                return job.id
    raise AssertionError(f"{text!r} is on no worker")


def _audio(pool: WorkerPool, slot: int, job_id: int, data: bytes) -> None:
    pool._audio(pool.workers[slot], job_id, [data])


def _done(pool: WorkerPool, slot: int, job_id: int, status: int = wire.DONE_OK) -> None:
    pool._on_frame(pool.workers[slot], wire.DONE, job_id, bytes([status]))


def _heard(stream: EspeakStream) -> list[bytes]:
    chunks = []
    while True:
        try:
            chunks.append(stream._receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return chunks


def _ended(stream: EspeakStream) -> bool:
    try:
        stream._receive.receive_nowait()
    except trio.EndOfChannel:
        return True
    except trio.WouldBlock:
        return False
    raise AssertionError("audio left in the stream")


def _jobs_of(pool: WorkerPool, stream: EspeakStream) -> int:
    running = sum(job.stream is stream for worker in pool.workers for job in worker.jobs.values())
    waiting = {job.id for _d, _i, job in pool.waiting if job.stream is stream and not job.dispatched}
    return running + (0 if stream.cancelled else len(waiting))


async def _open(pool: WorkerPool, *sentences: str) -> EspeakStream:
    stream = EspeakStream(pool.engine, pool, VoiceSpec())
    await stream.send_text(" ".join(sentences))
    return stream


async def test_the_next_sentence_is_submitted_before_the_current_one_finishes() -> None:
    pool = _pool(2)
    stream = await _open(pool, *SENTENCES[:3])
    # Both on a worker at once: the second does not wait for the first to be done.
    assert _posted(pool, 0) == [(wire.SYNTH, _job_id(pool, SENTENCES[0]), SENTENCES[0])]
    assert _posted(pool, 1) == [(wire.SYNTH, _job_id(pool, SENTENCES[1]), SENTENCES[1])]
    assert len(stream.jobs) == 2 and not pool.waiting  # the third is not queued yet
    _done(pool, 0, _job_id(pool, SENTENCES[0]))
    assert _posted(pool, 0) == [(wire.SYNTH, _job_id(pool, SENTENCES[2]), SENTENCES[2])]


async def test_a_lookahead_needed_later_leaves_a_busy_workers_second_place_to_first_sentences() -> None:
    pool = _pool(1)
    soon = await _open(pool, "Yes.", "No.")  # a short sentence: its lookahead is needed within the horizon
    assert [text for _kind, _job, text in _posted(pool, 0)] == ["Yes.", "No."]
    _done(pool, 0, _job_id(pool, "Yes."))
    _done(pool, 0, _job_id(pool, "No."))
    assert not soon.jobs
    current = await _open(pool, *SENTENCES[:2])
    assert [text for _kind, _job, text in _posted(pool, 0)] == [SENTENCES[0]]
    assert [job.text for _d, _i, job in pool.waiting] == [SENTENCES[1]]  # queued, needed in ~3 s
    newcomer = await _open(pool, SENTENCES[2])
    assert [text for _kind, _job, text in _posted(pool, 0)] == [SENTENCES[2]]  # not behind the lookahead
    _done(pool, 0, _job_id(pool, SENTENCES[0]))
    assert _posted(pool, 0) == []  # still busy with the newcomer's
    _done(pool, 0, _job_id(pool, SENTENCES[2]))
    assert [text for _kind, _job, text in _posted(pool, 0)] == [SENTENCES[1]]  # an idle worker takes it
    assert len(current.jobs) == 1 and not newcomer.jobs


async def test_a_lookahead_on_another_worker_is_heard_after_the_sentence_before_it() -> None:
    pool = _pool(2)
    stream = await _open(pool, *SENTENCES[:3])
    first, second = _job_id(pool, SENTENCES[0]), _job_id(pool, SENTENCES[1])
    assert first in pool.workers[0].jobs and second in pool.workers[1].jobs
    _audio(pool, 1, second, b"B1")  # the second worker is quicker
    _audio(pool, 0, first, b"A1")
    _done(pool, 1, second)
    _audio(pool, 0, first, b"A2")
    assert _heard(stream) == [b"A1", b"A2"]
    assert not _posted(pool, 0)[2:] and len(stream.jobs) == 2  # the done lookahead still counts
    _posted(pool, 1)
    _done(pool, 0, first)
    assert _heard(stream) == [b"B1"]
    third = _job_id(pool, SENTENCES[2])
    await stream.end_input()
    _audio(pool, 0, third, b"C1")
    _done(pool, 0, third)
    assert _heard(stream) == [b"C1"]
    assert _ended(stream)


async def test_leaving_drops_the_waiting_jobs_and_cancels_the_running_ones() -> None:
    pool = _pool(1)
    busy = await _open(pool, *SENTENCES[:4])
    waiting = await _open(pool, *SENTENCES[4:8])
    # The worker holds both first sentences; both lookaheads wait.
    running = [_job_id(pool, SENTENCES[0]), _job_id(pool, SENTENCES[4])]
    _posted(pool, 0)
    assert sorted(job.text for _d, _i, job in pool.waiting) == [SENTENCES[1], SENTENCES[5]]
    assert len(busy.jobs) == len(waiting.jobs) == 2
    cancelled = pool.engine.jobs_cancelled
    waiting.close()
    assert pool.engine.jobs_cancelled == cancelled + 1 + 2  # the queued lookahead, the two never queued
    busy.close()
    assert pool.engine.jobs_cancelled == cancelled + 2 * (1 + 2)
    assert _posted(pool, 0) == [(wire.CANCEL, running[1], ""), (wire.CANCEL, running[0], "")]
    _audio(pool, 0, running[0], b"late")  # sent before the worker saw the CANCEL: dropped
    _done(pool, 0, running[0], wire.DONE_CANCELLED)
    _done(pool, 0, running[1], wire.DONE_CANCELLED)
    assert pool.engine.jobs_cancelled == cancelled + 2 * (1 + 2) + 2
    # Nothing of either stream is given to the worker again.
    assert pool.running == 0 and not pool.waiting and _posted(pool, 0) == []
    assert not busy.jobs and not waiting.jobs
    assert busy.audio_seconds == 0 and busy.first_audio_at is None  # the late chunk went nowhere


async def test_a_stream_never_has_more_than_two_jobs_and_its_audio_stays_in_order() -> None:
    pool = _pool(2)
    rng = random.Random(8)
    streams = [await _open(pool, *SENTENCES[6 * i : 6 * i + 6]) for i in range(3)]
    for stream in streams:
        await stream.end_input()
    heard: dict[EspeakStream, list[bytes]] = {stream: [] for stream in streams}
    sent: dict[str, list[bytes]] = {}
    while pool.running:
        for stream in streams:
            assert _jobs_of(pool, stream) <= 2 and len(stream.jobs) <= 2
        slot = rng.choice([w.slot for w in pool.workers if w.jobs])
        job = next(iter(pool.workers[slot].jobs.values()))  # a worker runs its jobs in order
        for part in range(rng.randint(1, 3)):
            sent.setdefault(job.text, []).append(f"{job.text}/{part}".encode())
            _audio(pool, slot, job.id, sent[job.text][-1])
        _done(pool, slot, job.id)
        for stream in streams:
            heard[stream] += _heard(stream)
    for i, stream in enumerate(streams):
        assert heard[stream] == [chunk for text in SENTENCES[6 * i : 6 * i + 6] for chunk in sent[text]]
        assert _ended(stream)  # every sentence done: the stream ended


async def test_a_lookahead_does_not_jump_another_streams_first_sentence() -> None:
    pool = _pool(1)
    filler = await _open(pool, SENTENCES[0])
    early = await _open(pool, SENTENCES[2], SENTENCES[3])  # the worker is full; its lookahead waits
    late = await _open(pool, SENTENCES[4])  # its first sentence is needed before early's second
    assert early.jobs[1].deadline > late.jobs[0].deadline > early.jobs[0].deadline
    assert [text for _kind, _job, text in _posted(pool, 0)] == [SENTENCES[0], SENTENCES[2]]
    _done(pool, 0, _job_id(pool, SENTENCES[0]))
    assert [text for _kind, _job, text in _posted(pool, 0)] == [SENTENCES[4]]
    _done(pool, 0, _job_id(pool, SENTENCES[2]))
    _done(pool, 0, _job_id(pool, SENTENCES[4]))
    assert [text for _kind, _job, text in _posted(pool, 0)] == [SENTENCES[3]]
    assert not filler.jobs and not late.jobs


async def test_a_lost_worker_fails_the_stream_and_cancels_its_lookahead_elsewhere() -> None:
    pool = _pool(2)
    stream = await _open(pool, *SENTENCES[:4])
    first, second = _job_id(pool, SENTENCES[0]), _job_id(pool, SENTENCES[1])
    _posted(pool, 1)
    _audio(pool, 0, first, b"A1")
    pool._lost(pool.workers[0])
    assert _posted(pool, 1) == [(wire.CANCEL, second, "")]
    _audio(pool, 1, second, b"B1")  # dropped: the stream has failed
    _done(pool, 1, second, wire.DONE_CANCELLED)
    assert pool.running == 0 and not pool.waiting
    chunks = []
    with pytest.raises(VoiceError):
        async for chunk in stream.audio():
            chunks.append(chunk)
    assert chunks == [b"A1"]


class _Clock:
    now = 100.0

    @classmethod
    def monotonic(cls) -> float:
        return cls.now


async def test_a_lookahead_whose_sentence_began_late_is_needed_later(monkeypatch: pytest.MonkeyPatch) -> None:
    from tts_streamer.adapters import espeak, espeak_pool

    for module in (espeak, espeak_pool):
        monkeypatch.setattr(module, "time", _Clock)
    pool = _pool(1)
    _Clock.now = 100.0
    late_start = await _open(pool, SENTENCES[0], SENTENCES[1])
    await _open(pool, SENTENCES[2])  # fills the worker's second place
    lookahead = late_start.jobs[1]
    assert lookahead.deadline < 105
    _Clock.now = 110.0  # the first sentence's audio begins only now
    _audio(pool, 0, _job_id(pool, SENTENCES[0]), bytes(3 * 8000))
    assert lookahead.deadline > 110
    _Clock.now = 111.0
    await _open(pool, SENTENCES[3])  # a first sentence, needed now: before the lookahead
    _posted(pool, 0)
    _done(pool, 0, _job_id(pool, SENTENCES[0]))
    assert lookahead.deadline == 113.0  # exact now: when the 3 s of audio heard run out
    assert [text for _kind, _job, text in _posted(pool, 0)] == [SENTENCES[3]]
    _done(pool, 0, _job_id(pool, SENTENCES[2]))
    _done(pool, 0, _job_id(pool, SENTENCES[3]))
    assert [text for _kind, _job, text in _posted(pool, 0)] == [SENTENCES[1]]  # queued once, not twice
    assert pool.waiting == [] or all(job.dispatched for _d, _i, job in pool.waiting)
