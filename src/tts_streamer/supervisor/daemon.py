"""``tts-streamer serve``: the daemon. Wires the supervisor, the AMQP bridge and the command plane.

Shutdown (SIGTERM, SIGINT, or ``DaemonHandle.shutdown``) drains by a deadline, hypercorn-style:
stop consuming (callers fail fast instead of timing out on a dying pod), refuse new sessions, stop every
streaming through its normal path (external media stopped, socket closed, events published), wait for
the event buffer to reach the broker, then return, all within ``drain_timeout``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import attrs
import trio

from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.chan_websocket.client import Dialer, MediaTimeouts, websocket_dialer
from tts_streamer.adapters.engines import warm_engines
from tts_streamer.adapters.speaking_store import open_speaking_store
from tts_streamer.adapters.voice import VoiceEngine
from tts_streamer.adapters.voipbin.flow_manager import FlowManager
from tts_streamer.supervisor.amqp_bridge import (
    AmqpBridge,
    ExchangeSpec,
    QueueSpec,
    Topology,
    open_amqp_bridge,
)
from tts_streamer.supervisor.call_manager import CallManager
from tts_streamer.supervisor.command_plane import CONTROL_EXCHANGE, CommandPlane
from tts_streamer.supervisor.config import ConfigError, DaemonConfig
from tts_streamer.supervisor.console import default_console_path, serve_console
from tts_streamer.supervisor.delivery_source import RequestDeadlines
from tts_streamer.supervisor.event_bus import EventBus
from tts_streamer.supervisor.event_publisher import EVENT_EXCHANGE, EventPublisher
from tts_streamer.supervisor.metrics import Metrics
from tts_streamer.supervisor.ops.health import Readiness, serve_http
from tts_streamer.supervisor.providers import ProviderResolver
from tts_streamer.supervisor.services.media_http import MediaHttpServer
from tts_streamer.supervisor.sessions import Supervisor, open_supervisor
from tts_streamer.supervisor.signals import serve_shutdown_signals
from tts_streamer.supervisor.speaking_parts import local_store_warning
from tts_streamer.supervisor.speaking_recovery import LivenessConfig, OrphanSweeper
from tts_streamer.supervisor.speakings import SpeakingService, StopRetry
from tts_streamer.supervisor.speeches import (
    MediaCache,
    SpeechService,
    media_base_url,
    media_url_port,
    offline_engine_name,
)
from tts_streamer.supervisor.streamings import StreamingService

log = logging.getLogger(__name__)

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


def request_deadlines(config: DaemonConfig) -> RequestDeadlines:
    """Callers give up after REQUEST_TIMEOUT; the per-pod queue's TTL bounds the broker's share."""
    return RequestDeadlines(
        caller_timeout=config.request_timeout,
        broker_wait={config.pod_queue: config.per_pod_message_ttl_ms / 1000},
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


async def run_daemon(
    config: DaemonConfig,
    *,
    engines: Mapping[str, VoiceEngine] | None = None,
    dialer: Dialer | None = None,
    handle_signals: bool = True,
    task_status: trio.TaskStatus[DaemonHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    unavailable: dict[str, str] = {}
    if engines is None:
        engines, unavailable = engines_from_environment()
    engines = dict(engines)
    for vendor, reason in sorted(unavailable.items()):
        log.warning("voice %s unavailable: %s", vendor, reason)
    if config.default_engine not in engines:
        # A startup error naming the variable (exit 2 from `serve`), not a traceback from the supervisor.
        raise ConfigError(f"DEFAULT_ENGINE={config.default_engine!r}: not one of {sorted(engines)}")
    if config.speaking_owner_timeout < 2 * config.speaking_heartbeat_interval:
        raise ConfigError(
            f"SPEAKING_OWNER_TIMEOUT={config.speaking_owner_timeout:g}: must be at least twice "
            f"SPEAKING_HEARTBEAT_INTERVAL ({config.speaking_heartbeat_interval:g}), or live pods look dead"
        )
    bus = EventBus()
    publisher = EventPublisher(capacity=config.event_buffer, max_bytes=config.event_max_bytes)
    shutdown = trio.Event()
    session_config = SessionConfig(
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
    metrics = Metrics()
    readiness = Readiness(vendors_unavailable=unavailable)
    async with trio.open_nursery() as root:
        if handle_signals:
            await root.start(serve_shutdown_signals, shutdown)
        async with open_supervisor(
            engines=engines,
            default_engine=config.default_engine,
            dialer=dialer or websocket_dialer(),
            events=bus,
            config=session_config,
            # The drain already had DRAIN_TIMEOUT; what is left after it gets one close timeout.
            stop_grace=session_config.timeouts.close,
        ) as supervisor:
            metrics.attach(bus, supervisor)
            # Connections, TLS and credentials up before the first call (bounded; a failure is a
            # readiness detail, never fatal: that vendor's first call pays for its set-up).
            root.start_soon(_warm_voices, engines, readiness, config.voice_warmup_timeout, name="warm-up")
            # Health and the console come up first: liveness answers (and readiness says why not)
            # while the broker is still unreachable.
            http_port = await root.start(
                partial(
                    serve_http, supervisor, readiness, metrics, host=config.http_host, port=config.http_port
                )
            )
            console_address = await root.start(_console(config, supervisor, bus, metrics))
            with trio.CancelScope() as lifetime:
                connected = False

                async def abort_connecting() -> None:
                    await shutdown.wait()
                    if not connected:
                        lifetime.cancel(reason="shutdown before the broker was reached")

                root.start_soon(abort_connecting, name="abort-connecting")
                log.info("pod %s connecting to the broker", config.pod_id)
                async with open_amqp_bridge(
                    config.rabbitmq_address, topology(config), broker_timeout=config.amqp_timeout
                ) as bridge:
                    connected = True
                    metrics.attach_broker(bridge, publisher)
                    root.start_soon(publisher.serve, bridge, name="event-publisher")
                    root.start_soon(_track_readiness, readiness, bridge, name="readiness")
                    async with (
                        open_speaking_store(config.database_dsn, config.sqlite_path) as store,
                        trio.open_nursery() as services,
                    ):
                        log.info("speakings store: %s", store.describe())
                        readiness.speakings_store_warning = local_store_warning(store.is_sqlite, os.environ)
                        if readiness.speakings_store_warning:
                            log.warning("%s", readiness.speakings_store_warning)
                        call_manager = CallManager(bridge, config.call_manager_timeout)
                        streamings = StreamingService(
                            supervisor,
                            call_manager,
                            publisher,
                            services,
                            pod_id=config.pod_id,
                            create_timeout=config.create_timeout,
                            max_text_bytes=config.max_text_bytes,
                            metrics=metrics,
                            flow_manager=FlowManager(bridge, config.flow_manager_timeout),
                        )
                        bus.add_listener(streamings.on_session_event)
                        speakings = SpeakingService(
                            store,
                            streamings,
                            publisher,
                            services,
                            pod_id=config.pod_id,
                            engines=engines.keys(),
                            max_text_bytes=config.max_text_bytes,
                            stop_retry=StopRetry(give_up_after=config.speaking_stop_retry_timeout),
                            providers=ProviderResolver(
                                frozenset(engines), config.default_engine, unavailable, metrics
                            ),
                        )
                        streamings.add_end_listener(speakings.on_streaming_ended)
                        bus.add_listener(speakings.on_session_event)
                        sweeper = OrphanSweeper(
                            store,
                            publisher,
                            call_manager,
                            pod_id=config.pod_id,
                            config=LivenessConfig(
                                heartbeat_every=config.speaking_heartbeat_interval,
                                owner_timeout=config.speaking_owner_timeout,
                            ),
                            is_held=speakings.live.__contains__,
                        )
                        # Rows a crashed run of this pod left live, before serving (and before the
                        # first heartbeat overwrites that run's last one); retried there if it fails.
                        await sweeper.beat()
                        await services.start(sweeper.serve)
                        cache = MediaCache(config.media_dir, config.media_cache_max_bytes)
                        await cache.setup()
                        media_port = 0  # not served here: another web server serves MEDIA_DIR
                        if config.media_http_enabled:
                            media_port = await services.start(
                                partial(
                                    MediaHttpServer(config.media_dir, on_access=cache.touch).serve,
                                    config.media_http_host,
                                    config.media_http_port,
                                )
                            )
                        url_port = media_url_port(
                            config.media_url_port, media_port if config.media_http_enabled else None
                        )
                        speeches = SpeechService(
                            engines,
                            cache,
                            base_url=media_base_url(config.pod_ip, url_port),
                            offline_engine=offline_engine_name(engines, config.default_engine),
                            timeout=config.speech_timeout,
                        )
                        plane = CommandPlane(
                            bridge,
                            {**streamings.routes(), **speakings.routes(), **speeches.routes()},
                            pod_id=config.pod_id,
                            forward_timeout=config.delete_forward_timeout,
                            deadlines=request_deadlines(config),
                        )
                        metrics.attach_plane(plane.stats)
                        await services.start(plane.serve)
                        log.info(
                            "pod %s serving %s and %s", config.pod_id, config.shared_queue, config.pod_queue
                        )
                        task_status.started(
                            DaemonHandle(
                                config,
                                supervisor,
                                bus,
                                bridge,
                                streamings,
                                plane,
                                publisher,
                                shutdown,
                                metrics=metrics,
                                readiness=readiness,
                                http_port=http_port,
                                console_address=console_address,
                                speakings=speakings,
                                sweeper=sweeper,
                                speeches=speeches,
                                media_http_port=media_port,
                            )
                        )
                        await shutdown.wait()
                        readiness.draining = True
                        await _drain(config, bridge, supervisor, streamings, publisher, speakings)
                        services.cancel_scope.cancel(reason="shutdown")
        root.cancel_scope.cancel(reason="shutdown")
    log.info("pod %s stopped", config.pod_id)


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
    streamings: StreamingService,
    publisher: EventPublisher,
    speakings: SpeakingService | None = None,
) -> None:
    with trio.move_on_after(config.drain_timeout) as deadline:
        supervisor.accepting = False
        await bridge.stop_consuming()
        log.info("draining %d streaming(s)", len(streamings.streamings))
        await streamings.stop_all("shutdown")
        if speakings is not None:
            await speakings.drain()  # their rows stopped and speaking_stopped handed to the publisher
        await publisher.wait_drained()
    if speakings is not None:
        speakings.report_unwritten()  # stops whose rows the database never took: named in the log
    if deadline.cancelled_caught:
        log.warning(
            "drain overran %s s: %d session(s) and %d event(s) left",
            config.drain_timeout,
            len(supervisor),
            publisher.pending,
        )
