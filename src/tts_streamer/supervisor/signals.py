"""SIGINT/SIGTERM: ask the daemon to shut down through its normal, bounded drain path."""

from __future__ import annotations

import logging
import signal

import trio

log = logging.getLogger(__name__)


async def serve_shutdown_signals(
    shutdown: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Set ``shutdown`` on the first SIGINT or SIGTERM (a second one is ignored: the drain is bounded)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if not shutdown.is_set():
                log.info("received %s: shutting down", signal.Signals(signum).name)
            shutdown.set()
