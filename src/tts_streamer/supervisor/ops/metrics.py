"""Prometheus metrics for the daemon, on a registry of its own (exposed by the HTTP server's /metrics).

Where the numbers come from:

- Session events, through one cheap inline listener on the EventBus: sessions ended by reason,
  WebSocket disconnects, flushes and frames dropped by them, vendor errors.
- The supervisor and the live sessions, read at scrape time: active sessions, sessions started, and
  frames sent. A session's frame count lives in its MediaSocket; when the session stops, its final count
  is added to a running total, so frames of ended sessions are never lost (and never counted twice:
  the session leaves the live set in the same step).
- Pacing lateness: every session's LatenessRecorder gets an observer that drops each sample into a plain
  bucket array (a bisect and two additions, cheaper than prometheus_client's locked Histogram at 50
  samples per second per call); the histogram family is built from that array at scrape time. The
  observer is attached on the session's first ``Initiated`` event, which always comes before its first
  frame (no audio without a message).
- Flush-to-silence latency and command errors come from ``Supervisor.call``, the one way a service or
  the console reaches a session (``Metrics`` is the supervisor's ``CommandObserver`` once attached),
  and from the console's own refusals (``command_error``).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tts_streamer.actors import events as ev
from tts_streamer.actors.commands import CommandError
from tts_streamer.actors.session import Session
from tts_streamer.supervisor.event_bus import EventBus
from tts_streamer.supervisor.ops.console_views import task_tree
from tts_streamer.supervisor.sessions import Supervisor

if TYPE_CHECKING:
    from tts_streamer.adapters.amqp.bridge import AmqpBridge
    from tts_streamer.adapters.amqp.event_publisher import EventPublisher
    from tts_streamer.supervisor.services.command_plane import PlaneStats

log = logging.getLogger(__name__)

PREFIX = "tts_streamer_"
# Stopped reasons that mean the chan_websocket leg went away under us rather than being closed by us.
DISCONNECT_REASONS = frozenset({"hangup", "media_error"})
# Frames are due every 20 ms; anything near that is a pacing problem worth seeing in its own bucket.
LATENESS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FIRST_AUDIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


@attrs.define
class BucketHistogram:
    """A histogram as a bare bucket array: ``observe`` is what a per-frame hook can afford."""

    bounds: tuple[float, ...]
    _counts: list[int] = attrs.field(init=False)
    total: float = 0.0

    def __attrs_post_init__(self) -> None:
        self._counts = [0] * (len(self.bounds) + 1)  # the last slot is +Inf

    def observe(self, value: float) -> None:
        # bisect_left finds the first bound >= value: Prometheus buckets are "less than or equal".
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip((*self.bounds, float("inf")), self._counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.total)


class _ScrapeCollector(Collector):
    """Families computed at scrape time from the supervisor, the live sessions and running totals."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        metrics = self._metrics
        supervisor = metrics.supervisor
        started = CounterMetricFamily(
            PREFIX + "sessions_started", "Sessions that connected and received MEDIA_START."
        )
        started.add_metric([], supervisor.sessions_started if supervisor else 0)
        yield started
        failed = CounterMetricFamily(
            PREFIX + "sessions_failed_to_start", "Sessions whose media socket could not be set up."
        )
        failed.add_metric([], supervisor.sessions_failed_to_start if supervisor else 0)
        yield failed
        frames = CounterMetricFamily(PREFIX + "frames_sent", "Audio frames written to chan_websocket legs.")
        frames.add_metric([], metrics.frames_sent())
        yield frames
        yield metrics.lateness.family(
            PREFIX + "pacing_lateness_seconds",
            "How late each audio message went out against its pacing slot.",
        )
        yield from _broker_families(metrics.bridge, metrics.publisher)
        yield from _plane_families(metrics.plane)
        tasks = GaugeMetricFamily(
            PREFIX + "tasks", "Live Trio tasks in the process (flat when idle: a leaked task shows here)."
        )
        tasks.add_metric([], count_tasks())
        yield tasks


