"""Does a queue exist? (A caller's reply queue, before a create: issue 14 §4.)

A passive declare of a missing queue (404), or of another connection's exclusive queue (405, which means
it exists), closes the AMQP channel it ran on, so every probe needs a channel of its own. aio-pika keeps a
little of every channel a connection ever opened (a Task, a Lock, a callback: ~3.7 KiB measured, the
pattern of mosquito/aio-pika#490), so probing on the daemon's one long-lived connection leaked that much
per create (+23 MiB in a 10-minute soak). The probes therefore run on a connection of their own, which is
closed and replaced after ``uses`` probes: what aio-pika keeps goes with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aio_pika
import aiormq
import attrs
import trio
import trio_asyncio

log = logging.getLogger(__name__)

T = TypeVar("T")

PROBE_CONNECTION_USES = 200  # ~0.7 MiB kept by aio-pika at most, one connection set-up per 200 creates
_BROKER_ERRORS = (
    aio_pika.exceptions.AMQPError,
    ConnectionError,
    OSError,
    RuntimeError,
    asyncio.CancelledError,
)


@attrs.define(eq=False)
class _ProbeConnection:
    connection: aio_pika.abc.AbstractConnection
    used: int = 0
    in_flight: int = 0


class QueueProbe:
    def __init__(self, url: str, timeout: float, *, uses: int = PROBE_CONNECTION_USES) -> None:
        self.probes = 0
        self.connections_opened = 0
        self._url = url
        self._timeout = timeout
        self._uses = uses
        self._current: _ProbeConnection | None = None
        self._lock = trio.Lock()  # one connection set-up at a time; probes themselves run concurrently

    async def _aio(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        with trio.fail_after(self._timeout):
            result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
            return result

    async def exists(self, name: str) -> bool | None:
        """True or False; None when the broker cannot tell (unreachable, timed out).

        A connection the broker closed (an outage, a broker restart) is noticed by its first probe
        failing: that probe is retried once on a new connection."""
        for last_try in (False, True):
            try:
                probe = await self._take()
            except (trio.TooSlowError, *_BROKER_ERRORS) as exc:
                log.warning("could not tell whether queue %s exists: no probe connection: %s", name, exc)
                return None
            self.probes += 1
            answer: bool | None = None
            try:
                answer = await self._probe(probe.connection, name, quiet=not last_try)
            finally:
                probe.in_flight -= 1
                if answer is None and self._current is probe:
                    self._current = None  # broken: the next probe gets a new connection
                if probe is not self._current and probe.in_flight == 0:
                    await self._close(probe.connection)  # retired: the last probe on it closes it
            if answer is not None:
                return answer
        return None

    async def _probe(
        self, connection: aio_pika.abc.AbstractConnection, name: str, *, quiet: bool
    ) -> bool | None:
        channel = aio_pika.Channel(connection=connection, publisher_confirms=False)
        try:
            await self._aio(channel.initialize)
            await self._aio(channel.declare_queue, name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        except aiormq.exceptions.ChannelLockedResource:
            return True  # exclusive to the caller's connection: it is there
        except (trio.TooSlowError, *_BROKER_ERRORS) as exc:
            if not quiet:
                log.warning("could not tell whether queue %s exists: %s", name, exc)
            return None
        finally:
            if not channel.is_closed:
                with trio.CancelScope(shield=True):
                    try:
                        await self._aio(channel.close)
                    except (trio.TooSlowError, *_BROKER_ERRORS):
                        pass
        return True

    async def _take(self) -> _ProbeConnection:
        async with self._lock:
            current = self._current
            if current is not None and (current.connection.is_closed or current.used >= self._uses):
                self._current = None
                if current.in_flight == 0:
                    await self._close(current.connection)
            if self._current is None:
                self._current = _ProbeConnection(await self._aio(aio_pika.connect, self._url))
                self.connections_opened += 1
            self._current.used += 1
            self._current.in_flight += 1
            return self._current

    async def open(self) -> None:
        """Connect now (best effort), so the connection is part of an idle daemon from its start
        rather than appearing at its first create; a failure is retried by the first probe."""
        try:
            probe = await self._take()
        except (trio.TooSlowError, *_BROKER_ERRORS) as exc:
            log.warning("reply-queue probe connection not opened yet: %s", exc)
            return
        probe.used -= 1
        probe.in_flight -= 1

    async def aclose(self) -> None:
        if self._current is not None:
            await self._close(self._current.connection)
            self._current = None

    async def _close(self, connection: aio_pika.abc.AbstractConnection) -> None:
        with trio.CancelScope(shield=True):
            try:
                await self._aio(connection.close)
            except (trio.TooSlowError, *_BROKER_ERRORS):
                pass
