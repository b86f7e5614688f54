"""Batch speech with the Go deployment's settings (issue 15, §3): the same files, the same URLs.

The Go tts-manager writes ``/shared-data/<sha1>.wav`` (a volume its ``http-server`` sidecar serves on
port 80, ``python3 -m http.server 80 -d /shared-data``) and answers ``http://<host>/<sha1>.wav``, host
from POD_IP (voipbin-wire.md §4.4). With MEDIA_DIR=/shared-data, MEDIA_URL_PORT=80 and
MEDIA_HTTP_ENABLED=false, tts-streamer drops into that deployment: checked here against the Go service's
own test vector, over the real broker.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.amqp_support import open_rig, run_pod
from tests.amqp_vhost import private_amqp_url
from tests.fakes.voipbin_client import SHARED_QUEUE
from tests.services import require_rabbitmq
from tts_streamer.adapters import media_files as speeches_module
from tts_streamer.adapters.media_files import check_media_dir
from tts_streamer.adapters.synthetic import SyntheticEngine
from tts_streamer.adapters.voice import VoiceEngine
from tts_streamer.supervisor.config import ConfigError, DaemonConfig
from tts_streamer.supervisor.services.speeches import media_url_port

__all__ = ["private_amqp_url"]

# The Go service's test vector (bin-tts-manager ttshandler tts_test.go and buckethandler main_test.go).
GO_NAME = "d27dff3751181a10e4fc7f216a936c9c3f33c339.wav"
GO_REQUEST = {"text": "<speak>Hello world</speak>", "language": "en-US", "provider": "gcp"}
GO_REQUEST |= {"voice_id": "en-US-Wavenet-F"}

# What an operator adds to the Go deployment's environment when swapping the image (docs/migrating.md).
MIGRATION = {"MEDIA_DIR": "/shared-data", "MEDIA_URL_PORT": "80", "MEDIA_HTTP_ENABLED": "false"}


def test_the_migration_settings_parse() -> None:
    go_env = {"POD_IP": "10.96.0.112", "HOSTNAME": "tts-manager-6c8f7d9b5-x2k4p", "DATABASE_DSN": ""}
    config = DaemonConfig.from_env(go_env | MIGRATION)
    assert (config.media_dir, config.media_url_port, config.media_http_enabled) == ("/shared-data", 80, False)
    assert config.pod_ip == "10.96.0.112"
    defaults = DaemonConfig.from_env({})
    assert (defaults.media_url_port, defaults.media_http_enabled, defaults.media_http_port) == (0, True, 8080)
    for bad in ("0", "65536", "http"):
        with pytest.raises(ConfigError, match="MEDIA_URL_PORT"):
            DaemonConfig.from_env({"MEDIA_URL_PORT": bad})
    with pytest.raises(ConfigError, match="MEDIA_HTTP_ENABLED"):
        DaemonConfig.from_env({"MEDIA_HTTP_ENABLED": "sometimes"})


def test_the_url_port_follows_the_settings() -> None:
    assert media_url_port(0, 8080) == 8080  # the default: the daemon serves, the URL says where
    assert media_url_port(80, 8080) == 80  # another server (the sidecar) on 80 in front of the directory
    assert media_url_port(0, None) == 80  # not serving, no port given: the Go layout
    assert media_url_port(8081, None) == 8081


@pytest.mark.realtime
@pytest.mark.parametrize(
    ("pod_ip", "go_url"),
    [
        # Kubernetes: POD_IP from the downward API, the sidecar on the pod's port 80.
        ("10.96.0.112", f"http://10-96-0-112.bin-manager.pod.cluster.local/{GO_NAME}"),
        # Compose (bm-nyc-01): POD_IP is the sidecar's container name, used verbatim.
        ("voipbin-tts-manager-http", f"http://voipbin-tts-manager-http/{GO_NAME}"),
    ],
)
async def test_with_the_migration_settings_the_reply_and_the_file_are_go_s(
    pod_ip: str, go_url: str, tmp_path: Path, private_amqp_url: str
) -> None:
    require_rabbitmq()
    shared = tmp_path / "shared-data"  # stands for the volume mounted at /shared-data
    engines: dict[str, VoiceEngine] = {"gcp": SyntheticEngine(name="gcp", seconds_per_char=0.01)}
    settings = DaemonConfig.from_env(MIGRATION | {"MEDIA_DIR": str(shared), "POD_IP": pod_ip})
    overrides = {
        field.name: getattr(settings, field.name)
        for field in attrs.fields(DaemonConfig)
        if field.name in ("media_dir", "media_url_port", "media_http_enabled", "pod_ip")
    }
    with trio.fail_after(30):
        async with open_rig(pods=0) as rig, run_pod(rig, engines=engines, **overrides) as pod:
            request = {"call_id": str(uuid.uuid4()), **GO_REQUEST}
            reply = await rig.request(SHARED_QUEUE, "/v1/speeches", "POST", request)
            assert reply.status_code == 200, reply
            assert reply.data["media_filepath"] == go_url  # byte for byte
            assert reply.data["provider"] == "gcp" and reply.data["voice_id"] == "en-US-Wavenet-F"
            assert sorted(os.listdir(shared)) == [GO_NAME]  # where Go's sidecar looks, named as Go names it
            assert (shared / GO_NAME).read_bytes().startswith(b"RIFF")
            assert pod.handle.media_http_port == 0  # the sidecar serves the directory, not the daemon
            # An existing file is a cache hit, as it was for Go (so are the files Go left there).
            again = await rig.request(SHARED_QUEUE, "/v1/speeches", "POST", request)
            assert again.data == reply.data and pod.handle.speeches is not None
            assert pod.handle.speeches.stats.cache_hits == 1


@pytest.mark.realtime
async def test_the_daemon_can_serve_on_80_itself(tmp_path: Path, private_amqp_url: str) -> None:
    """Without the sidecar: the daemon serves MEDIA_DIR and the URL carries MEDIA_URL_PORT (here the
    port a forwarder maps to the daemon's own port, since tests cannot bind 80)."""
    require_rabbitmq()
    engines: dict[str, VoiceEngine] = {"gcp": SyntheticEngine(name="gcp", seconds_per_char=0.01)}
    options: dict[str, Any] = {"media_dir": str(tmp_path / "m"), "media_url_port": 80}
    options |= {"pod_ip": "10.96.0.112"}
    with trio.fail_after(30):
        async with (
            open_rig(pods=0) as rig,
            run_pod(rig, engines=engines, media_http_port=0, **options) as pod,
        ):
            reply = await rig.request(
                SHARED_QUEUE, "/v1/speeches", "POST", {"call_id": str(uuid.uuid4()), **GO_REQUEST}
            )
            assert (
                reply.data["media_filepath"] == f"http://10-96-0-112.bin-manager.pod.cluster.local/{GO_NAME}"
            )
            assert pod.handle.media_http_port > 0


def test_a_media_dir_the_daemon_cannot_write_stops_it_naming_the_variable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match=r"MEDIA_DIR=.*a-file/media.*cannot write"):
        check_media_dir(blocker / "media")
    if os.getuid() != 0:  # root writes anywhere: the mode check means nothing then
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        with pytest.raises(ConfigError, match="MEDIA_DIR"):
            check_media_dir(locked)
    check_media_dir(tmp_path / "new" / "media")  # created when missing
    assert os.listdir(tmp_path / "new" / "media") == []  # the write probe is gone


def test_an_unused_go_directory_is_pointed_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    go_dir = tmp_path / "shared-data"
    go_dir.mkdir()
    monkeypatch.setattr(speeches_module, "GO_MEDIA_DIR", str(go_dir))
    with caplog.at_level(logging.WARNING, logger=speeches_module.__name__):
        check_media_dir(tmp_path / "cache")
        assert any("MEDIA_DIR=" + str(go_dir) in r.getMessage() for r in caplog.records), caplog.text
        caplog.clear()
        check_media_dir(go_dir)  # using it: nothing to say
        assert caplog.records == []