def _broker_families(bridge: AmqpBridge | None, publisher: EventPublisher | None) -> Iterable[Metric]:
    connected = GaugeMetricFamily(
        PREFIX + "broker_connected", "1 while the AMQP connection and channel are open, else 0."
    )
    connected.add_metric([], 1 if bridge is not None and bridge.connected else 0)
    yield connected
    reconnects = CounterMetricFamily(
        PREFIX + "broker_reconnects", "Times the AMQP connection was re-established after a loss."
    )
    reconnects.add_metric([], bridge.stats.reconnects if bridge is not None else 0)
    yield reconnects
    published = CounterMetricFamily(PREFIX + "events_published", "Events the broker confirmed.")
    published.add_metric([], publisher.published if publisher is not None else 0)
    yield published
    dropped = CounterMetricFamily(
        PREFIX + "events_dropped", "Events dropped because the buffer was full during a broker outage."
    )
    dropped.add_metric([], publisher.dropped if publisher is not None else 0)
    yield dropped
    pending = GaugeMetricFamily(PREFIX + "events_pending", "Events waiting for the broker.")
    pending.add_metric([], publisher.pending if publisher is not None else 0)
    yield pending
    refused = CounterMetricFamily(
        PREFIX + "events_refused",
        "Events dropped because they could never be published: too_large (over EVENT_MAX_BYTES) or "
        "broker_refused (the broker nacked or rejected that message), by event type.",
        labels=["type", "reason"],
    )
    for (event_type, reason), count in sorted(publisher.refused.items() if publisher is not None else ()):
        refused.add_metric([event_type, reason], count)
    yield refused


NOT_STARTED_REASONS = ("timeout", "timestamp", "caller_gone", "caller_unknown", "redelivered", "ack_failed")


def _plane_families(plane: PlaneStats | None) -> Iterable[Metric]:
    not_started = CounterMetricFamily(
        PREFIX + "requests_not_started",
        "Requests taken off the broker but not started, by reason: timeout/timestamp (the caller can no "
        "longer be waiting), caller_gone/caller_unknown (a create whose reply queue is gone / could not "
        "be checked), redelivered, ack_failed (at most once).",
        labels=["reason"],
    )
    for reason in NOT_STARTED_REASONS:
        not_started.add_metric([reason], plane.not_started[reason] if plane is not None else 0)
    yield not_started


def count_tasks() -> int:
    """Every live task of the current Trio run (0 outside one): about 1 us per task, paid per scrape,
    never per frame."""
    return sum(1 for _ in task_tree(ordered=False))


