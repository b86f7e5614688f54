"""Shared helpers for the test suite: event recording, task-tree inspection, a supervisor on the simulator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import attrs
import trio

from tts_streamer.actors.events import SessionEvent
from tts_streamer.actors.media_socket import PacingConfig
from tts_streamer.actors.session import SessionConfig
from tts_streamer.adapters.chan_websocket.client import websocket_dialer
from tts_streamer.adapters.voice import VoiceEngine
from tts_streamer.simulator.asterisk import AsteriskSimulator, Dialer, memory_connector
from tts_streamer.supervisor.ops.console_views import task_tree
from tts_streamer.supervisor.sessions import Supervisor, open_supervisor

E = TypeVar("E", bound=SessionEvent)


@attrs.define
class RecordingSink:
    """An EventSink that keeps every event with the (virtual) time it was emitted."""

    events: list[tuple[float, SessionEvent]] = attrs.field(factory=list)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def emit(self, event: SessionEvent) -> None:
        self.events.append((trio.current_time(), event))
        self._changed.set()
        self._changed = trio.Event()

    def of(self, kind: type[E], call_id: str | None = None) -> list[E]:
        return [e for _, e in self.events if isinstance(e, kind) and call_id in (None, e.call_id)]

    def time_of(self, event: SessionEvent) -> float:
        return next(t for t, e in self.events if e is event)

    async def wait_for(
        self, kind: type[E], call_id: str | None = None, *, where: Callable[[E], bool] = lambda e: True
    ) -> E:
        while True:
            for event in self.of(kind, call_id):
                if where(event):
                    return event
            await self._changed.wait()


def task_names() -> list[str]:
    """Names of every live task in this Trio run."""
    return [task.name for _, task in task_tree(ordered=False)]


def tasks_of(call_id: str) -> list[str]:
    return [name for name in task_names() if f"[{call_id}]" in name]


# Most session tests reason frame by frame: they pin one frame per message and the 60 ms lead they
# were written for (serve ships 20 frames per message and a 300 ms lead, PacingConfig's defaults).
FRAME_PER_MESSAGE = PacingConfig(lead_frames=3, frames_per_message=1)


@asynccontextmanager
async def open_sim_supervisor(
    sim: AsteriskSimulator,
    engine: VoiceEngine,
    nursery: trio.Nursery,
    *,
    pacing: PacingConfig = FRAME_PER_MESSAGE,
    sink: RecordingSink | None = None,
    config: SessionConfig | None = None,
    dialer: Dialer | None = None,
) -> AsyncIterator[tuple[Supervisor, RecordingSink]]:
    sink = sink or RecordingSink()
    async with open_supervisor(
        engines={engine.name: engine},
        default_engine=engine.name,
        # The production client over in-memory streams: what ships, caller-audio filter included.
        dialer=dialer or websocket_dialer(connect=memory_connector(sim, nursery)),
        events=sink,
        config=config or SessionConfig(pacing=pacing),
    ) as supervisor:
        yield supervisor, sink


def media_uri(connection_id: str) -> str:
    return f"ws://asterisk.invalid:8088/media/{connection_id}"
