"""WAV files of 8 kHz G.711 mu-law (format tag 7) and 16-bit PCM, written and read without extras."""

from __future__ import annotations

import struct
from pathlib import Path

WAVE_FORMAT_PCM = 1
WAVE_FORMAT_MULAW = 7


def ulaw_wav_bytes(data: bytes, rate: int = 8000) -> bytes:
    # Non-PCM formats carry cbSize in fmt and a fact chunk with the sample count.
    fmt = struct.pack("<HHIIHHH", WAVE_FORMAT_MULAW, 1, rate, rate, 1, 8, 0)
    fact = struct.pack("<I", len(data))
    pad = b"\x00" if len(data) % 2 else b""
    body = (
        b"WAVE"
        + b"fmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"fact"
        + struct.pack("<I", 4)
        + fact
        + b"data"
        + struct.pack("<I", len(data))
        + data
        + pad
    )
    return b"RIFF" + struct.pack("<I", len(body)) + body


def write_ulaw_wav(path: str | Path, data: bytes, rate: int = 8000) -> None:
    Path(path).write_bytes(ulaw_wav_bytes(data, rate))


def pcm16_wav_bytes(samples: bytes, rate: int = 8000) -> bytes:
    fmt = struct.pack("<HHIIHH", WAVE_FORMAT_PCM, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(samples))
    return b"RIFF" + struct.pack("<I", len(body) + len(samples)) + body + samples


def read_wav(path: str | Path) -> tuple[int, int, bytes]:
    """Return (format tag, sample rate, data bytes) of a WAV file; raises ValueError if malformed."""
    raw = Path(path).read_bytes()
    if raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    pos, fmt_tag, rate = 12, None, None
    while pos + 8 <= len(raw):
        chunk_id, size = raw[pos : pos + 4], struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        payload = raw[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt ":
            fmt_tag, _channels, rate = struct.unpack("<HHI", payload[:8])
        elif chunk_id == b"data":
            if fmt_tag is None or rate is None:
                raise ValueError("data chunk before fmt chunk")
            return fmt_tag, rate, payload
        pos += 8 + size + (size % 2)
    raise ValueError("no data chunk")