class Metrics:
    """The daemon's metric families. ``attach`` once to the bus and supervisor; scrape with ``render``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.supervisor: Supervisor | None = None
        self.bridge: AmqpBridge | None = None  # set while the daemon is connected (attach_broker)
        self.publisher: EventPublisher | None = None
        self.plane: PlaneStats | None = None
        self.lateness = BucketHistogram(LATENESS_BUCKETS)
        self._live: dict[str, Session] = {}  # sessions seen speaking, until their Stopped event
        self._frames_sent_by_ended = 0
        registry = self.registry
        self.active_sessions = Gauge(
            PREFIX + "active_sessions", "Sessions currently running.", registry=registry
        )
        self.active_sessions.set_function(lambda: len(self.supervisor) if self.supervisor else 0)
        self.sessions_ended = Counter(
            PREFIX + "sessions_ended", "Sessions that ended, by reason.", ["reason"], registry=registry
        )
        self.websocket_disconnects = Counter(
            PREFIX + "websocket_disconnects",
            "Sessions ended by the chan_websocket leg closing or failing (hangup, media_error).",
            ["reason"],
            registry=registry,
        )
        self.flushes = Counter(PREFIX + "flushes", "Completed flushes (FLUSH_MEDIA sent).", registry=registry)
        self.frames_dropped_by_flush = Counter(
            PREFIX + "frames_dropped_by_flush",
            "Queued audio frames discarded by flushes before reaching Asterisk.",
            registry=registry,
        )
        self.flush_to_silence = Histogram(
            PREFIX + "flush_to_silence_seconds",
            "From a flush command's arrival to FLUSH_MEDIA being sent (queues dropped; the vendor is "
            "released concurrently).",
            buckets=FLUSH_BUCKETS,
            registry=registry,
        )
        self.vendor_first_audio = Histogram(
            PREFIX + "vendor_first_audio_seconds",
            "From sending text to a vendor stream to its first audio chunk, per vendor.",
            ["vendor"],
            buckets=FIRST_AUDIO_BUCKETS,
            registry=registry,
        )
        self.vendor_errors = Counter(
            PREFIX + "vendor_errors",
            "Vendor stream failures, by vendor and kind.",
            ["vendor", "kind"],
            registry=registry,
        )
        self.command_errors = Counter(
            PREFIX + "command_errors",
            "Refused commands from any command plane, by kind.",
            ["kind"],
            registry=registry,
        )
        self.provider_unavailable = Counter(
            PREFIX + "provider_unavailable",
            "Requests naming a provider the daemon has no voice for, spoken by the fallback instead.",
            ["provider", "fallback"],
            registry=registry,
        )
        registry.register(_ScrapeCollector(self))
        ProcessCollector(registry=registry)  # process_resident_memory_bytes, CPU seconds, open fds

    def attach(self, bus: EventBus, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        supervisor.observer = self
        bus.add_listener(self._on_event)

    def attach_broker(self, bridge: AmqpBridge | None, publisher: EventPublisher | None) -> None:
        self.bridge, self.publisher = bridge, publisher

    def attach_plane(self, plane: PlaneStats | None) -> None:
        self.plane = plane

    # -- for command planes ------------------------------------------------------------------------

    def command_error(self, kind: str) -> None:
        self.command_errors.labels(kind=kind).inc()

    def observe_flush(self, seconds: float) -> None:
        self.flush_to_silence.observe(seconds)

    def provider_fell_back(self, provider: str, fallback: str) -> None:
        self.provider_unavailable.labels(provider, fallback).inc()

    # -- scraping ----------------------------------------------------------------------------------

    def frames_sent(self) -> int:
        live = sum(s.media.stats.frames_sent for s in self._live.values() if s.media is not None)
        return self._frames_sent_by_ended + live

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its content type (generate_latest writes text format 0.0.4, which
        every Prometheus version reads; CONTENT_TYPE_LATEST would claim 1.0.0)."""
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4

    # -- the event listener (inline in the emitting session: cheap, never raises) -------------------

    def _on_event(self, event: ev.SessionEvent) -> None:
        try:
            self._count(event)
        except Exception:
            # A metrics bug must never reach the session that emitted the event.
            log.exception("metrics: failed to count %r", event)

    def _count(self, event: ev.SessionEvent) -> None:
        if isinstance(event, ev.Initiated):
            self._track(event.call_id)
        elif isinstance(event, ev.VendorFirstAudio):
            self.vendor_first_audio.labels(vendor=event.vendor).observe(event.seconds)
        elif isinstance(event, ev.Flushed):
            self.flushes.inc()
            self.frames_dropped_by_flush.inc(event.frames_dropped)
        elif isinstance(event, ev.SessionError) and event.kind.startswith("vendor_"):
            self.vendor_errors.labels(vendor=self._vendor_of(event), kind=event.kind[len("vendor_") :]).inc()
        elif isinstance(event, ev.Stopped):
            self.sessions_ended.labels(reason=event.reason).inc()
            if event.reason in DISCONNECT_REASONS:
                self.websocket_disconnects.labels(reason=event.reason).inc()
            session = self._live.pop(event.call_id, None)
            if session is not None and session.media is not None:
                self._frames_sent_by_ended += session.media.stats.frames_sent

    def _track(self, call_id: str) -> None:
        if call_id in self._live or self.supervisor is None:
            return
        try:
            session = self.supervisor.get(call_id)
        except CommandError:
            return  # not (or no longer) supervised: nothing of it to scrape
        self._live[call_id] = session
        if session.media is not None and session.media.stats.lateness.observer is None:
            session.media.stats.lateness.observer = self.lateness.observe

    def _vendor_of(self, event: ev.SessionError) -> str:
        session = self._live.get(event.call_id)
        if session is not None:
            return session.engine.name
        # Sessions word vendor errors as "<engine>: <error>".
        return event.reason.partition(":")[0] or "unknown"


def metric_names(metrics: Metrics) -> Sequence[str]:
    """Every family name exposed, for docs and tests."""
    return sorted({family.name for family in metrics.registry.collect()})
