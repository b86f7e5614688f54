"""The caller-audio filter: what it drops is exactly the caller frames; wsproto sees the rest unchanged."""

from __future__ import annotations

import struct

import hypothesis.strategies as st
from hypothesis import given, settings
from wsproto.frame_protocol import FrameProtocol, Opcode

from tts_streamer.adapters.chan_websocket.caller_audio import MAX_DROPPED_PAYLOAD, CallerAudioFilter

UPGRADE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: x\r\nSec-WebSocket-Protocol: media\r\n\r\n"
)


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None, rsv: int = 0) -> bytes:
    """One server frame as RFC 6455 lays it out (masked only to build a malformed one)."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((first, mask_bit | n))
    elif n < 65536:
        head = bytes((first, mask_bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, mask_bit | 127)) + struct.pack("!Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def frames_seen(data: bytes) -> list[tuple[Opcode, object, bool]]:
    """What a wsproto client makes of these bytes: (opcode, payload, message finished) per frame."""
    proto = FrameProtocol(client=True, extensions=[])
    proto.receive_bytes(data)
    return [
        (
            f.opcode,
            bytes(f.payload) if isinstance(f.payload, bytes | bytearray) else f.payload,
            f.message_finished,
        )
        for f in proto.received_frames()
    ]


def feed_in_chunks(audio: CallerAudioFilter, data: bytes, cuts: list[int]) -> bytes:
    out = []
    at = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        out.append(audio.feed(data[at:cut]))
        at = cut
    out.append(audio.feed(data[at:]))
    out.append(audio.finish())
    return b"".join(out)


CALLER_FRAME = frame(0x2, b"\xff" * 160)

server_frame = st.one_of(
    st.binary(max_size=300).map(lambda p: ("audio", frame(0x2, p))),
    st.sampled_from([b"MEDIA_XOFF", b"MEDIA_XON", b"MEDIA_MARK_PROCESSED m1"]).map(
        lambda t: ("keep", frame(0x1, t))
    ),
    st.binary(max_size=20).map(lambda p: ("keep", frame(0x9, p))),  # ping
    st.binary(max_size=20).map(lambda p: ("keep", frame(0xA, p))),  # pong
    # A fragmented binary message with a ping between its parts: every part goes to wsproto.
    st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=40)).map(
        lambda parts: ("keep", frame(0x2, parts[0], fin=False) + frame(0x9, b"") + frame(0x0, parts[1]))
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(server_frame, max_size=25), st.lists(st.integers(min_value=0, max_value=20000), max_size=12))
def test_wsproto_sees_everything_but_the_caller_frames_however_the_bytes_are_cut(
    frames: list[tuple[str, bytes]], cuts: list[int]
) -> None:
    stream = b"".join(data for _, data in frames)
    kept = b"".join(data for kind, data in frames if kind == "keep")
    audio = CallerAudioFilter()
    passed = feed_in_chunks(audio, UPGRADE + stream, cuts)
    assert passed.startswith(UPGRADE)
    assert frames_seen(passed[len(UPGRADE) :]) == frames_seen(kept)
    assert audio.frames == sum(1 for kind, _ in frames if kind == "audio")


def test_the_upgrade_response_passes_whole_however_it_is_cut() -> None:
    data = UPGRADE + CALLER_FRAME * 3 + frame(0x1, b"MEDIA_XOFF")
    for cut in range(1, len(UPGRADE) + 5):
        audio = CallerAudioFilter()
        passed = audio.feed(data[:cut]) + audio.feed(data[cut:])
        assert passed == UPGRADE + frame(0x1, b"MEDIA_XOFF"), cut
        assert audio.frames == 3


def test_after_a_refused_upgrade_nothing_is_touched() -> None:
    """trio-websocket must see the whole refusal (its body may look like frames) to report it."""
    refusal = b"HTTP/1.1 404 Not Found\r\nContent-Length: 164\r\n\r\n" + CALLER_FRAME
    audio = CallerAudioFilter()
    assert audio.feed(refusal[:30]) + audio.feed(refusal[30:]) == refusal
    assert audio.frames == 0


def test_what_wsproto_must_judge_is_passed_on() -> None:
    """Masked, reserved-bit and oversized binary frames are protocol errors or limits for wsproto to apply."""
    masked = frame(0x2, b"abc", mask=b"\x01\x02\x03\x04")
    reserved = frame(0x2, b"abc", rsv=0x40)
    oversized = frame(0x2, b"\0" * (MAX_DROPPED_PAYLOAD + 1))
    for bad in (masked, reserved, oversized):
        audio = CallerAudioFilter()
        assert audio.feed(UPGRADE + CALLER_FRAME + bad) == UPGRADE + bad
        assert audio.frames == 1


def test_an_incomplete_header_at_the_end_of_the_stream_goes_to_wsproto() -> None:
    audio = CallerAudioFilter()
    assert audio.feed(UPGRADE + CALLER_FRAME + b"\x82") == UPGRADE
    assert audio.finish() == b"\x82"


def test_a_caller_frame_split_anywhere_is_dropped_whole() -> None:
    close = frame(0x8, struct.pack("!H", 1000))
    data = CALLER_FRAME + close
    for cut in range(1, len(data)):
        audio = CallerAudioFilter()
        audio.feed(UPGRADE)
        assert audio.feed(data[:cut]) + audio.feed(data[cut:]) == close, cut
        assert audio.frames == 1 and audio.payload_bytes == 160


def test_a_binary_frame_inside_a_fragmented_message_is_left_for_wsproto_to_refuse() -> None:
    """RFC 6455 §5.4: no new data frame may start inside a fragmented message; dropping it would hide that."""
    broken = frame(0x1, b"MEDIA_", fin=False) + CALLER_FRAME + frame(0x0, b"XOFF")
    audio = CallerAudioFilter()
    assert audio.feed(UPGRADE + broken) == UPGRADE + broken
    assert audio.frames == 0
