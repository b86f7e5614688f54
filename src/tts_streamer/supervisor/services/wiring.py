"""The voipbin services as one ``open_*`` piece: built from the configuration on a connected bridge, with
the session supervisor serving inside their scope, so a session that ends (even at the very end of a
shutdown) still has the services' nursery, call-manager and the publisher to report to.

Inside out on exit: sessions stopped (bounded by one socket close), then the command plane, the
sweeper and the media HTTP server cancelled, then the speakings store closed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial

import attrs
import trio

from tts_streamer.adapters.amqp.bridge import AmqpBridge
from tts_streamer.adapters.amqp.event_publisher import EventPublisher
from tts_streamer.adapters.media_files import MediaCache
from tts_streamer.adapters.speaking_store import open_speaking_store
from tts_streamer.adapters.voipbin.call_manager import CallManager
from tts_streamer.adapters.voipbin.flow_manager import FlowManager
from tts_streamer.supervisor.config import DaemonConfig
from tts_streamer.supervisor.event_bus import EventBus
from tts_streamer.supervisor.services.command_plane import CommandPlane
from tts_streamer.supervisor.services.delivery_source import RequestDeadlines
from tts_streamer.supervisor.services.media_http import MediaHttpServer
from tts_streamer.supervisor.services.providers import FallbackCounter, ProviderResolver
from tts_streamer.supervisor.services.speaking_parts import local_store_warning
from tts_streamer.supervisor.services.speaking_recovery import LivenessConfig, OrphanSweeper
from tts_streamer.supervisor.services.speakings import SpeakingService, StopRetry
from tts_streamer.supervisor.services.speeches import (
    SpeechService,
    media_base_url,
    media_url_port,
    offline_engine_name,
)
from tts_streamer.supervisor.services.streamings import StreamingService
from tts_streamer.supervisor.sessions import Supervisor

log = logging.getLogger(__name__)


def request_deadlines(config: DaemonConfig) -> RequestDeadlines:
    """Callers give up after REQUEST_TIMEOUT; the per-pod queue's TTL bounds the broker's share."""
    return RequestDeadlines(
        caller_timeout=config.request_timeout,
        broker_wait={config.pod_queue: config.per_pod_message_ttl_ms / 1000},
    )


@attrs.frozen
class Services:
    streamings: StreamingService
    speakings: SpeakingService
    sweeper: OrphanSweeper
    speeches: SpeechService
    plane: CommandPlane
    media_http_port: int  # 0: MEDIA_DIR is served by another web server
    store_warning: str  # the speakings store is a local file although other pods may share the queue


@asynccontextmanager
async def open_services(
    config: DaemonConfig,
    supervisor: Supervisor,
    bridge: AmqpBridge,
    publisher: EventPublisher,
    bus: EventBus,
    fallbacks: FallbackCounter | None,
    unavailable: Mapping[str, str],
) -> AsyncIterator[Services]:
    """Every route served on ``bridge`` until the body ends; the sessions run inside."""
    engines = supervisor.engines
    async with (
        open_speaking_store(config.database_dsn, config.sqlite_path) as store,
        trio.open_nursery() as nursery,
    ):
        async with supervisor.serving(stop_grace=supervisor.config.timeouts.close):
            log.info("speakings store: %s", store.describe())
            store_warning = local_store_warning(store.is_sqlite, os.environ)
            if store_warning:
                log.warning("%s", store_warning)
            call_manager = CallManager(bridge, config.call_manager_timeout)
            streamings = StreamingService(
                supervisor,
                call_manager,
                publisher,
                nursery,
                pod_id=config.pod_id,
                create_timeout=config.create_timeout,
                flow_manager=FlowManager(bridge, config.flow_manager_timeout),
            )
            bus.add_listener(streamings.on_session_event)
            speakings = SpeakingService(
                store,
                streamings,
                publisher,
                nursery,
                pod_id=config.pod_id,
                engines=engines.keys(),
                max_text_bytes=config.max_text_bytes,
                stop_retry=StopRetry(give_up_after=config.speaking_stop_retry_timeout),
                providers=ProviderResolver(frozenset(engines), config.default_engine, unavailable, fallbacks),
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
            # Rows a crashed run of this pod left live, before serving (and before the first heartbeat
            # overwrites that run's last one); retried there if it fails.
            await sweeper.beat()
            await nursery.start(sweeper.serve)
            cache = MediaCache(config.media_dir, config.media_cache_max_bytes)
            await cache.setup()
            media_port = 0
            if config.media_http_enabled:
                media_port = await nursery.start(
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
            await nursery.start(plane.serve)
            log.info("pod %s serving %s and %s", config.pod_id, config.shared_queue, config.pod_queue)
            yield Services(streamings, speakings, sweeper, speeches, plane, media_port, store_warning)
        nursery.cancel_scope.cancel(reason="shutdown")
