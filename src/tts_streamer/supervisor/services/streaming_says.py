"""How each ``/v1/streamings/<id>/say_*`` body becomes one session command (``StreamingService.say``
runs them all the same way: look-up, read, message check, command, reply)."""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from tts_streamer.actors.commands import Command, SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.adapters.voipbin import models
from tts_streamer.adapters.voipbin.wire import NIL_UUID


@attrs.frozen
class Said:
    """A say_* request as the session is to get it: the command, the message it must be for (say_add,
    say_finish), the message it makes current (say_init, and say_stop: none), and whether the reply
    carries the Streaming (Go's replies differ per route)."""

    command: Command
    for_message: uuid.UUID | None = None
    sets_message: uuid.UUID | None = None
    reply_streaming: bool = False


def read_say_init(data: Any) -> Said:
    request = models.SayInit.from_data(data)
    return Said(SayInit(str(request.message_id)), sets_message=request.message_id, reply_streaming=True)


def read_say_add(data: Any) -> Said:
    # No size check here (Go has none on this route): the session's validate_text is the one check.
    request = models.SayAdd.from_data(data)
    return Said(SayAdd(request.text), for_message=request.message_id)


def read_say_stop(data: Any) -> Said:
    return Said(SayFlush(end_message=True), sets_message=NIL_UUID)


def read_say_finish(data: Any) -> Said:
    request = models.SayFinish.from_data(data)
    return Said(SayFinish(), for_message=request.message_id, reply_streaming=True)


def read_say_flush(data: Any) -> Said:
    """Extension: barge-in that keeps the current message (say_add may continue it)."""
    return Said(SayFlush(), reply_streaming=True)
