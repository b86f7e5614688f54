from __future__ import annotations

import warnings

import numpy as np
import pytest

from tts_streamer.adapters.codecs import (
    ULAW_SILENCE,
    StreamResampler,
    pcm16_to_ulaw8k,
    ulaw_decode,
    ulaw_encode,
)

ALL_INT16 = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


def _segment_step(codes: np.ndarray) -> np.ndarray:
    # Quantisation step (in 16-bit units) of the segment each mu-law code lies in.
    seg = ((~codes.astype(np.int32)) & 0x70) >> 4
    return np.asarray(8 << seg)


@pytest.mark.parametrize(
    ("sample", "code"),
    [
        (0, 0xFF),
        (-1, 0x7E),
        (100, 0xF2),
        (-100, 0x72),
        (1000, 0xCE),
        (-1000, 0x4E),
        (32767, 0x80),
        (-32768, 0x00),
    ],
)
def test_encode_known_vectors(sample: int, code: int) -> None:
    assert ulaw_encode(np.array([sample], dtype=np.int16)) == bytes([code])


@pytest.mark.parametrize(
    ("code", "sample"), [(0x80, 32124), (0xF0, 120), (0xFF, 0), (0x7F, 0), (0x00, -32124)]
)
def test_decode_known_vectors(code: int, sample: int) -> None:
    assert ulaw_decode(bytes([code])).tolist() == [sample]


def test_silence_code_decodes_to_zero() -> None:
    assert ulaw_encode(np.zeros(4, dtype=np.int16)) == bytes([ULAW_SILENCE]) * 4


def test_encode_matches_audioop_on_every_input() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # gone in Python 3.13
    assert ulaw_encode(ALL_INT16) == audioop.lin2ulaw(ALL_INT16.tobytes(), 2)
    codes = bytes(range(256))
    assert ulaw_decode(codes).tobytes() == audioop.ulaw2lin(codes, 2)


def test_decode_of_encode_is_within_one_quantisation_step() -> None:
    codes = np.frombuffer(ulaw_encode(ALL_INT16), dtype=np.uint8)
    error = np.abs(ulaw_decode(codes.tobytes()).astype(np.int32) - ALL_INT16.astype(np.int32))
    assert (error < _segment_step(codes)).all()


def test_encode_of_decode_is_identity_except_negative_zero() -> None:
    codes = bytes(range(256))
    again = ulaw_encode(ulaw_decode(codes))
    # 0x7F (-0) and 0xFF (+0) both decode to 0, which encodes as 0xFF.
    assert [(c, again[c]) for c in range(256) if again[c] != c] == [(0x7F, 0xFF)]


def test_encode_accepts_non_contiguous_input() -> None:
    pcm = (np.arange(200, dtype=np.int16) * 97)[::2]
    assert ulaw_encode(pcm) == ulaw_encode(np.ascontiguousarray(pcm))
    assert len(ulaw_encode(pcm)) == 100


def _tone(freq: float, rate: int, n: int, amplitude: float = 10000.0) -> np.ndarray:
    return np.rint(amplitude * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.int16)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


@pytest.mark.parametrize("chunk", [1, 441, 4410, 10000])
def test_resampler_total_length_after_last(chunk: int) -> None:
    n = 22050 * 2 + 123
    pcm = _tone(440, 22050, n)
    resampler = StreamResampler(22050)
    out = [resampler.process(pcm[i : i + chunk]) for i in range(0, n, chunk)]
    out.append(resampler.process(np.zeros(0, dtype=np.int16), last=True))
    total = sum(len(o) for o in out)
    assert abs(total - n * 8000 / 22050) <= 3


def test_resampler_is_reusable_after_last_and_after_reset() -> None:
    pcm = _tone(440, 22050, 22050)
    resampler = StreamResampler(22050)
    first = resampler.process(pcm, last=True)
    second = resampler.process(pcm, last=True)
    assert len(first) == len(second)
    resampler.process(pcm[:5000])
    resampler.reset()
    assert len(resampler.process(pcm, last=True)) == len(first)


def test_resampler_keeps_speech_band_and_removes_alias_band() -> None:
    n = 22050
    kept = StreamResampler(22050).process(_tone(1000, 22050, n), last=True)
    assert _rms(kept[400:-400]) == pytest.approx(10000 / np.sqrt(2), rel=0.05)
    # 6 kHz is above the 4 kHz Nyquist limit of 8 kHz audio; it would fold to 2 kHz without a filter.
    aliased = StreamResampler(22050).process(_tone(6000, 22050, n), last=True)
    assert _rms(aliased[400:-400]) < 10.0


def test_resampler_passes_through_at_8k() -> None:
    pcm = _tone(440, 8000, 1000)
    resampler = StreamResampler(8000)
    assert np.array_equal(resampler.process(pcm), pcm)
    assert len(resampler.process(np.zeros(0, dtype=np.int16), last=True)) == 0


def test_resampler_rejects_bad_rates() -> None:
    with pytest.raises(ValueError):
        StreamResampler(0)


def test_pcm16_to_ulaw8k_one_shot() -> None:
    data = pcm16_to_ulaw8k(_tone(440, 16000, 16000), 16000)
    assert abs(len(data) - 8000) <= 3
    assert _rms(ulaw_decode(data)) == pytest.approx(10000 / np.sqrt(2), rel=0.05)
