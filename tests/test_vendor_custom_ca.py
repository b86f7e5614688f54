"""Each cloud adapter can trust a custom CA (a private endpoint, the bench's TLS fakes) through its
environment option, without weakening production verification: the same endpoint is refused with the
system's roots. Real TLS over loopback (bench.netem's proxy, a CA generated per test)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trio
from bench.netem import Certificates, DelayProxy, make_certificates
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.google_tts import GoogleTTSFake
from tests.fakes.polly import PollyFake
from tts_streamer.adapters.engines import build_engines, warm_engine

pytestmark = pytest.mark.realtime


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


@pytest.fixture(autouse=True)
def _no_ambient_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def google() -> Iterator[GoogleTTSFake]:
    with GoogleTTSFake() as fake:
        yield fake


def service_account(path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "test",
        "private_key_id": "1",
        "private_key": pem,
        "client_email": "tts@test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://127.0.0.1:9/token",
    }
    path.write_text(json.dumps(info))
    return path


def _ready(channel: grpc.Channel, seconds: float) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=seconds)
    except grpc.FutureTimeoutError:
        return False
    return True


async def test_gcp_channel_trusts_gcp_tts_ca_file_and_only_it(certs, google, tmp_path, nursery) -> None:
    proxy = DelayProxy(("127.0.0.1", google.port), 0.0, certs.server_context())
    port = await nursery.start(proxy.serve)
    env = {
        "GOOGLE_APPLICATION_CREDENTIALS": str(service_account(tmp_path / "sa.json")),
        "GCP_TTS_ENDPOINT": f"localhost:{port}",
    }
    engines, unavailable = build_engines(env | {"GCP_TTS_CA_FILE": str(certs.ca_file)})
    assert "gcp" in engines, unavailable
    channel = engines["gcp"].transport.grpc_channel  # type: ignore[attr-defined]
    assert await trio.to_thread.run_sync(_ready, channel, 5.0)
    engines["gcp"].close()  # type: ignore[attr-defined]
    strict, _ = build_engines(env)  # the system's roots: the generated CA is unknown
    channel = strict["gcp"].transport.grpc_channel  # type: ignore[attr-defined]
    assert not await trio.to_thread.run_sync(_ready, channel, 1.0)
    strict["gcp"].close()  # type: ignore[attr-defined]


async def test_polly_trusts_aws_ca_bundle(certs, nursery) -> None:
    with PollyFake() as fake:
        polly_port = int(fake.endpoint_url.rsplit(":", 1)[1])
        proxy = DelayProxy(("127.0.0.1", polly_port), 0.0, certs.server_context())
        port = await nursery.start(proxy.serve)
        env = {
            "AWS_ACCESS_KEY_ID": "AKIDTEST",
            "AWS_SECRET_ACCESS_KEY": "x",
            "AWS_REGION": "eu-west-1",
            "POLLY_ENDPOINT_URL": f"https://localhost:{port}",
        }
        engines, _ = build_engines(env | {"AWS_CA_BUNDLE": str(certs.ca_file)})
        with trio.fail_after(10):
            await engines["aws"].warm()  # type: ignore[attr-defined]
        assert fake.describe_calls >= 1 and proxy.connections >= 1
        strict, _ = build_engines(env)
        reason = await warm_engine(strict["aws"], within=10)
        assert "certificate" in reason or "SSL" in reason, reason


def test_elevenlabs_trusts_elevenlabs_ca_file(certs) -> None:
    engines, _ = build_engines({"ELEVENLABS_API_KEY": "k", "ELEVENLABS_CA_FILE": str(certs.ca_file)})
    context = engines["elevenlabs"].ssl_context  # type: ignore[attr-defined]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode is ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "tts-streamer bench CA"),),)]
    default, _ = build_engines({"ELEVENLABS_API_KEY": "k"})
    assert default["elevenlabs"].ssl_context.verify_mode is ssl.CERT_REQUIRED  # type: ignore[attr-defined]
