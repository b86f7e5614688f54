"""Sans-IO removal of caller audio from the bytes Asterisk sends a chan_websocket client.

A leg in a mixing bridge receives 50 caller frames a second, each one WebSocket binary message, and
the daemon only counts them (it never plays or records caller audio). Through wsproto and
trio-websocket each cost ~110 us: a frame object, an event, a channel hand-off and a task switch.
``CallerAudioFilter`` walks the frame headers of what the socket delivered, drops every complete,
unfragmented, unmasked binary frame (counting it) and hands everything else (text, control frames,
fragmented messages, anything malformed) on byte for byte, so wsproto still sees a valid stream
for all that matters: close, ping, MEDIA_XOFF, marks. Dropping whole frames keeps wsproto's
framing intact; whatever the filter does not understand it passes on for wsproto to judge.

The HTTP upgrade response is passed on untouched; framing starts after its blank line, and only
if it was a ``101``: after a refusal everything goes to trio-websocket, which reports it.
"""

from __future__ import annotations

import attrs

_HEAD_END = b"\r\n\r\n"
_OPCODE_CONTINUATION = 0x0
_OPCODE_TEXT = 0x1
_OPCODE_BINARY = 0x2
_FIN = 0x80
_RSV = 0x70
_MASK = 0x80

# Frames larger than this go to wsproto, which enforces trio-websocket's message size limit (a caller
# frame is 160 to 640 bytes, whatever the codec).
MAX_DROPPED_PAYLOAD = 65535
MAX_HEAD_BYTES = 16384


@attrs.define
class CallerAudioFilter:
    """Feed it what the socket delivered; it returns what trio-websocket should see."""

    frames: int = 0  # caller audio frames dropped, in all
    payload_bytes: int = 0
    # head -> frames (after a 101) or passthrough (after anything else)
    _state: str = attrs.field(default="head", init=False)
    # An incomplete response head, or an incomplete frame header.
    _pending: bytes = attrs.field(default=b"", init=False)
    _skip: int = attrs.field(default=0, init=False)  # bytes of a dropped frame's payload to come
    _pass_on: int = attrs.field(default=0, init=False)  # bytes of a passed-on frame's payload to come
    # Inside a fragmented data message: its parts all go to wsproto.
    _fragmented: bool = attrs.field(default=False, init=False)

    def feed(self, data: bytes) -> bytes:
        if self._state == "frames":
            return self._frames(data)
        if self._state == "passthrough":
            return data
        head = self._pending + data
        end = head.find(_HEAD_END)
        if end < 0:
            # The head so far is kept (it is small) to read its status line; a head that never ends
            # is trio-websocket's to refuse.
            self._pending = head
            if len(head) > MAX_HEAD_BYTES:
                self._state, self._pending = "passthrough", b""
            return data
        self._pending = b""
        end += len(_HEAD_END)
        upgraded = head.startswith((b"HTTP/1.1 101 ", b"HTTP/1.1 101\r"))
        self._state = "frames" if upgraded else "passthrough"
        already = len(head) - len(data)  # the part of the head handed on with earlier chunks
        passed = head[already:end]
        rest = head[end:]
        return passed + (self._frames(rest) if upgraded else rest)

    def finish(self) -> bytes:
        """At end of stream: whatever was held back (an incomplete header), for wsproto to judge."""
        held, self._pending = self._pending, b""
        return held if self._state == "frames" else b""

    def _frames(self, data: bytes) -> bytes:
        buf = self._pending + data if self._pending else data
        self._pending = b""
        out: list[bytes] = []
        at = 0
        end = len(buf)
        while at < end:
            if self._skip:
                step = min(self._skip, end - at)
                self._skip -= step
                at += step
                continue
            if self._pass_on:
                step = min(self._pass_on, end - at)
                out.append(buf[at : at + step])
                self._pass_on -= step
                at += step
                continue
            if end - at < 2:
                self._pending = buf[at:]
                break
            first, second = buf[at], buf[at + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                header = 4
            elif length == 127:
                header = 10
            if second & _MASK:
                header += 4
            if end - at < header:
                self._pending = buf[at:]
                break
            if length == 126:
                length = int.from_bytes(buf[at + 2 : at + 4], "big")
            elif length == 127:
                length = int.from_bytes(buf[at + 2 : at + 10], "big")
            opcode = first & 0x0F
            if (
                opcode == _OPCODE_BINARY
                and first & _FIN
                and not first & _RSV
                and not second & _MASK
                and not self._fragmented
                and length <= MAX_DROPPED_PAYLOAD
            ):
                self.frames += 1
                self.payload_bytes += length
                at += header
                self._skip = length
                continue
            if opcode in (_OPCODE_TEXT, _OPCODE_BINARY):
                self._fragmented = not first & _FIN
            elif opcode == _OPCODE_CONTINUATION and first & _FIN:
                self._fragmented = False
            out.append(buf[at : at + header])
            at += header
            self._pass_on = length
        return b"".join(out)
