"""Sans-IO client framing of binary WebSocket messages (RFC 6455 §5.2), for audio only.

trio-websocket frames each message through wsproto (an event object, a frame object, a masker per
frame): about a third of the per-message cost of pacing. Audio needs one thing only, a complete
(FIN) masked binary frame, so this builds it directly: a 2- or 4-byte header (payloads are at most
``MAX_MESSAGE_PAYLOAD`` < 65536, never the 8-byte length), a fresh 4-byte masking key and the payload
XORed with it as one big integer (one C-level operation, not a Python loop per byte).

Masking keys must be unpredictable (RFC 6455 §5.3): they come from ``os.urandom``, drawn 4 KiB at a
time so a key costs a slice, not a system call.
"""

from __future__ import annotations

import os

OPCODE_BINARY = 0x2
_FIN = 0x80
_MASK_BIT = 0x80
_KEYS_PER_DRAW = 1024


class MaskingKeys:
    """Unpredictable 4-byte masking keys, drawn from the OS's CSPRNG in batches."""

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def next(self) -> bytes:
        if self._at >= len(self._pool):
            self._pool = os.urandom(4 * _KEYS_PER_DRAW)
            self._at = 0
        key = self._pool[self._at : self._at + 4]
        self._at += 4
        return key


def mask(payload: bytes, key: bytes) -> bytes:
    """``payload`` XOR the repeated 4-byte ``key`` (masking and unmasking are the same operation)."""
    n = len(payload)
    if not n:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(n, "little")


def binary_frame(payload: bytes, key: bytes) -> bytes:
    """One complete masked binary frame, as a client must send it."""
    n = len(payload)
    if n < 126:
        header = bytes((_FIN | OPCODE_BINARY, _MASK_BIT | n))
    elif n < 65536:
        header = bytes((_FIN | OPCODE_BINARY, _MASK_BIT | 126, n >> 8, n & 0xFF))
    else:
        raise ValueError(f"a {n}-byte audio frame needs the 8-byte length, which Asterisk refuses")
    return header + key + mask(payload, key)
