"""Sans-IO audio conversion to telephone audio: 16-bit PCM at any rate -> 8 kHz G.711 mu-law.

Mu-law uses lookup tables rather than per-sample arithmetic (about 20 us per second of audio). The encode
table follows the audioop / Sun g711 algorithm bit for bit, so output matches what ``audioop.lin2ulaw``
produced before it left the standard library; the G.191 reference and the common "bias 0x84" variant
differ by one step on some negative inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

TELEPHONE_RATE = 8000

Int16Array = npt.NDArray[np.int16]

# Upper bounds of the eight mu-law segments for biased 14-bit magnitudes.
_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_CLIP = 8159
_BIAS14 = 33  # 0x84 >> 2: the 16-bit bias scaled to the 14-bit domain audioop works in


def _build_encode_table() -> npt.NDArray[np.uint8]:
    # Index i is the uint16 bit pattern of an int16 sample, so the table is addressed via pcm.view(uint16).
    pcm = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int32)
    # audioop shifts before taking the sign, so -1 becomes -1 (not 0) in 14 bits: it must stay negative.
    val = pcm >> 2
    mask = np.where(val < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(val), _CLIP) + _BIAS14
    seg = np.searchsorted(_SEG_END, mag, side="left")
    mantissa = (mag >> np.minimum(seg + 1, 8)) & 0x0F
    code = np.where(seg >= 8, 0x7F, (seg << 4) | mantissa)
    return ((code ^ mask) & 0xFF).astype(np.uint8)


def _build_decode_table() -> Int16Array:
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


ULAW_ENCODE_TABLE = _build_encode_table()
ULAW_DECODE_TABLE = _build_decode_table()
ULAW_SILENCE = 0xFF


def ulaw_encode(pcm: Int16Array) -> bytes:
    """Encode int16 samples (any shape, taken in C order) as one mu-law byte each."""
    samples = np.ascontiguousarray(pcm, dtype=np.int16)
    return ULAW_ENCODE_TABLE[samples.view(np.uint16)].tobytes()


def ulaw_decode(data: bytes) -> Int16Array:
    """Decode mu-law bytes to int16 samples."""
    return ULAW_DECODE_TABLE[np.frombuffer(data, dtype=np.uint8)]


class StreamResampler:
    """Stateful mono int16 resampler to 8 kHz for audio that arrives in chunks.

    soxr holds back filter history between chunks, so output comes in bursts and the tail only appears
    with ``last=True``. After the last chunk the stream is cleared, ready for the next utterance.
    """

    def __init__(self, in_rate: int, out_rate: int = TELEPHONE_RATE) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream: Any = None
        if in_rate != out_rate:
            self._stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality="HQ")

    def process(self, chunk: Int16Array, last: bool = False) -> Int16Array:
        samples = np.ascontiguousarray(chunk, dtype=np.int16).reshape(-1)
        if self._stream is None:
            return samples.copy()
        out: Int16Array = np.asarray(self._stream.resample_chunk(samples, last=last), dtype=np.int16)
        if last:
            self._stream.clear()
        return out

    def reset(self) -> None:
        """Drop buffered input, e.g. after a cancelled utterance, without emitting its tail."""
        if self._stream is not None:
            self._stream.clear()


def pcm16_to_ulaw8k(pcm: Int16Array, in_rate: int) -> bytes:
    """One-shot conversion of a whole mono buffer (fakes, tests, prerecorded prompts)."""
    return ulaw_encode(StreamResampler(in_rate).process(pcm, last=True))
