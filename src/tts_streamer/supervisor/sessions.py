"""The session supervisor: one nursery, one session actor per call id.

A session that crashes is reported (its own error and stopped events) and removed; its neighbours never
notice, because every session task catches its own failures at its boundary. Stopping everything is
bounded: sessions get a grace period to close their sockets, then the rest is cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Protocol, overload

import trio

from tts_streamer.actors.commands import Command, CommandError, SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.actors.events import EventSink, StopReason
from tts_streamer.actors.session import Session, SessionConfig, SessionStartError
from tts_streamer.adapters.chan_websocket.client import Dialer
from tts_streamer.adapters.voice import VoiceEngine, VoiceSpec
from tts_streamer.pacer_clock import current_clock

log = logging.getLogger(__name__)


class UnknownSession(CommandError):
    def __init__(self, call_id: str) -> None:
        super().__init__("unknown_session", f"no session with id {call_id!r}")


class DuplicateSession(CommandError):
    def __init__(self, call_id: str) -> None:
        super().__init__("duplicate_session", f"a session with id {call_id!r} already exists")


class CommandObserver(Protocol):
    """Who counts what commands do (``ops/metrics.Metrics``): refusals by kind, flush-to-silence."""

    def command_error(self, kind: str) -> None: ...

    def observe_flush(self, seconds: float) -> None: ...


class Supervisor:
    """The live sessions by call id. Sessions run while ``serving()`` is entered (in its nursery); before
    that the supervisor can be read (health, the console) but starts none."""

    def __init__(
        self,
        nursery: trio.Nursery | None = None,
        *,
        engines: dict[str, VoiceEngine],
        default_engine: str,
        dialer: Dialer,
        events: EventSink,
        config: SessionConfig = SessionConfig(),
        observer: CommandObserver | None = None,
    ) -> None:
        if default_engine not in engines:
            raise ValueError(f"default engine {default_engine!r} is not among {sorted(engines)}")
        self.engines = engines
        self.default_engine = default_engine
        self.config = config
        self.sessions_started = 0
        self.sessions_failed_to_start = 0
        self.accepting = True
        self.observer = observer
        self._nursery = nursery
        self._dialer = dialer
        self._events = events
        self._sessions: dict[str, Session] = {}
        self._starting: set[str] = set()

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, call_id: str) -> Session:
        try:
            return self._sessions[call_id]
        except KeyError:
            raise UnknownSession(call_id) from None

    async def start_session(
        self, call_id: str, media_uri: str, *, engine: str | None = None, voice: VoiceSpec = VoiceSpec()
    ) -> Session:
        """Connect a new session; returns once MEDIA_START has arrived. Raises SessionStartError."""
        if not self.accepting:
            raise CommandError("draining", "not accepting new sessions")
        if self._nursery is None:
            raise CommandError("not_serving", "not serving yet (the broker is not reached)")
        if call_id in self._sessions or call_id in self._starting:
            raise DuplicateSession(call_id)
        engine_name = engine or self.default_engine
        if engine_name not in self.engines:
            raise CommandError("unknown_engine", f"unknown voice engine {engine_name!r}")
        session = Session(
            call_id,
            media_uri,
            engine=self.engines[engine_name],
            voice=voice,
            dialer=self._dialer,
            events=self._events,
            config=self.config,
        )
        self._starting.add(call_id)
        try:
            await self._nursery.start(self._run_session, session, name=f"session[{call_id}]")
        except SessionStartError:
            self.sessions_failed_to_start += 1
            raise
        finally:
            self._starting.discard(call_id)
        self.sessions_started += 1
        if not session.ended:  # it may already have ended between started() and here
            self._sessions[call_id] = session
        return session

    async def _run_session(self, session: Session, *, task_status: trio.TaskStatus[Session]) -> None:
        try:
            await session.run(task_status=task_status)
        except SessionStartError:
            raise
        except Exception:
            # Session.run handles its own failures after start; this is the last line of defence.
            log.exception("call=%s session task failed", session.call_id)
        finally:
            if self._sessions.get(session.call_id) is session:
                del self._sessions[session.call_id]

    @overload
    async def call(self, call_id: str, command: SayInit) -> str: ...
    @overload
    async def call(self, call_id: str, command: SayFlush) -> int: ...
    @overload
    async def call(self, call_id: str, command: SayAdd | SayFinish) -> None: ...
    @overload
    async def call(self, call_id: str, command: Command) -> str | int | None: ...

    async def call(self, call_id: str, command: Command) -> str | int | None:
        """Every service's and the console's one way into a session: the command, its result or its
        CommandError, and the observer told about it.

        A flush is timed from here (its arrival at the daemon) to FLUSH_MEDIA being written, which the
        session records: that is the flush-to-silence latency (its reply may come later, once the vendor
        stream is released too). Refusals are counted by kind.
        """
        started = trio.current_time()
        try:
            session = self.get(call_id)
            result = await session.call(command)
        except CommandError as exc:
            self.refused(exc.kind)
            raise
        if self.observer is not None and isinstance(command, SayFlush):
            silent_at = session.last_flush_silent_at
            if silent_at is None or silent_at < started:
                silent_at = trio.current_time()
            self.observer.observe_flush(silent_at - started)
        return result

    def refused(self, kind: str) -> None:
        """Count a refusal decided before any session saw the command (a stale message id)."""
        if self.observer is not None:
            self.observer.command_error(kind)

    async def stop(self, call_id: str, reason: StopReason = "stopped") -> None:
        await self.get(call_id).stop(reason)

    async def stop_all(self, reason: StopReason, grace: float) -> None:
        """Stop every session; those not done within ``grace`` seconds are abandoned to cancellation."""
        self.accepting = False
        with trio.move_on_after(grace):
            async with trio.open_nursery() as nursery:
                for session in self:
                    nursery.start_soon(session.stop, reason, name=f"stop[{session.call_id}]")

    @asynccontextmanager
    async def serving(self, stop_grace: float = 5.0) -> AsyncIterator[None]:
        """Run sessions for the body's duration; on exit every session is stopped cleanly, those not
        done within ``stop_grace`` seconds cancelled."""
        # The process-wide pacer clock (a system task) starts with serving, not with the first session,
        # so an idle daemon's task count includes it from the start.
        current_clock()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                yield
            finally:
                with trio.CancelScope(shield=True):
                    await self.stop_all("shutdown", stop_grace)
                self._nursery = None
                nursery.cancel_scope.cancel(reason="supervisor closing")


@asynccontextmanager
async def open_supervisor(
    *,
    engines: dict[str, VoiceEngine],
    default_engine: str,
    dialer: Dialer,
    events: EventSink,
    config: SessionConfig = SessionConfig(),
    stop_grace: float = 5.0,
    observer: CommandObserver | None = None,
) -> AsyncIterator[Supervisor]:
    """A supervisor serving for the body's duration; on exit every session is stopped cleanly."""
    supervisor = Supervisor(
        engines=engines,
        default_engine=default_engine,
        dialer=dialer,
        events=events,
        config=config,
        observer=observer,
    )
    async with supervisor.serving(stop_grace):
        yield supervisor
