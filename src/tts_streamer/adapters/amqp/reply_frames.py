"""The bytes of a reply's publish (and of acks) without pamqp's general marshalling.

A reply's three frames (``basic.publish``, its content header, its body) were a fifth of the outbox's
time through ``ChannelFrame.marshall``: pamqp builds a ``Properties`` object, a method object and a
header object per reply, then walks every property slot to encode the few set. Replies always have
the same shape (``outbox.reply_properties`` plus a message id), so this writes those bytes directly:
exactly what ``ChannelFrame.marshall`` writes for the same frames (tests/test_amqp_direct.py compares
them on many inputs). A correlation id or routing key over 255 bytes (a short string's limit) is left
to pamqp (``None`` here), which refuses it as before.
"""

from __future__ import annotations

import random
import struct

_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
_BASIC = 60
_PUBLISH, _ACK = 40, 80

# Property flags (AMQP 0-9-1 basic class): those a reply sets.
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE, _PRIORITY = 0x8000, 0x2000, 0x1000, 0x0800
_CORRELATION_ID, _MESSAGE_ID = 0x0400, 0x0080
# content_type "text/plain", headers {} (an empty table), delivery_mode 1 (transient), priority 0.
_FIXED = b"\x0atext/plain" + b"\x00\x00\x00\x00" + b"\x01" + b"\x00"

_frame_head = struct.Struct(">BHI").pack
_ack = struct.Struct(">HHQB").pack
_publish_head = struct.Struct(">HHHB").pack  # class, method, ticket 0, exchange "" (its length 0)
_header_head = struct.Struct(">HHQH").pack  # class, weight 0, body size, flags


def message_id() -> str:
    """``uuid.UUID(int=random.getrandbits(128), version=4).hex`` (what aiormq sets), cheaper."""
    value = random.getrandbits(128)
    value = (value & ~(0xC000 << 48)) | (0x8000 << 48)  # variant RFC 4122
    value = (value & ~(0xF000 << 64)) | (4 << 76)  # version 4
    return f"{value:032x}"


def _short(value: str) -> bytes | None:
    raw = value.encode()
    return None if len(raw) > 255 else bytes((len(raw),)) + raw


def ack_frames(channel: int, tags: list[int]) -> bytes:
    """``basic.ack`` (not multiple) for each tag, as ``ChannelFrame.marshall`` writes them."""
    head = _frame_head(_METHOD, channel, 13)
    return b"".join(head + _ack(_BASIC, _ACK, tag, 0) + _FRAME_END for tag in tags)


def reply_frames(
    channel: int, routing_key: str, body: bytes, correlation_id: str | None, msg_id: str, max_content: int
) -> bytes | None:
    """The publish (default exchange, mandatory), header and body frames of one reply; None when a
    field is over a short string's 255 bytes (pamqp's marshalling decides then)."""
    key = _short(routing_key)
    mid = _short(msg_id)
    if key is None or mid is None:
        return None
    flags = _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE | _PRIORITY | _MESSAGE_ID
    properties = _FIXED
    if correlation_id:  # pamqp leaves out None and ""
        cid = _short(correlation_id)
        if cid is None:
            return None
        flags |= _CORRELATION_ID
        properties += cid
    properties += mid
    method = _publish_head(_BASIC, _PUBLISH, 0, 0) + key + b"\x01"  # mandatory, not immediate
    header = _header_head(_BASIC, 0, len(body), flags) + properties
    parts = [
        _frame_head(_METHOD, channel, len(method)),
        method,
        _FRAME_END,
        _frame_head(_HEADER, channel, len(header)),
        header,
        _FRAME_END,
    ]
    # As aiormq's _split_body: no body frame for an empty body, else chunks of at most max_content.
    for start in range(0, len(body), max_content):
        chunk = body[start : start + max_content]
        parts += [_frame_head(_BODY, channel, len(chunk)), chunk, _FRAME_END]
    return b"".join(parts)
