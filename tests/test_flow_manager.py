"""The per-flow voice (issue 15 §5): flow-manager's variables pick a streaming's voice, as in Go.

Unit tests of the client and the mapping in virtual time, then the daemon against a fake flow-manager
on the real broker.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio

from tests.amqp_support import Rig, open_rig
from tests.amqp_vhost import private_amqp_url
from tests.fakes.flow_manager import FakeFlowManager, open_fake_flow_manager
from tests.services import require_rabbitmq
from tts_streamer.adapters.fallback import FallbackEngine
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voice import VoiceSpec
from tts_streamer.adapters.voipbin import envelope
from tts_streamer.adapters.voipbin.flow_manager import (
    FLOW_MANAGER_QUEUE,
    FlowManager,
    FlowManagerError,
    flow_vendor,
    flow_voice_id,
    look_up_flow_voice,
    needs_lookup,
    variables_request,
)
from tts_streamer.adapters.voipbin.wire import NIL_UUID
from tts_streamer.supervisor.config import DaemonConfig

FLOW = uuid.UUID("a620206c-87c4-11f0-a781-8f2bff99c0ea")
SID = uuid.UUID("b6dcbc72-5af5-11f0-b0a7-fbe8aae41529")
GCP_VOICE = "ja-JP-Chirp3-HD-Kore"
__all__ = ["private_amqp_url"]  # imported so this module's rigs run in a private vhost
ELEVENLABS_VOICE = "21m00Tcm4TlvDq8ikWAM"  # 20 characters, as ElevenLabs voice ids are


# -------------------------------------------------------------------------------- the mapping


def test_the_request_has_gos_shape() -> None:
    body = json.loads(envelope.render_request(variables_request(FLOW)))
    assert body == {
        "uri": f"/v1/variables/{FLOW}",
        "method": "GET",
        "publisher": "tts-manager",
        "data_type": "",
    }
    assert FLOW_MANAGER_QUEUE == "bin-manager.flow-manager.request"


def test_the_flow_variable_of_the_speaking_vendor_picks_the_voice() -> None:
    variables = {
        "voipbin.tts.gcp.voice_id": GCP_VOICE,
        "voipbin.tts.aws.voice_id": " Mizuki ",
        "voipbin.tts.elevenlabs.voice_id": ELEVENLABS_VOICE,
        "voipbin.other": "x",
    }
    assert flow_voice_id("gcp", variables) == GCP_VOICE
    assert flow_voice_id("aws", variables) == "Mizuki"
    assert flow_voice_id("elevenlabs", variables) == ELEVENLABS_VOICE
    # Not an ElevenLabs voice id (Go checks the length too), absent, or empty: no flow voice.
    assert flow_voice_id("elevenlabs", {"voipbin.tts.elevenlabs.voice_id": "Rachel"}) == ""
    assert flow_voice_id("gcp", {}) == ""
    assert flow_voice_id("gcp", {"voipbin.tts.gcp.voice_id": "  "}) == ""


def test_which_vendor_a_flow_variable_is_read_for() -> None:
    assert flow_vendor(SyntheticEngine(name="gcp")) == "gcp"
    assert flow_vendor(SyntheticEngine(name="elevenlabs")) == "elevenlabs"
    assert flow_vendor(SyntheticEngine(name="espeak")) is None  # no flow variable names espeak
    chain = FallbackEngine([SyntheticEngine(name="aws"), SyntheticEngine(name="gcp")])
    assert flow_vendor(chain) == "aws"  # an explicit voice goes to the chain's first voice only


def test_when_flow_manager_is_asked() -> None:
    assert needs_lookup(FLOW, "", "gcp")
    assert not needs_lookup(NIL_UUID, "", "gcp")  # no activeflow (speakings never have one)
    assert not needs_lookup(FLOW, "en-US-Chirp3-HD-Aoede", "gcp")  # the request's voice wins anyway
    assert not needs_lookup(FLOW, "", None)


def test_the_timeout_is_a_setting() -> None:
    assert DaemonConfig().flow_manager_timeout == 1.0
    assert DaemonConfig.from_env({"FLOW_MANAGER_TIMEOUT": "0.25"}).flow_manager_timeout == 0.25
    # It runs alongside call-manager's create, so it fits the create's budget with room to dial.
    assert DaemonConfig().flow_manager_timeout < DaemonConfig().create_timeout


# ----------------------------------------------------------------------------- the client


@attrs.define
class FakeRpc:
    reply: bytes | None = None  # None: never answers
    error: Exception | None = None
    sent: list[tuple[str, bytes]] = attrs.field(factory=list)

    async def rpc(self, routing_key: str, body: bytes) -> bytes:
        self.sent.append((routing_key, body))
        if self.error is not None:
            raise self.error
        if self.reply is None:
            await trio.sleep_forever()
        assert self.reply is not None
        return self.reply


def reply(response: envelope.Response) -> bytes:
    return envelope.render_response(response)


async def test_the_client_returns_the_variables(autojump_clock: trio.abc.Clock) -> None:
    rpc = FakeRpc(reply(envelope.ok({"id": str(FLOW), "variables": {"voipbin.tts.gcp.voice_id": GCP_VOICE}})))
    assert await FlowManager(rpc).variables(FLOW) == {"voipbin.tts.gcp.voice_id": GCP_VOICE}
    [(queue, body)] = rpc.sent
    assert queue == FLOW_MANAGER_QUEUE and json.loads(body)["uri"] == f"/v1/variables/{FLOW}"


@pytest.mark.parametrize(
    ("rpc", "message"),
    [
        (FakeRpc(), "no reply from flow-manager within 0.5 s"),
        (FakeRpc(error=ConnectionError("broker gone")), "flow-manager unreachable: ConnectionError"),
        (FakeRpc(reply(envelope.plain_error(404))), "flow-manager answered 404"),
        (FakeRpc(b"not json"), "bad reply from flow-manager"),
        (FakeRpc(reply(envelope.ok({"variables": {"k": 1}}))), "bad variables from flow-manager"),
    ],
    ids=["silent", "unreachable", "error", "garbage", "bad-variables"],
)
async def test_every_failure_is_one_error(autojump_clock: trio.abc.Clock, rpc: FakeRpc, message: str) -> None:
    started = trio.current_time()
    with pytest.raises(FlowManagerError, match=message):
        await FlowManager(rpc, timeout=0.5).variables(FLOW)
    assert trio.current_time() - started <= 0.5


async def test_a_failed_lookup_falls_back_and_says_so(
    autojump_clock: trio.abc.Clock, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    client = FlowManager(FakeRpc(reply(envelope.plain_error(500))))
    with caplog.at_level(logging.WARNING):
        flow_voice = look_up_flow_voice(nursery, client, SID, FLOW, "", SyntheticEngine(name="gcp"))
        assert await flow_voice.get() == ""
    [record] = [r for r in caplog.records if "flow variables" in r.getMessage()]
    assert f"streaming={SID}" in record.getMessage() and "answered 500" in record.getMessage()


async def test_no_lookup_means_no_request(autojump_clock: trio.abc.Clock, nursery: trio.Nursery) -> None:
    rpc = FakeRpc()
    client = FlowManager(rpc)
    for activeflow, voice, engine in [
        (NIL_UUID, "", SyntheticEngine(name="gcp")),
        (FLOW, "explicit", SyntheticEngine(name="gcp")),
        (FLOW, "", SyntheticEngine(name="espeak")),
        (FLOW, "", None),
    ]:
        flow_voice = look_up_flow_voice(nursery, client, SID, activeflow, voice, engine)
        assert flow_voice.done.is_set() and await flow_voice.get() == ""
    await trio.sleep(1)
    assert rpc.sent == []


# ------------------------------------------------------------------- the daemon, real broker


@attrs.define
class VoiceRecordingEngine(SyntheticEngine):
    """A synthetic voice that remembers the VoiceSpec of every stream it opened."""

    voices: list[VoiceSpec] = attrs.field(factory=list)
    _opened: trio.Event = attrs.field(factory=trio.Event)

    def open_stream(self, voice: VoiceSpec) -> Any:
        self.voices.append(voice)
        self._opened.set()
        self._opened = trio.Event()
        return super().open_stream(voice)

    async def wait_for_voices(self, count: int) -> None:
        while len(self.voices) < count:
            await self._opened.wait()


@asynccontextmanager
async def rig_with_flow_manager(
    url: str, **config: Any
) -> AsyncIterator[tuple[Rig, FakeFlowManager, VoiceRecordingEngine]]:
    require_rabbitmq()
    engine = VoiceRecordingEngine(name="gcp", seconds_per_char=0.01, speed=4.0)
    # flow-manager's queue exists before the daemon's first request, as in production.
    async with open_fake_flow_manager(url) as fm, open_rig(engine=engine, **config) as rig:
        yield rig, fm, engine


async def speak_once(rig: Rig, activeflow: uuid.UUID | None) -> tuple[str, float]:
    """Create a streaming (with ``activeflow``) and say something; (streaming id, create seconds)."""
    body: dict[str, Any] = {
        "customer_id": str(uuid.uuid4()),
        "reference_type": "call",
        "reference_id": str(uuid.uuid4()),
        "language": "en-US",
        "gender": "female",
        "direction": "out",
    }
    if activeflow is not None:
        body["activeflow_id"] = str(activeflow)
    started = trio.current_time()
    created = await rig.create(body)
    took = trio.current_time() - started
    assert created.status_code == 200, created
    sid = created.data["id"]
    assert created.data["activeflow_id"] == str(activeflow or NIL_UUID)
    assert "voice_id" not in created.data  # the reply stays Go's: the flow voice is not a request field
    message_id = str(uuid.uuid4())
    assert (await rig.streaming(sid, "say_init", {"message_id": message_id})).status_code == 200
    added = await rig.streaming(sid, "say_add", {"message_id": message_id, "text": "Hello."})
    assert added.status_code == 200
    return sid, took


@pytest.mark.realtime
async def test_the_flows_voice_variable_picks_the_streamings_voice(private_amqp_url: str) -> None:
    with trio.fail_after(20):
        async with rig_with_flow_manager(private_amqp_url) as (rig, fm, engine):
            fm.variables[FLOW] = {"voipbin.tts.gcp.voice_id": GCP_VOICE, "voipbin.tts.aws.voice_id": "Mizuki"}
            await speak_once(rig, FLOW)
            await engine.wait_for_voices(1)
            [voice] = engine.voices
            assert voice.voice_id == GCP_VOICE
            assert (voice.language, voice.gender) == ("en-US", "female")
            [request] = fm.requests
            assert (request.uri, request.method, request.publisher, request.data_type) == (
                f"/v1/variables/{FLOW}",
                "GET",
                "tts-manager",
                "",
            )
            assert request.data is None

            # No activeflow: flow-manager is not asked; the request's own fields choose the voice.
            await speak_once(rig, None)
            await engine.wait_for_voices(2)
            assert engine.voices[1].voice_id == "" and engine.voices[1].gender == "female"
            assert len(fm.requests) == 1


@pytest.mark.realtime
@pytest.mark.parametrize("mode", ["silent", "error500", "typed_error", "garbage", "unknown_flow"])
async def test_any_flow_manager_failure_falls_back_to_the_requests_voice(
    mode: str, caplog: pytest.LogCaptureFixture, private_amqp_url: str
) -> None:
    timeout = 0.4
    with trio.fail_after(20), caplog.at_level(logging.WARNING):
        async with rig_with_flow_manager(private_amqp_url, flow_manager_timeout=timeout) as (rig, fm, engine):
            if mode != "unknown_flow":
                fm.mode = mode
                fm.variables[FLOW] = {"voipbin.tts.gcp.voice_id": GCP_VOICE}
            sid, _took = await speak_once(rig, FLOW)
            await engine.wait_for_voices(1)
            assert engine.voices[0].voice_id == ""  # the table voice for en-US/female
            assert len(fm.requests) == 1
    # The create was answered 200 (speak_once checks it): a lookup that did not end within its own
    # timeout would have run the create past its 2.5 s budget and rolled it back.
    warnings = [r.getMessage() for r in caplog.records if "flow variables" in r.getMessage()]
    assert len(warnings) == 1 and f"streaming={sid}" in warnings[0]


@pytest.mark.realtime
async def test_the_daemon_wires_its_settings(private_amqp_url: str) -> None:
    """BRIDGE_WAIT_MS reaches the sessions' pacing; FLOW_MANAGER_TIMEOUT the flow-manager client."""
    with trio.fail_after(20):
        async with rig_with_flow_manager(private_amqp_url, bridge_wait_ms=750, flow_manager_timeout=0.3) as (
            rig,
            _fm,
            _e,
        ):
            assert rig.daemon.supervisor.config.pacing.bridge_timeout == 0.75
            client = rig.daemon.streamings._flow_manager
            assert client is not None and client.timeout == 0.3
