"""SIGINT/SIGTERM handling: stop every session through the normal path, then end the daemon."""

from __future__ import annotations

import logging
import signal

import trio

from tts_streamer.supervisor.sessions import Supervisor

log = logging.getLogger(__name__)


async def serve_shutdown_signals(
    supervisor: Supervisor,
    scope: trio.CancelScope,
    *,
    grace: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """On the first SIGINT/SIGTERM: refuse new sessions, stop live ones within ``grace``, cancel ``scope``."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: stopping %d session(s)", signal.Signals(signum).name, len(supervisor))
            await supervisor.stop_all("shutdown", grace)
            scope.cancel(reason=f"signal {signal.Signals(signum).name}")
            return
