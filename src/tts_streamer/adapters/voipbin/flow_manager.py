"""Client for flow-manager's variables RPC (``bin-manager.flow-manager.request``), and what the voice
of a streaming takes from the answer.

Go asks ``GET /v1/variables/<activeflow_id>`` (voipbin-wire.md §6.4) and lets the flow variable
``voipbin.tts.<vendor>.voice_id`` choose the voice when the request names none (§4.5). The lookup is
best effort: any failure means "no flow voice" and the streaming speaks with its own fields.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping
from typing import Protocol

import attrs
import trio

from tts_streamer.adapters.fallback import FallbackEngine
from tts_streamer.adapters.voice import VoiceEngine
from tts_streamer.adapters.voices import VENDORS, voice_from_variables
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.models import FlowVariables
from tts_streamer.adapters.voipbin.wire import NIL_UUID, WireError

log = logging.getLogger(__name__)

FLOW_MANAGER_QUEUE = "bin-manager.flow-manager.request"


class Rpc(Protocol):
    """What the client needs of the broker: one request, one reply (``AmqpBridge.rpc``)."""

    async def rpc(self, routing_key: str, body: bytes) -> bytes: ...


class FlowManagerError(Exception):
    """No usable answer from flow-manager: unreachable, too slow, an error status or a bad body."""


def variables_request(activeflow_id: uuid.UUID) -> envelope.Request:
    """Go's request: ``{"uri":"/v1/variables/<id>","method":"GET","publisher":"tts-manager",
    "data_type":""}``."""
    return envelope.make_request(f"/v1/variables/{activeflow_id}", "GET")


class FlowManager:
    def __init__(self, bridge: Rpc, timeout: float = 1.0) -> None:
        self._bridge = bridge
        self.timeout = timeout

    async def variables(self, activeflow_id: uuid.UUID) -> dict[str, str]:
        """The activeflow's variables; raises FlowManagerError, within ``timeout`` seconds."""
        body = envelope.render_request(variables_request(activeflow_id))
        try:
            with trio.fail_after(self.timeout):
                raw = await self._bridge.rpc(FLOW_MANAGER_QUEUE, body)
        except trio.TooSlowError:
            raise FlowManagerError(f"no reply from flow-manager within {self.timeout} s") from None
        except Exception as exc:  # the broker went away (AmqpUnavailable) or refused the publish
            raise FlowManagerError(f"flow-manager unreachable: {type(exc).__name__}: {exc}") from None
        try:
            reply = envelope.parse_response(raw)
        except WireError as exc:
            raise FlowManagerError(f"bad reply from flow-manager: {exc.reason}") from None
        if reply.is_error:
            raise FlowManagerError(f"flow-manager answered {reply.status_code}")
        try:
            return dict(FlowVariables.from_data(reply.data).variables)
        except WireError as exc:
            raise FlowManagerError(f"bad variables from flow-manager: {exc.reason}") from None


def flow_vendor(engine: VoiceEngine) -> str | None:
    """The vendor whose flow variable applies to ``engine``: a fallback chain's first voice (an
    explicit voice id goes to it only), None for a voice no flow variable names (espeak)."""
    if isinstance(engine, FallbackEngine):
        engine = engine.chain[0]
    return engine.name if engine.name in VENDORS else None


def needs_lookup(activeflow_id: uuid.UUID, voice_id: str, vendor: str | None) -> bool:
    """Go asks only with an activeflow; we also skip it when nothing could come of it."""
    return activeflow_id != NIL_UUID and not voice_id and vendor is not None


def flow_voice_id(vendor: str, variables: Mapping[str, str]) -> str:
    """The voice id the flow asks ``vendor`` to speak with, or "" (then the language/gender table)."""
    return voice_from_variables(vendor, variables) or ""


@attrs.define
class FlowVoice:
    """The voice id a streaming's flow asks for ("" for none), looked up in the background."""

    voice_id: str = ""
    done: trio.Event = attrs.field(factory=trio.Event)

    async def get(self) -> str:
        await self.done.wait()  # bounded by the client's timeout
        return self.voice_id


def look_up_flow_voice(
    nursery: trio.Nursery,
    client: FlowManager | None,
    streaming_id: uuid.UUID,
    activeflow_id: uuid.UUID,
    voice_id: str,
    engine: VoiceEngine | None,
) -> FlowVoice:
    """Start asking flow-manager for the voice ``engine`` should use, unless nothing could come of it;
    ``get()`` the answer when the voice is needed (a failure, logged, is "")."""
    flow_voice = FlowVoice()
    vendor = flow_vendor(engine) if engine is not None else None
    if client is None or vendor is None or not needs_lookup(activeflow_id, voice_id, vendor):
        flow_voice.done.set()
    else:
        nursery.start_soon(_look_up, client, flow_voice, streaming_id, activeflow_id, vendor)
    return flow_voice


async def _look_up(
    client: FlowManager, flow_voice: FlowVoice, streaming_id: uuid.UUID, activeflow_id: uuid.UUID, vendor: str
) -> None:
    try:
        variables = await client.variables(activeflow_id)
    except FlowManagerError as exc:
        log.warning(
            "streaming=%s no flow variables for activeflow %s, speaking with the request's voice: %s",
            streaming_id,
            activeflow_id,
            exc,
        )
    else:
        flow_voice.voice_id = flow_voice_id(vendor, variables)
        if flow_voice.voice_id:
            log.info(
                "streaming=%s %s voice %s from the flow's variables",
                streaming_id,
                vendor,
                flow_voice.voice_id,
            )
    finally:
        flow_voice.done.set()
