"""Log configuration: JSON lines (structlog's renderer over the stdlib logging calls) or plain text.

Every record gets ``pod_id`` and, inside a session's tasks, ``call_id`` (from tts_streamer.logcontext),
so an operator can follow one call across the media, vendor and command-plane tasks.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from tts_streamer import logcontext


class _CallContext(logging.Filter):
    def __init__(self, pod_id: str) -> None:
        super().__init__()
        self._pod_id = pod_id

    def filter(self, record: logging.LogRecord) -> bool:
        record.pod_id = self._pod_id
        call = logcontext.call_id.get()
        if call is not None and not hasattr(record, "call_id"):
            record.call_id = call
        return True


def _copy_context_fields(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    record = event_dict.get("_record")
    if record is not None:
        for key in ("pod_id", "call_id"):
            value = getattr(record, key, None)
            if value is not None:
                event_dict[key] = value
    return event_dict


def configure_logging(level: str, *, pod_id: str, json: bool = True, stream: TextIO | None = None) -> None:
    """Route all stdlib logging to ``stream`` (stderr), as JSON lines by default."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_CallContext(pod_id))
    if json:
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                processors=[
                    # These read the stdlib record, so they run before it is stripped.
                    _copy_context_fields,
                    structlog.stdlib.add_log_level,
                    structlog.stdlib.add_logger_name,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.JSONRenderer(),
                ],
                foreign_pre_chain=[structlog.stdlib.ExtraAdder()],
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(pod_id)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
