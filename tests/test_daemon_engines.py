"""Which voices a daemon has: the offline voice always, cloud voices only with credentials, and the
readiness body says why a vendor is missing."""

from __future__ import annotations

import json

import pytest

from tts_streamer.adapters.http_serving import HttpRequest
from tts_streamer.supervisor.daemon import engines_from_environment
from tts_streamer.supervisor.ops.health import Readiness, health_routes
from tts_streamer.supervisor.ops.metrics import Metrics

CLOUD_VARIABLES = (
    "ELEVENLABS_API_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GCP_TTS_ENDPOINT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "AWS_USE_DEFAULT_CREDENTIALS",
    "VOICE_FALLBACK_CHAIN",
)


async def test_without_cloud_credentials_only_the_offline_voice_is_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in CLOUD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    engines, unavailable = engines_from_environment()
    assert "espeak" in engines
    assert {"gcp", "aws", "elevenlabs"} <= set(unavailable) and all(unavailable.values())
    assert not {"gcp", "aws", "elevenlabs"} & set(engines)

    readiness = Readiness(command_plane_connected=True, vendors_unavailable=unavailable)
    ready = health_routes(None, readiness, Metrics())[("GET", "/health/ready")]  # type: ignore[arg-type]
    response = await ready(HttpRequest("GET", "/health/ready", "", ()))
    body = json.loads(response.body)  # type: ignore[arg-type]
    assert response.status == 200 and body["ready"] is True
    assert body["vendors_unavailable"] == unavailable
