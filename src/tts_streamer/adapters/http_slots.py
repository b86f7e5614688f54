"""Connection slots of the HTTP servers: a fixed number of connections, and always room for a new one.

An open TCP connection costs its client nothing, so with a plain limit anyone who can reach the port
fills it with connections that never send a request, and the probes behind them time out (issue 14,
§7: 70 idle connections made ``/health/live`` miss its 3 s, and the kubelet would have restarted the
pod). Here, when every slot is taken, the connection that has waited longest without a complete request
(an idle keep-alive connection, or one still sending its request) is closed to make room for the next;
if there is none, the connection whose response write has been blocked longest, once blocked for a grace
period (its client does not read: a slow-read attack holds slots just as well). A connection whose
request is being handled, or whose writes flow, is never closed for that; when every connection is, new
ones wait in the kernel's backlog, as before. The limit itself does not change.

The accept loop (adapters/serving.py) takes a slot before each accept; the server marks each of its
connections ``waiting`` (sheddable) or ``busy`` as it moves between reading a request and answering it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio

log = logging.getLogger(__name__)

_LOG_EVERY = 60.0  # at most one shedding warning a minute: a flood must not flood the log too


@attrs.define(eq=False)
class Slot:
    """One connection's standing: when it began waiting for a request (None: being answered), and
    when its current write began (None: not writing)."""

    waiting_since: float | None
    sending_since: float | None = None
    shed: bool = False  # chosen to make room: what it waits for is cancelled and the connection ends
    _scopes: list[trio.CancelScope] = attrs.field(factory=list)

    @contextmanager
    def receiving(self) -> Iterator[None]:
        """Wrap the wait for a request: shedding the connection cancels it; check ``shed`` after."""
        with trio.CancelScope() as scope:
            if self.shed:
                scope.cancel()
            self._scopes.append(scope)
            try:
                yield
            finally:
                self._scopes.remove(scope)

    def _cancel(self) -> None:
        self.shed = True
        for scope in self._scopes:
            scope.cancel()


class ConnectionSlots:
    """At most ``limit`` connections; at the limit, the longest-waiting idle one makes room."""

    def __init__(self, limit: int, *, name: str = "http", stall_grace: float = 1.0) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self.limit = limit
        self.name = name
        self.stall_grace = stall_grace
        self.shed_total = 0
        self.high_water = 0
        self._taken = 0
        self._connections: set[Slot] = set()
        self._changed = trio.Event()
        self._last_log = -_LOG_EVERY
        self._shed_since_log = 0

    @property
    def taken(self) -> int:
        return self._taken

    async def acquire(self) -> None:
        """A slot for the next connection, closing an idle one if that is what it takes."""
        while self._taken >= self.limit:
            look_again = self._make_room()
            changed = self._changed
            with trio.move_on_at(look_again):  # a write may stall past the grace meanwhile
                await changed.wait()
        self._taken += 1
        self.high_water = max(self.high_water, self._taken)

    def release(self) -> None:
        self._taken -= 1
        self._notify()

    @contextmanager
    def connection(self) -> Iterator[Slot]:
        """A connection's record for as long as it is served (it starts out waiting for a request)."""
        slot = Slot(waiting_since=trio.current_time())
        self._connections.add(slot)
        try:
            yield slot
        finally:
            # No wake-up here: the accept loop's release follows at once and does that.
            self._connections.discard(slot)

    def waiting(self, slot: Slot) -> None:
        """``slot`` waits for (or is receiving) a request: it may be closed to make room."""
        slot.waiting_since = trio.current_time()
        self._notify()  # an acquire blocked with every connection busy can now make room

    def busy(self, slot: Slot) -> None:
        """``slot`` has a complete request and is being answered: it is not closed to make room."""
        slot.waiting_since = None

    @contextmanager
    def sending(self, slot: Slot) -> Iterator[None]:
        """Wrap a write: one stalled for ``stall_grace`` (the client does not read) may be cut to make
        room when no connection is idle; check ``slot.shed`` after."""
        slot.sending_since = trio.current_time()
        try:
            with slot.receiving():
                yield
        finally:
            slot.sending_since = None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _make_room(self) -> float:
        """Close one connection if one may go; returns when to look again if none may yet."""
        if any(slot.shed for slot in self._connections):
            return math.inf  # one is already on its way out; its release wakes the accept loop
        waiting = [slot for slot in self._connections if slot.waiting_since is not None]
        now = trio.current_time()
        if waiting:
            victim = min(waiting, key=_waiting_since)
        else:
            writing = [slot for slot in self._connections if slot.sending_since is not None]
            if not writing:
                return math.inf  # every connection is being answered: the next one waits
            victim = min(writing, key=_sending_since)
            stalled_at = _sending_since(victim) + self.stall_grace
            if stalled_at > now:
                return stalled_at  # its write may still complete: look again then
        victim._cancel()
        self.shed_total += 1
        self._shed_since_log += 1
        now = trio.current_time()
        if now - self._last_log >= _LOG_EVERY:
            log.warning(
                "%s: at the connection limit (%d): closed %d idle, incomplete or stalled connection(s) "
                "to make room (%d in total)",
                self.name,
                self.limit,
                self._shed_since_log,
                self.shed_total,
            )
            self._last_log = now
            self._shed_since_log = 0
        return math.inf


def _waiting_since(slot: Slot) -> float:
    return math.inf if slot.waiting_since is None else slot.waiting_since


def _sending_since(slot: Slot) -> float:
    return math.inf if slot.sending_since is None else slot.sending_since
