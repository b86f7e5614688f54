"""docs/migrating.md names only real things: every tts-streamer variable in its environment table is one
the daemon reads, every ``tts_streamer_*`` metric is one it exports, and the metric table covers every
metric of the Go tts-manager (voipbin-wire.md §7)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.test_dashboards import exported_series
from tts_streamer.supervisor.ops.metrics import Metrics, metric_names

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "migrating.md").read_text()
# The Go service's metrics (prefix tts_manager_ unless unprefixed), from voipbin-wire.md §7.
GO_METRICS = [
    "receive_request_process_time",
    "streaming_created_total",
    "streaming_active",
    "streaming_ended_total",
    "streaming_duration_seconds",
    "streaming_message_total",
    "streaming_error_total",
    "streaming_language_total",
    "speech_request_total",
    "speech_create_duration_seconds",
    "speech_language_total",
    "speech_fallback_total",
    "hash_process_time",
    "gcp_synthesize_duration_seconds",
    "bucket_upload_process_time",
    "bucket_url_process_time",
    "request_process_time",
    "event_publish_total",
    "notify_process_time",
    "notify_total",
    "circuitbreaker_state",
    "circuitbreaker_state_transitions_total",
    "circuitbreaker_rejected_total",
    "rabbitmqhandler_event_retried_total",
    "rabbitmqhandler_event_dropped_total",
]


def _section(title: str) -> str:
    start = DOC.index(f"\n## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end > 0 else None]


def _table_cells(section: str, column: int) -> list[str]:
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [row.split(" | ")[column] for row in rows[1:]]


def _string_literals_in_source() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "src" / "tts_streamer").rglob("*.py"):
        found |= set(re.findall(r"\"([A-Z][A-Z0-9_]{2,})\"", path.read_text()))
    return found


def test_environment_table_names_variables_the_daemon_reads() -> None:
    read = _string_literals_in_source()
    cells = _table_cells(_section("Environment"), 1)
    named = {name.split("=")[0] for cell in cells for name in re.findall(r"`([A-Z][A-Z0-9_=.:a-z-]*)`", cell)}
    named = {name for name in named if re.fullmatch(r"[A-Z][A-Z0-9_]+", name)}
    assert {"RABBITMQ_ADDRESS", "DATABASE_DSN", "POD_ID", "HTTP_PORT", "DEFAULT_ENGINE"} <= named
    assert named - read == set(), "docs/migrating.md names variables no module reads"


TABLES = {"tts_streamer_pod"}


def test_metric_names_are_exported_and_go_metrics_are_all_mapped() -> None:
    known = exported_series() | set(metric_names(Metrics()))
    # Database tables share the prefix (tts_streamer_pod): not metrics.
    named = set(re.findall(r"\btts_streamer_[a-z0-9_]+", DOC)) - TABLES
    assert len(named) >= 15
    assert named - known == set(), "docs/migrating.md names metrics the daemon does not export"
    table = _section("Metrics: old -> new")
    assert [name for name in GO_METRICS if f"`{name}" not in table] == []


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_inside_the_doc_resolve() -> None:
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", DOC, re.MULTILINE)}
    links = set(re.findall(r"\]\(#([^)]+)\)", DOC))
    assert links and links - anchors == set()
    for target in re.findall(r"\]\(([\w./-]+\.md)\)", DOC):
        assert (ROOT / "docs" / target).is_file(), target
