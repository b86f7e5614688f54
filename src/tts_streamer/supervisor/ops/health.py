"""Health and metrics over HTTP: ``/health/live``, ``/health/ready`` and ``/metrics`` (default port 9090).

The routes of the daemon's small h11 server (adapters/http_serving.py, which holds every limit and
timeout), and the readiness the daemon keeps up to date.
"""

from __future__ import annotations

import attrs
import trio

from tts_streamer.adapters.http_serving import Handler, HttpRequest, HttpResponse, HttpServer, HttpTimeouts
from tts_streamer.supervisor.ops.metrics import Metrics
from tts_streamer.supervisor.sessions import Supervisor

# -- readiness ----------------------------------------------------------------------------------------


@attrs.define
class Readiness:
    """What decides ``/health/ready``; the daemon flips these as its command plane and lifecycle move."""

    command_plane_connected: bool = False
    draining: bool = False
    # Detail, not a readiness failure: requests for these fall back to another voice.
    vendors_unavailable: dict[str, str] = attrs.field(factory=dict)
    # Detail, not a readiness failure: the speakings' store is a local file although other pods may
    # serve the same shared queue (docs/deploy.md); empty when the store is shared.
    speakings_store_warning: str = ""
    # Start-up warm-up of the cloud voices (bounded by VOICE_WARMUP_TIMEOUT): not ready meanwhile, so
    # a first call does not land on a cold pod; those that failed to warm are detail, not a failure.
    vendors_warming: bool = False
    vendors_not_warmed: dict[str, str] = attrs.field(factory=dict)

    def reasons(self, supervisor: Supervisor | None = None) -> list[str]:
        """Why the daemon is not ready (empty when it is); stable codes for probes and dashboards."""
        reasons: list[str] = []
        if not self.command_plane_connected:
            reasons.append("command_plane_disconnected")
        if self.draining:
            reasons.append("draining")
        if self.vendors_warming:
            reasons.append("vendors_warming")
        if supervisor is not None and not supervisor.accepting:
            reasons.append("not_accepting_sessions")
        return reasons

    def ready(self, supervisor: Supervisor | None = None) -> bool:
        return not self.reasons(supervisor)


# -- the daemon's endpoints -----------------------------------------------------------------------------


def health_routes(
    supervisor: Supervisor, readiness: Readiness, metrics: Metrics
) -> dict[tuple[str, str], Handler]:
    async def live(_request: HttpRequest) -> HttpResponse:
        # Answering at all is the proof: this runs on the same Trio loop as every session.
        return HttpResponse.text(200, "ok")

    async def ready(_request: HttpRequest) -> HttpResponse:
        reasons = readiness.reasons(supervisor)
        detail: dict[str, object] = {
            "vendors_unavailable": readiness.vendors_unavailable,
            "vendors_not_warmed": readiness.vendors_not_warmed,
        }
        if readiness.speakings_store_warning:
            detail["speakings_store_warning"] = readiness.speakings_store_warning
        if reasons:
            return HttpResponse.json(503, {"ready": False, "reasons": reasons, **detail})
        return HttpResponse.json(200, {"ready": True, "reasons": [], **detail})

    async def scrape(_request: HttpRequest) -> HttpResponse:
        body, content_type = metrics.render()
        return HttpResponse(200, body, content_type)

    return {("GET", "/health/live"): live, ("GET", "/health/ready"): ready, ("GET", "/metrics"): scrape}


async def serve_http(
    supervisor: Supervisor,
    readiness: Readiness,
    metrics: Metrics,
    *,
    host: str = "0.0.0.0",
    port: int = 9090,
    timeouts: HttpTimeouts = HttpTimeouts(),
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the health and metrics endpoints until cancelled; ``nursery.start`` returns the bound port."""
    server = HttpServer(health_routes(supervisor, readiness, metrics), timeouts=timeouts)
    await server.serve(host, port, task_status=task_status)
