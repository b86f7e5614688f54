"""Client for call-manager's external-media RPC (``bin-manager.call-manager.request``)."""

from __future__ import annotations

import logging
import uuid
from typing import Protocol

import trio

from tts_streamer.adapters.amqp.bridge import AmqpBridge, AmqpUnavailable
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.envelope import Response, VoipbinError
from tts_streamer.adapters.voipbin.models import ExternalMedia, ExternalMediaCreate
from tts_streamer.adapters.voipbin.wire import WireError

log = logging.getLogger(__name__)

CALL_MANAGER_QUEUE = "bin-manager.call-manager.request"


class CallManagerError(Exception):
    """call-manager refused or failed; ``response`` is what to relay to our own caller."""

    def __init__(self, message: str, response: Response, *, unanswered: bool = False) -> None:
        super().__init__(message)
        self.response = response
        # No answer came: call-manager may still be doing (and later finish) what was asked.
        self.unanswered = unanswered


class ExternalMedias(Protocol):
    """What the services need of call-manager: external media create and delete (CallManager over the
    broker; an in-memory fake in the tests). Both raise CallManagerError."""

    async def create_external_media(self, request: ExternalMediaCreate) -> ExternalMedia: ...

    async def delete_external_media(self, media_id: uuid.UUID) -> None: ...


class CallManager:
    def __init__(self, bridge: AmqpBridge, timeout: float = 3.0) -> None:
        self._bridge = bridge
        self._timeout = timeout

    async def create_external_media(self, request: ExternalMediaCreate) -> ExternalMedia:
        reply = await self._call(envelope.make_request("/v1/external-medias", "POST", request.to_data()))
        try:
            media = ExternalMedia.from_data(reply.data)
        except WireError as exc:
            raise CallManagerError(
                f"bad external-media reply: {exc.reason}", envelope.plain_error(500)
            ) from None
        if not media.media_uri:
            raise CallManagerError("external-media reply has no media_uri", envelope.plain_error(500))
        return media

    async def delete_external_media(self, media_id: uuid.UUID) -> None:
        await self._call(envelope.make_request(f"/v1/external-medias/{media_id}", "DELETE"))

    async def _call(self, request: envelope.Request) -> Response:
        """One RPC, bounded by the call-manager timeout (callers may bound it further)."""
        try:
            with trio.fail_after(self._timeout):
                raw = await self._bridge.rpc(CALL_MANAGER_QUEUE, envelope.render_request(request))
        except trio.TooSlowError:
            raise CallManagerError(
                f"no reply from call-manager within {self._timeout} s",
                envelope.plain_error(500),
                unanswered=True,
            ) from None
        except AmqpUnavailable as exc:
            # The request may or may not have reached call-manager before the broker went away.
            raise CallManagerError(
                f"call-manager unreachable: {exc}", envelope.plain_error(500), unanswered=True
            ) from None
        try:
            reply = envelope.parse_response(raw)
        except WireError as exc:
            raise CallManagerError(
                f"bad reply from call-manager: {exc.reason}", envelope.plain_error(500)
            ) from None
        if reply.is_error:
            typed = VoipbinError.from_response(reply)
            relayed = reply if typed is not None else envelope.plain_error(500)
            raise CallManagerError(f"call-manager answered {reply.status_code}", relayed)
        return reply


async def stop_external_media_quietly(call_manager: ExternalMedias, media_id: uuid.UUID) -> None:
    """Best effort, shielded, bounded by the call-manager timeout: for cleanup paths whose outcome
    is already decided (a failed create, a hang-up, a DELETE)."""
    with trio.CancelScope(shield=True):
        try:
            await call_manager.delete_external_media(media_id)
        except CallManagerError as exc:
            log.info("streaming=%s external media not stopped: %s", media_id, exc)
