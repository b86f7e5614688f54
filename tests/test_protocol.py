"""The sans-IO chan_websocket control protocol: both forms, unknown keys kept, garbage refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_streamer.adapters.chan_websocket import protocol as p


def test_plain_media_start_keeps_unknown_keys() -> None:
    start = p.parse_event(
        "MEDIA_START connection_id:abc channel:WebSocket/abc/0x1 channel_id:1700.1 format:ulaw "
        "optimal_frame_size:160 ptime:20 passthrough:false unbuffered:true"
    )
    assert isinstance(start, p.MediaStart)
    assert (start.connection_id, start.format, start.optimal_frame_size, start.ptime) == (
        "abc",
        "ulaw",
        160,
        20,
    )
    assert start.channel_id == "1700.1" and start.control_format is p.ControlFormat.TEXT
    assert start.extra == {"passthrough": "false", "unbuffered": "true"}


def test_json_media_start_and_events() -> None:
    start = p.parse_event(
        '{"event":"MEDIA_START","connection_id":"abc","channel":"c","format":"ulaw",'
        '"optimal_frame_size":160,"ptime":20,"channel_variables":{"A":"1"}}'
    )
    assert isinstance(start, p.MediaStart) and start.control_format is p.ControlFormat.JSON
    assert start.channel_id is None and start.extra == {"channel_variables": {"A": "1"}}
    mark = p.parse_event('{"event":"MEDIA_MARK_PROCESSED","correlation_id":"u3","channel_id":"x"}')
    assert mark == p.ControlEvent("MEDIA_MARK_PROCESSED", "u3", {"correlation_id": "u3", "channel_id": "x"})


def test_plain_events_by_kind() -> None:
    assert p.parse_event("MEDIA_XOFF") == p.ControlEvent("MEDIA_XOFF")
    assert p.parse_event("MEDIA_MARK_PROCESSED u7") == p.ControlEvent("MEDIA_MARK_PROCESSED", "u7")
    error = p.parse_event("ERROR channel_id:1.2 error_text:Unable to parse JSON command\n")
    assert isinstance(error, p.ControlEvent) and error.argument == "Unable to parse JSON command"
    status = p.parse_event("STATUS channel_id:1 queue_length:3 xon_level:800 queue_full:false")
    assert isinstance(status, p.ControlEvent) and status.fields["queue_length"] == "3"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "{",
        '{"a":' + "[" * 100_000 + "]" * 100_000 + "}",  # deep nesting: RecursionError inside json
        '{"no_event":1}',
        "MEDIA_START channel:x",
        "MEDIA_START connection_id:a ptime:x",
    ],
)
def test_garbage_is_a_protocol_error(text: str) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_event(text)


def test_commands_render_in_the_call_form_and_respect_the_size_limit() -> None:
    assert p.render_command(p.FLUSH_MEDIA, p.ControlFormat.TEXT) == "FLUSH_MEDIA"
    assert p.render_command(p.mark_media("u1"), p.ControlFormat.TEXT) == "MARK_MEDIA u1"
    assert (
        p.render_command(p.mark_media("u1"), p.ControlFormat.JSON)
        == '{"command":"MARK_MEDIA","correlation_id":"u1"}'
    )
    with pytest.raises(ValueError, match="128 bytes"):
        p.render_command(p.mark_media("x" * 130), p.ControlFormat.TEXT)
    for form in p.ControlFormat:
        rendered = p.render_command(p.mark_media("m9"), form)
        assert p.parse_command(rendered, form) == p.mark_media("m9")


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.text(max_size=200), st.from_regex(r"(MEDIA_START|ERROR|STATUS|\{)[ -~]{0,80}", fullmatch=True)
    )
)
def test_parse_event_raises_only_protocol_error(text: str) -> None:
    try:
        p.parse_event(text)
    except p.ProtocolError:
        pass
