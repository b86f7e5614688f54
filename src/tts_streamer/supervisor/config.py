"""Daemon configuration from environment variables (names of the Go service where one exists).

Read once at startup; a bad value is a startup error naming the variable, never a later crash.
docs/configuration.md lists every variable; keep the two in step.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
from collections.abc import Callable, Mapping
from typing import TypeVar

import attrs

from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.exceptions import ConfigError as ConfigError  # raised by adapters too (the bridge)

T = TypeVar("T")
_SHIPPED_PACING = PacingConfig()


# Between the broker sending a delivery and the daemon seeing it (frames buffered in the socket and the
# client library while the process is busy): time a request's deadline must leave for what cannot be
# measured.
DELIVERY_ALLOWANCE = 0.5


def _xdg_dir(variable: str, fallback: str, *parts: str) -> str:
    base = os.environ.get(variable) or os.path.join(os.path.expanduser("~"), fallback)
    return os.path.join(base, "tts-streamer", *parts)


def default_sqlite_path() -> str:
    """Speaking rows without a database server: ``$XDG_STATE_HOME/tts-streamer/speakings.sqlite3``."""
    return _xdg_dir("XDG_STATE_HOME", os.path.join(".local", "state"), "speakings.sqlite3")


def default_media_dir() -> str:
    """Speech WAV files: ``$XDG_CACHE_HOME/tts-streamer/media``."""
    return _xdg_dir("XDG_CACHE_HOME", ".cache", "media")


@attrs.frozen
class DaemonConfig:
    rabbitmq_address: str = "amqp://guest:guest@127.0.0.1:5672/"
    pod_id: str = "tts-streamer"
    amqp_prefetch: int = 10
    amqp_timeout: float = 3.0
    per_pod_queue_expires_ms: int = 1_800_000
    # The broker's share of the callers' 3 s: a per-pod request is started only within
    # REQUEST_TIMEOUT - TTL - DELIVERY_ALLOWANCE of its receipt (command-plane.md).
    per_pod_message_ttl_ms: int = 1_500
    request_timeout: float = 3.0  # voipbin's callers give up after 3 s
    delay_exchange: bool = False
    create_timeout: float = 2.5
    call_manager_timeout: float = 3.0
    flow_manager_timeout: float = 1.0  # runs alongside call-manager's create, inside CREATE_TIMEOUT
    delete_forward_timeout: float = 1.0
    max_text_bytes: int = 5000
    max_message_text_bytes: int = 64 * 1024  # all say_adds of one message; bounds total_message too
    command_timeout: float = 2.0  # a caller's wait for a session's reply; callers give up at 3 s
    event_buffer: int = 10_000
    event_max_bytes: int = 1 << 20  # larger events are refused (RabbitMQ 4.x's own limit: 16 MiB)
    drain_timeout: float = 10.0
    default_engine: str = "espeak"
    voice_warmup_timeout: float = 5.0  # start-up warm-up of each cloud voice (channel, pool, credentials)
    lead_frames: int = _SHIPPED_PACING.lead_frames  # one source of truth: PacingConfig's defaults
    frames_per_message: int = _SHIPPED_PACING.frames_per_message
    media_start_timeout: float = 5.0
    # First audio waits for the bridge join at most this long after MEDIA_START (docs/architecture.md).
    bridge_wait_ms: int = 200
    admin_socket: str = ""  # empty: $XDG_RUNTIME_DIR/tts-streamer/console.sock or a per-user temp dir
    admin_host: str = ""
    admin_port: int = 0
    admin_token: str = ""
    http_host: str = "0.0.0.0"
    http_port: int = 9090
    log_level: str = "INFO"
    log_format: str = "json"
    # speakings (docs/speakings.md): MySQL/MariaDB when DATABASE_DSN is set, else an SQLite file
    database_dsn: str = ""
    sqlite_path: str = attrs.field(factory=default_sqlite_path)
    # speakings' billing integrity (docs/speakings.md): pod heartbeats, orphan sweep, stop-write retries
    speaking_heartbeat_interval: float = 5.0
    speaking_owner_timeout: float = 60.0
    speaking_stop_retry_timeout: float = 900.0
    # speeches: WAV cache served over HTTP; media_filepath = http://<POD_IP rule>[:port]/<sha1>.wav
    media_dir: str = attrs.field(factory=default_media_dir)
    media_cache_max_bytes: int = 1 << 30
    media_http_host: str = "0.0.0.0"
    media_http_port: int = 8080
    # The Go deployment's layout (docs/migrating.md): MEDIA_DIR=/shared-data, MEDIA_URL_PORT=80 (its
    # sidecar serves the directory on 80), MEDIA_HTTP_ENABLED=false (the daemon need not serve it too).
    media_http_enabled: bool = True
    media_url_port: int = 0  # port in media_filepath; 0: the media server's own port (80 if not serving)
    pod_ip: str = ""
    speech_timeout: float = 9.5  # call-manager waits 10 s

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DaemonConfig:
        d = cls()

        def get(name: str, default: T, parse: Callable[[str], T]) -> T:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return parse(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r}: {exc}") from None

        pod_id = env.get("POD_ID") or env.get("HOSTNAME") or socket.gethostname() or d.pod_id
        config = cls(
            rabbitmq_address=get("RABBITMQ_ADDRESS", d.rabbitmq_address, str),
            pod_id=pod_id,
            amqp_prefetch=get("AMQP_PREFETCH", d.amqp_prefetch, _positive_int),
            amqp_timeout=get("AMQP_TIMEOUT", d.amqp_timeout, _positive_float),
            per_pod_queue_expires_ms=get(
                "PER_POD_QUEUE_EXPIRES_MS", d.per_pod_queue_expires_ms, _positive_int
            ),
            per_pod_message_ttl_ms=get("PER_POD_MESSAGE_TTL_MS", d.per_pod_message_ttl_ms, _positive_int),
            request_timeout=get("REQUEST_TIMEOUT", d.request_timeout, _positive_float),
            delay_exchange=get("DELAY_EXCHANGE", d.delay_exchange, _bool),
            create_timeout=get("CREATE_TIMEOUT", d.create_timeout, _positive_float),
            call_manager_timeout=get("CALL_MANAGER_TIMEOUT", d.call_manager_timeout, _positive_float),
            flow_manager_timeout=get("FLOW_MANAGER_TIMEOUT", d.flow_manager_timeout, _positive_float),
            delete_forward_timeout=get("DELETE_FORWARD_TIMEOUT", d.delete_forward_timeout, _positive_float),
            max_text_bytes=get("MAX_TEXT_BYTES", d.max_text_bytes, _positive_int),
            max_message_text_bytes=get("MAX_MESSAGE_TEXT_BYTES", d.max_message_text_bytes, _positive_int),
            command_timeout=get("COMMAND_TIMEOUT", d.command_timeout, _positive_float),
            event_buffer=get("EVENT_BUFFER", d.event_buffer, _positive_int),
            event_max_bytes=get("EVENT_MAX_BYTES", d.event_max_bytes, _positive_int),
            drain_timeout=get("DRAIN_TIMEOUT", d.drain_timeout, _positive_float),
            default_engine=get("DEFAULT_ENGINE", d.default_engine, str),
            voice_warmup_timeout=get("VOICE_WARMUP_TIMEOUT", d.voice_warmup_timeout, _positive_float),
            lead_frames=get("PACING_LEAD_FRAMES", d.lead_frames, _non_negative_int),
            frames_per_message=get("FRAMES_PER_MESSAGE", d.frames_per_message, _positive_int),
            media_start_timeout=get("MEDIA_START_TIMEOUT", d.media_start_timeout, _positive_float),
            bridge_wait_ms=get("BRIDGE_WAIT_MS", d.bridge_wait_ms, _non_negative_int),
            admin_socket=get("ADMIN_SOCKET", d.admin_socket, str),
            admin_host=get("ADMIN_HOST", d.admin_host, str),
            admin_port=get("ADMIN_PORT", d.admin_port, _non_negative_int),
            admin_token=get("ADMIN_TOKEN", d.admin_token, str),
            http_host=get("HTTP_HOST", d.http_host, str),
            http_port=get("HTTP_PORT", d.http_port, _non_negative_int),
            log_level=get("LOG_LEVEL", d.log_level, _log_level),
            log_format=get("LOG_FORMAT", d.log_format, _log_format),
            database_dsn=get("DATABASE_DSN", d.database_dsn, str),
            sqlite_path=get("SQLITE_PATH", d.sqlite_path, str),
            speaking_heartbeat_interval=get(
                "SPEAKING_HEARTBEAT_INTERVAL", d.speaking_heartbeat_interval, _positive_float
            ),
            speaking_owner_timeout=get("SPEAKING_OWNER_TIMEOUT", d.speaking_owner_timeout, _positive_float),
            speaking_stop_retry_timeout=get(
                "SPEAKING_STOP_RETRY_TIMEOUT", d.speaking_stop_retry_timeout, _positive_float
            ),
            media_dir=get("MEDIA_DIR", d.media_dir, str),
            media_cache_max_bytes=get("MEDIA_CACHE_MAX_BYTES", d.media_cache_max_bytes, _positive_int),
            media_http_host=get("MEDIA_HTTP_HOST", d.media_http_host, str),
            media_http_port=get("MEDIA_HTTP_PORT", d.media_http_port, _non_negative_int),
            media_http_enabled=get("MEDIA_HTTP_ENABLED", d.media_http_enabled, _bool),
            media_url_port=get("MEDIA_URL_PORT", d.media_url_port, _port),
            pod_ip=get("POD_IP", d.pod_ip, str),
            speech_timeout=get("SPEECH_TIMEOUT", d.speech_timeout, _positive_float),
        )
        _check_console_exposure(config)
        return config

    def __attrs_post_init__(self) -> None:
        if self.per_pod_message_ttl_ms / 1000 + DELIVERY_ALLOWANCE >= self.request_timeout:
            raise ConfigError(
                f"PER_POD_MESSAGE_TTL_MS={self.per_pod_message_ttl_ms} must be at least "
                f"{DELIVERY_ALLOWANCE * 1000:.0f} ms below REQUEST_TIMEOUT ({self.request_timeout} s): a "
                f"request the broker held that long would have no time left to run"
            )

    @property
    def shared_queue(self) -> str:
        return "bin-manager.tts-manager.request"

    @property
    def pod_queue(self) -> str:
        return f"bin-manager.tts-manager.request.{self.pod_id}"


def _check_console_exposure(config: DaemonConfig) -> None:
    """A console on a non-loopback address needs ADMIN_TOKEN. Only literal addresses are judged here;
    the console judges what a host name resolved to when it binds (supervisor/ops/console.py)."""
    if not config.admin_host or config.admin_token:
        return
    try:
        address = ipaddress.ip_address(config.admin_host.strip("[]"))
    except ValueError:
        return
    if not address.is_loopback:
        raise ConfigError(
            f"ADMIN_HOST={config.admin_host!r}: the console would listen on a non-loopback address; "
            "set ADMIN_TOKEN to serve it there"
        )


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= 65535:
        raise ValueError("must be a port number, 1 to 65535")
    return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a positive number of seconds")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("must be true or false")


def _log_format(raw: str) -> str:
    value = raw.strip().lower()
    if value not in {"json", "text"}:
        raise ValueError("must be json or text")
    return value


def _log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level
