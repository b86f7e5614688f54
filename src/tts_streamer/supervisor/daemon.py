"""``tts-streamer serve``: the daemon, as ``open_*`` pieces whose lifetimes nest (docs/architecture.md):

    voices                                       closed by the daemon when it built them
    └── root: signals, warm-up, health, console  up before the broker: liveness answers
        └── broker bridge
            └── event publisher, readiness       they use the bridge, so they live inside it
                └── services (open_services)     store, command plane, sweeper, media HTTP
                    └── sessions                 their ends still reach call-manager and the publisher

Shutdown (SIGTERM, SIGINT, or ``DaemonHandle.shutdown``) drains by one deadline, hypercorn-style: stop
consuming (callers fail fast instead of timing out on a dying pod), refuse new sessions, stop every
streaming through its normal path (external media stopped, socket closed, events published), wait for
the event buffer to reach the broker, all by ``drain_by = now + DRAIN_TIMEOUT``; the outer scope's
deadline is ``drain_by`` plus one socket close, after which whatever is left is cancelled.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.amqp.bridge import AmqpBridge, ExchangeSpec, QueueSpec, Topology, open_amqp_bridge
from tts_streamer.adapters.amqp.event_publisher import EVENT_EXCHANGE, EventPublisher
from tts_streamer.adapters.chan_websocket.client import Dialer, MediaTimeouts, websocket_dialer
from tts_streamer.adapters.engines import close_engines, warm_engines
from tts_streamer.adapters.voice import VoiceEngine
from tts_streamer.supervisor.config import ConfigError, DaemonConfig
from tts_streamer.supervisor.event_bus import EventBus
from tts_streamer.supervisor.ops.console import default_console_path, serve_console
from tts_streamer.supervisor.ops.health import Readiness, serve_http
from tts_streamer.supervisor.ops.metrics import Metrics
from tts_streamer.supervisor.services.command_plane import CONTROL_EXCHANGE, CommandPlane
from tts_streamer.supervisor.services.speaking_recovery import OrphanSweeper
from tts_streamer.supervisor.services.speakings import SpeakingService
from tts_streamer.supervisor.services.speeches import SpeechService
from tts_streamer.supervisor.services.streamings import StreamingService
from tts_streamer.supervisor.services.wiring import Services, open_services
from tts_streamer.supervisor.services.wiring import request_deadlines as request_deadlines  # its old home
from tts_streamer.supervisor.sessions import Supervisor
from tts_streamer.supervisor.signals import serve_shutdown_signals

log = logging.getLogger(__name__)

ENGINE_CLOSE_TIMEOUT = 2.0  # espeak's thread finishing its sentence; Google's channel closing
READINESS_POLL = 0.5

DELAY_EXCHANGE = "bin-manager.delay"


def topology(config: DaemonConfig) -> Topology:
    """Queues and exchanges, declared exactly as the Go service declares the shared ones."""
    exchanges = [
        ExchangeSpec(EVENT_EXCHANGE, "fanout", durable=True),
        ExchangeSpec(CONTROL_EXCHANGE, "fanout", durable=True),
    ]
    pod_bindings = [CONTROL_EXCHANGE]
    shared_bindings: list[str] = []
    if config.delay_exchange:
        # Needs rabbitmq_delayed_message_exchange; declaring it without the plugin kills the connection.
        exchanges.append(
            ExchangeSpec(
                DELAY_EXCHANGE, "x-delayed-message", durable=True, arguments={"x-delayed-type": "direct"}
            )
        )
        pod_bindings.append(DELAY_EXCHANGE)
        shared_bindings.append(DELAY_EXCHANGE)
    return Topology(
        consume=(
            QueueSpec(config.shared_queue, durable=True, auto_delete=False, bind_to=tuple(shared_bindings)),
            # Per-pod: durable with a queue TTL (x-expires), as RabbitMQ recommends since transient
            # non-exclusive queues are denied (4.3): a dead pod's queue goes away once unused for
            # x-expires, and a request older than x-message-ttl expires instead of running late.
            QueueSpec(
                config.pod_queue,
                durable=True,
                auto_delete=False,
                arguments={
                    "x-expires": config.per_pod_queue_expires_ms,
                    "x-message-ttl": config.per_pod_message_ttl_ms,
                },
                bind_to=tuple(pod_bindings),
            ),
        ),
        exchanges=tuple(exchanges),
        prefetch=config.amqp_prefetch,
        manual_ack=True,  # acked when taken up for work (command_plane.py): prefetch bounds memory
    )


@attrs.define
class DaemonHandle:
    """What a running daemon exposes to tests and the admin console."""

    config: DaemonConfig
    supervisor: Supervisor
    bus: EventBus
    bridge: AmqpBridge
    streamings: StreamingService
    plane: CommandPlane
    publisher: EventPublisher
    shutdown_requested: trio.Event
    metrics: Metrics | None = None
    readiness: Readiness | None = None
    http_port: int = 0
    console_address: object = None
    speakings: SpeakingService | None = None
    sweeper: OrphanSweeper | None = None
    speeches: SpeechService | None = None
    media_http_port: int = 0

    def shutdown(self) -> None:
        self.shutdown_requested.set()


def engines_from_environment() -> tuple[dict[str, VoiceEngine], dict[str, str]]:
    """The offline voice always; cloud voices whose credentials are configured; a fallback chain."""
    from tts_streamer.adapters.engines import build_engines

    return build_engines(os.environ)


@asynccontextmanager
async def open_voices(
    engines: Mapping[str, VoiceEngine] | None,
) -> AsyncIterator[tuple[dict[str, VoiceEngine], dict[str, str]]]:
    """The voices, and why others are unavailable. Those built here (from the environment) are closed on
    exit (espeak's thread, Google's channel); engines passed in belong to the caller."""
    if engines is not None:
        yield dict(engines), {}
        return
    built, unavailable = engines_from_environment()
    try:
        yield built, unavailable
    finally:
        await close_engines(built, within=ENGINE_CLOSE_TIMEOUT)


def session_config(config: DaemonConfig) -> SessionConfig:
    return SessionConfig(
        timeouts=MediaTimeouts(media_start=config.media_start_timeout),
        pacing=PacingConfig(
            lead_frames=config.lead_frames,
            frames_per_message=config.frames_per_message,
            bridge_timeout=config.bridge_wait_ms / 1000,
        ),
        max_text_bytes=config.max_text_bytes,
        max_message_text_bytes=config.max_message_text_bytes,
        command_timeout=config.command_timeout,
    )


def check_config(config: DaemonConfig, engines: Mapping[str, VoiceEngine]) -> None:
    """Settings checkable only against the voices or each other: a ConfigError naming the variable
    (exit 2 from ``serve``), not a traceback from the supervisor."""
    if config.default_engine not in engines:
        raise ConfigError(f"DEFAULT_ENGINE={config.default_engine!r}: not one of {sorted(engines)}")
    if config.speaking_owner_timeout < 2 * config.speaking_heartbeat_interval:
        raise ConfigError(
            f"SPEAKING_OWNER_TIMEOUT={config.speaking_owner_timeout:g}: must be at least twice "
            f"SPEAKING_HEARTBEAT_INTERVAL ({config.speaking_heartbeat_interval:g}), or live pods look dead"
        )


async def serve_daemon(
    config: DaemonConfig,
    *,
    engines: Mapping[str, VoiceEngine] | None = None,
    dialer: Dialer | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[DaemonHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    async with open_voices(engines) as (voices, unavailable):
        for vendor, reason in sorted(unavailable.items()):
            log.warning("voice %s unavailable: %s", vendor, reason)
        check_config(config, voices)
        bus = EventBus()
        metrics = Metrics()
        # Made before it serves, so health and the console can read it while the broker is away; its
        # sessions run inside the services' scope (open_services).
        supervisor = Supervisor(
            engines=voices,
            default_engine=config.default_engine,
            dialer=dialer or websocket_dialer(),
            events=bus,
            config=session_config(config),
        )
        metrics.attach(bus, supervisor)
        readiness = Readiness(vendors_unavailable=unavailable)
        publisher = EventPublisher(capacity=config.event_buffer, max_bytes=config.event_max_bytes)
        shutdown = trio.Event()
        async with trio.open_nursery() as root:
            if handle_signals:
                await root.start(serve_shutdown_signals, shutdown)
            # Connections, TLS and credentials up before the first call (bounded; a failure is a
            # readiness detail, never fatal: that vendor's first call pays for its set-up).
            root.start_soon(_warm_voices, voices, readiness, config.voice_warmup_timeout, name="warm-up")
            # Health and the console come up first: liveness answers (and readiness says why not)
            # while the broker is still unreachable.
            http_port = await root.start(
                partial(
                    serve_http, supervisor, readiness, metrics, host=config.http_host, port=config.http_port
                )
            )
            console_address = await root.start(_console(config, supervisor, bus, metrics))
            with trio.CancelScope() as connecting:
                connected = False

                async def abort_connecting() -> None:
                    await shutdown.wait()
                    if not connected:
                        connecting.cancel(reason="shutdown before the broker was reached")

                root.start_soon(abort_connecting, name="abort-connecting")
                log.info("pod %s connecting to the broker", config.pod_id)
                async with open_amqp_bridge(
                    config.rabbitmq_address, topology(config), broker_timeout=config.amqp_timeout
                ) as bridge:
                    connected = True
                    async with (
                        open_broker_tasks(bridge, publisher, readiness, metrics),
                        open_services(
                            config, supervisor, bridge, publisher, bus, metrics, unavailable
                        ) as services,
                    ):
                        readiness.speakings_store_warning = services.store_warning
                        metrics.attach_plane(services.plane.stats)
                        task_status.started(
                            DaemonHandle(
                                config,
                                supervisor,
                                bus,
                                bridge,
                                services.streamings,
                                services.plane,
                                publisher,
                                shutdown,
                                metrics=metrics,
                                readiness=readiness,
                                http_port=http_port,
                                console_address=console_address,
                                speakings=services.speakings,
                                sweeper=services.sweeper,
                                speeches=services.speeches,
                                media_http_port=services.media_http_port,
                            )
                        )
                        await shutdown.wait()
                        drain_by = trio.current_time() + config.drain_timeout
                        # The one deadline: what the drain leaves gets one socket close, then is cancelled.
                        root.cancel_scope.deadline = drain_by + supervisor.config.timeouts.close
                        readiness.draining = True
                        await _drain(config, bridge, supervisor, services, publisher, drain_by)
            root.cancel_scope.cancel(reason="shutdown")
    log.info("pod %s stopped", config.pod_id)


run_daemon = serve_daemon  # the former name, for callers not renamed yet


@asynccontextmanager
async def open_broker_tasks(
    bridge: AmqpBridge, publisher: EventPublisher, readiness: Readiness, metrics: Metrics
) -> AsyncIterator[None]:
    """The publisher's sender and the readiness tracking, for the bridge's lifetime and no longer."""
    metrics.attach_broker(bridge, publisher)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publisher.serve, bridge, name="event-publisher")
            nursery.start_soon(_track_readiness, readiness, bridge, name="readiness")
            yield
            nursery.cancel_scope.cancel(reason="broker bridge closing")
    finally:
        readiness.command_plane_connected = False


def _console(
    config: DaemonConfig, supervisor: Supervisor, bus: EventBus, metrics: Metrics
) -> Callable[..., Awaitable[None]]:
    if config.admin_host:
        return partial(
            serve_console,
            supervisor,
            bus,
            host=config.admin_host,
            port=config.admin_port,
            token=config.admin_token or None,
            metrics=metrics,
        )
    return partial(
        serve_console,
        supervisor,
        bus,
        unix_path=config.admin_socket or default_console_path(),
        metrics=metrics,
    )


async def _warm_voices(engines: Mapping[str, VoiceEngine], readiness: Readiness, within: float) -> None:
    readiness.vendors_warming = True
    try:
        readiness.vendors_not_warmed = await warm_engines(engines, within=within)
    finally:
        readiness.vendors_warming = False


async def _track_readiness(readiness: Readiness, bridge: AmqpBridge) -> None:
    while True:
        readiness.command_plane_connected = bridge.connected
        await trio.sleep(0.5)


async def _drain(
    config: DaemonConfig,
    bridge: AmqpBridge,
    supervisor: Supervisor,
    services: Services,
    publisher: EventPublisher,
    drain_by: float,
) -> None:
    with trio.move_on_at(drain_by) as deadline:
        supervisor.accepting = False
        await bridge.stop_consuming()
        log.info("draining %d streaming(s)", len(services.streamings.streamings))
        await services.streamings.stop_all("shutdown")
        await services.speakings.drain()  # their rows stopped and speaking_stopped handed to the publisher
        await publisher.wait_drained()
    services.speakings.report_unwritten()  # stops whose rows the database never took: named in the log
    if deadline.cancelled_caught:
        log.warning(
            "drain overran %s s: %d session(s) and %d event(s) left",
            config.drain_timeout,
            len(supervisor),
            publisher.pending,
        )
