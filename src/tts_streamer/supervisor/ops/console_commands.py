"""The admin console's commands: parsing them and running them against the supervisor.

Output is one line per row. Tables have a header line and whitespace-separated columns whose values
never contain spaces (free text is JSON-quoted), so ``awk`` works; ``--json`` turns every row into one
JSON object per line instead. Errors are one line: ``error: <kind>: <message>`` (or a JSON object with
``error``). The connection (console.py) adds the blank line that ends every response.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import attrs
import trio

from tts_streamer.actors.commands import Command, CommandError, SayAdd, SayFinish, SayFlush, SayInit
from tts_streamer.actors.session import Session
from tts_streamer.supervisor.event_bus import EventBus
from tts_streamer.supervisor.ops.console_memory import memory_report
from tts_streamer.supervisor.ops.console_parse import HELP, ConsoleError, Request, parse
from tts_streamer.supervisor.ops.console_views import (
    EventHistory,
    error_row,
    event_details,
    event_fields,
    event_name,
    event_table,
    follow_row,
    key_values,
    ms,
    table,
    walk_tasks,
)
from tts_streamer.supervisor.ops.metrics import Metrics
from tts_streamer.supervisor.sessions import Supervisor

# ConsoleError and parse were defined here: their importers keep working.
__all__ = ["ClientGone", "ConsoleCommands", "ConsoleError", "ConsoleIO", "Outcome", "parse"]

SESSION_COLUMNS = (
    "id",
    "state",
    "vendor",
    "age_s",
    "frames_sent",
    "queued_ms",
    "lateness_p99_ms",
    "last_event",
)
# A few milliseconds of work between checkpoints at most, so pacing deadlines are not missed.
_ROWS_PER_CHECKPOINT = 50


class ClientGone(Exception):
    """The console client disconnected, or stopped reading and hit the write timeout."""


class ConsoleIO(Protocol):
    """What a command may do with its connection beyond returning rows (used by ``events``)."""

    async def send_rows(self, rows: Sequence[str]) -> None:
        """Write rows now; raises ClientGone if the client went away or stopped reading."""
        ...

    async def wait_for_input(self) -> None:
        """Return once the client sent a line (consumed) or closed; raises ClientGone when it closed."""
        ...


@attrs.frozen
class Outcome:
    rows: list[str]
    close: bool = False


# -- the commands --------------------------------------------------------------------------------------


@attrs.define
class ConsoleCounters:
    connections_open: int = 0
    connections_total: int = 0
    commands: int = 0
    errors: int = 0


class ConsoleCommands:
    def __init__(
        self,
        supervisor: Supervisor,
        bus: EventBus,
        history: EventHistory,
        *,
        metrics: Metrics | None = None,
        command_timeout: float = 10.0,
    ) -> None:
        self.supervisor = supervisor
        self.bus = bus
        self.history = history
        self.metrics = metrics
        self.command_timeout = command_timeout
        self.counters = ConsoleCounters()
        self.started_at = trio.current_time()
        self._handlers: dict[str, Callable[[Request, ConsoleIO], Awaitable[list[str]]]] = {
            "sessions": self._sessions,
            "show": self._show,
            "say": self._say,
            "flush": self._flush,
            "finish": self._finish,
            "stop": self._stop,
            "tasks": self._tasks,
            "events": self._events,
            "stats": self._stats,
            "memory": self._memory,
            "help": self._help,
        }

    async def execute(self, line: str, io: ConsoleIO) -> Outcome:
        if not line.strip():
            return Outcome([])
        self.counters.commands += 1
        as_json = "--json" in line.split()
        try:
            request = parse(line)
            as_json = request.json
            if request.name == "quit":
                return Outcome([json.dumps({"ok": True}) if as_json else "bye"], close=True)
            return Outcome(await self._handlers[request.name](request, io))
        except ConsoleError as exc:
            self._count_error(exc.kind)
            return Outcome([error_row(exc.kind, str(exc), as_json=as_json)])
        except CommandError as exc:
            # Already counted in metrics where it was raised (Supervisor.call or _session).
            self.counters.errors += 1
            return Outcome([error_row(exc.kind, str(exc), as_json=as_json)])

    def _count_error(self, kind: str) -> None:
        self.counters.errors += 1
        if self.metrics is not None:
            self.metrics.command_error(kind)

    def _session(self, call_id: str) -> Session:
        try:
            return self.supervisor.get(call_id)
        except CommandError as exc:
            if self.metrics is not None:
                self.metrics.command_error(exc.kind)
            raise

    async def _call(self, call_id: str, command: Command, *, count_errors: bool = True) -> str | int | None:
        """Into a session by the path the services take too (``Supervisor.call``, which counts refusals
        and flush-to-silence); bounded, so a wedged session cannot wedge the console. Uncounted: straight
        to the session, for an attempt whose refusal is not an error yet."""
        with trio.move_on_after(self.command_timeout):
            if count_errors:
                return await self.supervisor.call(call_id, command)
            return await self.supervisor.get(call_id).call(command)
        raise ConsoleError(
            "timeout", f"no reply within {self.command_timeout:g} s (the command stays queued in the session)"
        )

    # -- read-only views ---------------------------------------------------------------------------

    def session_row(self, session: Session) -> dict[str, object]:
        media = session.media
        last = session.last_event
        return {
            "id": session.call_id,
            "state": session.state,
            "vendor": f"{session.engine.name}/{session.voice.voice_id or session.voice.language}",
            "age_s": round(trio.current_time() - session.started_at, 1),
            "frames_sent": media.stats.frames_sent if media else 0,
            "queued_ms": round(media.queued_ms) if media else 0,
            "lateness_p99_ms": ms(media.stats.lateness.percentile(99)) if media else 0.0,
            "last_event": event_name(last) if last is not None else None,
        }

    async def _sessions(self, request: Request, io: ConsoleIO) -> list[str]:
        rows = []
        for n, session in enumerate(self.supervisor, 1):
            rows.append(self.session_row(session))
            if n % _ROWS_PER_CHECKPOINT == 0:
                # Every session's media pacing shares this loop: never hold it for long.
                await trio.lowlevel.checkpoint()
        if request.json:
            return [json.dumps(row) for row in rows]
        return table(SESSION_COLUMNS, rows)

    async def _show(self, request: Request, io: ConsoleIO) -> list[str]:
        call_id = request.args[0]
        recent = self.history.recent(call_id)
        try:
            details = self._session_details(self.supervisor.get(call_id))
        except CommandError as exc:
            if not recent:
                if self.metrics is not None:
                    self.metrics.command_error(exc.kind)
                raise
            # Stopped a little while ago: its events are still worth showing.
            details = {"id": call_id, "state": "ended"}
        now = trio.current_time()
        event_rows = [
            {"ago_s": round(now - at, 3), "event": event_name(event), "details": event_details(event)}
            for at, _wall, event in recent
        ]
        if request.json:
            json_events = [
                {"ago_s": round(now - at, 3), "event": event_name(event), **event_fields(event)}
                for at, _wall, event in recent
            ]
            return [json.dumps({**details, "events": json_events})]
        lines = key_values(details)
        lines.append(f"events: {len(event_rows)} recent")
        if event_rows:
            lines += ["  " + row for row in event_table(event_rows)]
        return lines

    def _session_details(self, session: Session) -> dict[str, object]:
        details: dict[str, object] = {
            "id": session.call_id,
            "state": session.state,
            "media_uri": session.media_uri,
            "vendor": session.engine.name,
            "voice": session.voice.voice_id or session.voice.language,
            "age_s": round(trio.current_time() - session.started_at, 3),
            "message_id": session.message_id,
            "last_event": event_name(session.last_event) if session.last_event else None,
        }
        if session.connection is not None:
            start = session.connection.media_start
            details.update(
                connection_id=start.connection_id,
                channel=start.channel,
                format=start.format,
                ptime_ms=start.ptime,
                control_format=start.control_format.name.lower(),
                bridged=session.connection.bridged.is_set(),
                paused=session.connection.paused,
            )
        if session.media is not None:
            stats = session.media.stats
            details.update(
                frames_sent=stats.frames_sent,
                messages_sent=stats.messages_sent,
                queued_ms=round(session.media.queued_ms, 1),
                flushes=stats.flushes,
                frames_dropped_by_flush=stats.frames_dropped_by_flush,
                timeline_restarts=stats.timeline_restarts,
                lateness_p50_ms=ms(stats.lateness.percentile(50)),
                lateness_p99_ms=ms(stats.lateness.percentile(99)),
                lateness_max_ms=ms(stats.lateness.maximum),
                lateness_samples=stats.lateness.count,
            )
        return details

    async def _tasks(self, request: Request, io: ConsoleIO) -> list[str]:
        rows = []
        for n, row in enumerate(walk_tasks(), 1):
            rows.append(row)
            if n % (10 * _ROWS_PER_CHECKPOINT) == 0:
                await trio.lowlevel.checkpoint()  # as in _sessions; the view may then mix moments
        if request.json:
            return [json.dumps({"depth": depth, "name": name, "at": at}) for depth, name, at in rows]
        return [f"{'  ' * depth}{name}" + (f"  @ {at}" if at else "") for depth, name, at in rows]

    async def _stats(self, request: Request, io: ConsoleIO) -> list[str]:
        supervisor = self.supervisor
        trio_stats = trio.lowlevel.current_statistics()
        subscriptions = self.bus.subscriptions
        frames = self.metrics.frames_sent() if self.metrics is not None else None
        values: dict[str, object] = {
            "uptime_s": round(trio.current_time() - self.started_at, 1),
            "sessions_live": len(supervisor),
            "sessions_started": supervisor.sessions_started,
            "sessions_failed_to_start": supervisor.sessions_failed_to_start,
            "accepting": supervisor.accepting,
            "frames_sent": frames
            if frames is not None
            else sum(s.media.stats.frames_sent for s in supervisor if s.media is not None),
            "events_emitted": self.bus.emitted,
            "event_subscribers": len(subscriptions),
            "event_subscriber_drops": sum(s.dropped for s in subscriptions),
            "consoles_open": self.counters.connections_open,
            "consoles_total": self.counters.connections_total,
            "console_commands": self.counters.commands,
            "console_errors": self.counters.errors,
            "trio_tasks_living": trio_stats.tasks_living,
            "trio_tasks_runnable": trio_stats.tasks_runnable,
        }
        if request.json:
            return [json.dumps(values)]
        return key_values(values)

    async def _memory(self, request: Request, io: ConsoleIO) -> list[str]:
        values = memory_report(self.history, self.metrics.plane if self.metrics is not None else None)
        if request.json:
            return [json.dumps(values)]
        return key_values({k: "/".join(map(str, v)) if isinstance(v, list) else v for k, v in values.items()})

    async def _help(self, request: Request, io: ConsoleIO) -> list[str]:
        if request.json:
            return [json.dumps({"command": usage, "help": text}) for usage, text in HELP]
        width = max(len(usage) for usage, _ in HELP)
        lines = [f"{usage.ljust(width)}  {text}" for usage, text in HELP]
        lines.append("add --json to any command for one JSON object per row (say: right after 'say')")
        return lines

    # -- commands that act -------------------------------------------------------------------------

    async def _say(self, request: Request, io: ConsoleIO) -> list[str]:
        call_id, text = request.args
        session = self._session(call_id)
        if session.message_id is None:
            await self._call(call_id, SayInit())
        try:
            # Not counted yet: a message that is still playing out after "finish" is open but
            # finished, and the right move then is a new message, not an error.
            await self._call(call_id, SayAdd(text), count_errors=False)
        except CommandError as exc:
            if exc.kind not in {"message_finished", "no_message"}:
                if self.metrics is not None:
                    self.metrics.command_error(exc.kind)
                raise
            await self._call(call_id, SayInit())
            await self._call(call_id, SayAdd(text))
        message_id = session.message_id
        if request.json:
            return [json.dumps({"ok": True, "message_id": message_id})]
        return [f"ok message_id={message_id}"]

    async def _flush(self, request: Request, io: ConsoleIO) -> list[str]:
        started = trio.current_time()
        dropped = await self._call(request.args[0], SayFlush())
        took_ms = ms(trio.current_time() - started)
        if request.json:
            return [json.dumps({"ok": True, "frames_dropped": dropped, "took_ms": took_ms})]
        return [f"ok frames_dropped={dropped} took_ms={took_ms}"]

    async def _finish(self, request: Request, io: ConsoleIO) -> list[str]:
        await self._call(request.args[0], SayFinish())
        return [json.dumps({"ok": True})] if request.json else ["ok"]

    async def _stop(self, request: Request, io: ConsoleIO) -> list[str]:
        session = self._session(request.args[0])
        with trio.move_on_after(self.command_timeout):
            await session.stop()
            return [json.dumps({"ok": True})] if request.json else ["ok"]
        raise ConsoleError(
            "timeout", f"stop requested; the session did not end within {self.command_timeout:g} s"
        )

    async def _events(self, request: Request, io: ConsoleIO) -> list[str]:
        call_id = request.args[0] if request.args else None
        gone = False
        with self.bus.subscribe(f"console-events[{call_id or '*'}]") as subscription:
            if not request.json:
                target = f"session {call_id}" if call_id else "all sessions"
                await io.send_rows([f"# following events of {target}; send any line to stop"])

            async def forward(cancel_scope: trio.CancelScope) -> None:
                nonlocal gone
                dropped_reported = 0
                try:
                    async for event in subscription:
                        if call_id is not None and event.call_id != call_id:
                            continue
                        rows = []
                        if subscription.dropped > dropped_reported:
                            lost = subscription.dropped - dropped_reported
                            dropped_reported = subscription.dropped
                            rows.append(
                                json.dumps({"dropped": lost})
                                if request.json
                                else f"# {lost} event(s) dropped"
                            )
                        rows.append(follow_row(event, as_json=request.json))
                        await io.send_rows(rows)
                except ClientGone:
                    gone = True
                cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(forward, nursery.cancel_scope, name="console-events-forward")
                try:
                    await io.wait_for_input()
                except ClientGone:
                    gone = True
                nursery.cancel_scope.cancel()
        if gone:
            raise ClientGone
        return []
