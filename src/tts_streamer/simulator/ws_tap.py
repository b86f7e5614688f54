"""A pass-through stream that watches a client's WebSocket frame headers.

trio-websocket reassembles fragments and swallows PONGs, yet both matter against Asterisk: it loses
middle fragments and an unsolicited PONG crashes it. The simulator wraps each server-side stream in
a WireTap to record them as client faults.
"""

from __future__ import annotations

import trio

from tts_streamer.simulator.asterisk_call import ClientFault

_CONTINUATION, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class WireTap(trio.abc.Stream):
    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        # Shared with the SimCall once the request is matched to one.
        self.faults: list[ClientFault] = []
        self.pings = 0
        self._buffer = bytearray()
        self._in_http = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        if data:
            self._feed(data)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()

    def _fault(self, kind: str) -> None:
        self.faults.append(ClientFault(trio.current_time(), kind))

    def _feed(self, data: bytes | bytearray) -> None:
        buf = self._buffer
        buf += data
        if self._in_http:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            del buf[: end + 4]
            self._in_http = False
        while len(buf) >= 2:
            fin, opcode = buf[0] & 0x80, buf[0] & 0x0F
            length, pos = buf[1] & 0x7F, 2
            if length == 126:
                pos = 4
            elif length == 127:
                pos = 10
            if len(buf) < pos:
                return
            if pos > 2:
                length = int.from_bytes(buf[2:pos], "big")
            pos += 4 if buf[1] & 0x80 else 0
            if len(buf) < pos + length:
                return
            del buf[: pos + length]
            self._classify(bool(fin), opcode)

    def _classify(self, fin: bool, opcode: int) -> None:
        if opcode in (_TEXT, _BINARY) and not fin:
            self._fault("fragmented_message")
        elif opcode == _PONG:
            # Neither Asterisk nor the simulator pings an INCOMING socket, so every PONG is unsolicited.
            self._fault("unsolicited_pong")
        elif opcode == _PING:
            self.pings += 1
        elif opcode not in (_CONTINUATION, _TEXT, _BINARY, _CLOSE):
            self._fault("unsupported_opcode")
