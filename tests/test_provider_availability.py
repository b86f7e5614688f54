"""Issue 15 §4: Polly with the Go tts-manager's environment, and a request's provider that is not
available made visible (a WARNING per request, a metric, the readiness detail)."""

from __future__ import annotations

import json
import logging

import pytest

from tts_streamer.adapters.engines import GO_POLLY_REGION, aws_settings, build_engines
from tts_streamer.adapters.http_serving import HttpRequest
from tts_streamer.supervisor.ops.health import Readiness, health_routes
from tts_streamer.supervisor.ops.metrics import Metrics
from tts_streamer.supervisor.services.providers import ProviderResolver

GO_ENV = {"AWS_ACCESS_KEY": "AKIAGOSTYLE", "AWS_SECRET_KEY": "go-secret"}


@pytest.fixture(autouse=True)
def _no_ambient_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    # boto3 reads os.environ and ~/.aws itself: keep the machine's own settings out of these tests.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")


def test_go_names_alone_enable_polly_in_gos_region() -> None:
    settings = aws_settings(GO_ENV)
    assert (settings["key_id"], settings["secret"], settings["region"]) == (
        "AKIAGOSTYLE",
        "go-secret",
        GO_POLLY_REGION,
    )
    engines, unavailable = build_engines(GO_ENV)
    assert "aws" in engines and "aws" not in unavailable
    client = engines["aws"].client  # type: ignore[attr-defined]
    assert client.meta.region_name == "eu-central-1"
    frozen = client._request_signer._credentials.get_frozen_credentials()
    assert (frozen.access_key, frozen.secret_key) == ("AKIAGOSTYLE", "go-secret")


def test_sdk_names_win_over_go_names_and_a_region_setting_wins() -> None:
    env = GO_ENV | {
        "AWS_ACCESS_KEY_ID": "AKIASDK",
        "AWS_SECRET_ACCESS_KEY": "sdk-secret",
        "AWS_REGION": "us-west-2",
    }
    settings = aws_settings(env)
    assert (settings["key_id"], settings["secret"], settings["region"]) == (
        "AKIASDK",
        "sdk-secret",
        "us-west-2",
    )
    assert aws_settings(GO_ENV | {"AWS_DEFAULT_REGION": "eu-west-1"})["region"] == "eu-west-1"
    # SDK key id without a region stays an explicit configuration error, as before.
    engines, unavailable = build_engines({"AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "x"})
    assert "aws" not in engines and "region" in unavailable["aws"]


def test_a_key_without_its_secret_is_named() -> None:
    engines, unavailable = build_engines({"AWS_ACCESS_KEY": "AKIAGOSTYLE"})
    assert "aws" not in engines
    assert "AWS_ACCESS_KEY" in unavailable["aws"] and "AWS_SECRET_KEY" in unavailable["aws"]


def test_no_credentials_reason_names_the_go_variable_too() -> None:
    _engines, unavailable = build_engines({})
    assert "AWS_ACCESS_KEY" in unavailable["aws"]


async def test_unavailable_provider_warns_per_request_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    unavailable = {"aws": "no AWS credentials configured (AWS_ACCESS_KEY_ID or Go's AWS_ACCESS_KEY)"}
    resolver = ProviderResolver(frozenset({"espeak", "gcp"}), "espeak", unavailable, metrics)
    assert resolver.engine_for("gcp", request="speaking=1") == "gcp"
    with caplog.at_level(logging.WARNING, logger="tts_streamer.supervisor.services.providers"):
        assert resolver.engine_for("aws", request="speaking=2") is None
        assert resolver.engine_for("aws", request="speaking=3") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "speaking=2" in warnings[0] and "provider aws" in warnings[0] and "espeak" in warnings[0]
    assert "AWS_ACCESS_KEY" in warnings[0]  # the reason travels with the warning
    body, _ = metrics.render()
    assert b'tts_streamer_provider_unavailable_total{fallback="espeak",provider="aws"} 2.0' in body
    assert b'provider="gcp"' not in body

    readiness = Readiness(command_plane_connected=True, vendors_unavailable=unavailable)
    ready = health_routes(None, readiness, metrics)[("GET", "/health/ready")]  # type: ignore[arg-type]
    response = await ready(HttpRequest("GET", "/health/ready", "", ()))
    detail = json.loads(response.body)  # type: ignore[arg-type]
    assert detail["vendors_unavailable"]["aws"].startswith("no AWS credentials")
