"""Commands a session accepts, their validation, and the one-shot reply they are answered through."""

from __future__ import annotations

import attrs
import trio


class CommandError(Exception):
    """A command was refused; ``kind`` is a stable label for error replies and metrics."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@attrs.frozen
class SayInit:
    message_id: str | None = None


@attrs.frozen
class SayAdd:
    text: str | bytes


@attrs.frozen
class SayFlush:
    """Barge-in. ``end_message``: also end the message (voipbin's say_stop), reporting it finished."""

    end_message: bool = False


@attrs.frozen
class SayFinish:
    pass


Command = SayInit | SayAdd | SayFlush | SayFinish


def validate_text(raw: str | bytes, max_bytes: int) -> str:
    """Text as the vendor will get it, or CommandError with a reason a caller can act on."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError("bad_text", f"text is not valid UTF-8 (byte {exc.start})") from None
    elif isinstance(raw, str):
        text = raw
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise CommandError("bad_text", "text contains unpaired surrogates") from None
    else:
        raise CommandError("bad_text", f"text must be a string, not {type(raw).__name__}")
    if not text.strip():
        raise CommandError("empty_text", "text is empty")
    if "\x00" in text:
        raise CommandError("bad_text", "text contains a NUL character")
    size = len(text.encode("utf-8"))
    if size > max_bytes:
        raise CommandError("text_too_long", f"text is {size} bytes, the limit is {max_bytes}")
    return text


@attrs.define
class Reply:
    """A one-shot result slot: the session fills it, the caller waits on it."""

    _event: trio.Event = attrs.field(factory=trio.Event)
    _result: object = None
    _error: CommandError | None = None

    def succeed(self, result: object) -> None:
        if not self._event.is_set():
            self._result = result
            self._event.set()

    def fail(self, error: CommandError) -> None:
        if not self._event.is_set():
            self._error = error
            self._event.set()

    @property
    def done(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> object:
        await self._event.wait()
        if self._error is not None:
            raise self._error
        return self._result
