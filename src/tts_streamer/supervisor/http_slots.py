"""Connection slots of the HTTP servers: a fixed number of connections, and always room for a new one.

An open TCP connection costs its client nothing, so with a plain limit anyone who can reach the port
fills it with connections that never send a request, and the probes behind them time out (issue 14,
§7: 70 idle connections made ``/health/live`` miss its 3 s, and the kubelet would have restarted the
pod). Here, when every slot is taken, the connection that has waited longest without a complete request
(an idle keep-alive connection, or one still sending its request) is closed to make room for the next.
A connection whose request is being answered is never closed for that; when every connection is being
answered, new ones wait in the kernel's backlog, as before. The limit itself does not change.

The accept loop (supervisor/serving.py) takes a slot before each accept; the server marks each of its
connections ``waiting`` (sheddable) or ``busy`` as it moves between reading a request and answering it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import trio

log = logging.getLogger(__name__)

_LOG_EVERY = 60.0  # at most one shedding warning a minute: a flood must not flood the log too


@attrs.define(eq=False)
class Slot:
    """One connection's standing: when it began waiting for a request (None: being answered)."""

    waiting_since: float | None
    shed: bool = False  # chosen to make room: its next (or current) receive ends the connection
    _scope: trio.CancelScope | None = None

    @contextmanager
    def receiving(self) -> Iterator[None]:
        """Wrap the wait for a request: shedding the connection cancels it; check ``shed`` after."""
        with trio.CancelScope() as scope:
            if self.shed:
                scope.cancel()
            self._scope = scope
            try:
                yield
            finally:
                self._scope = None


class ConnectionSlots:
    """At most ``limit`` connections; at the limit, the longest-waiting idle one makes room."""

    def __init__(self, limit: int, *, name: str = "http") -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self.limit = limit
        self.name = name
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
            self._make_room()
            changed = self._changed
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

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _make_room(self) -> None:
        if any(slot.shed for slot in self._connections):
            return  # one is already on its way out; its release wakes the accept loop
        waiting = [slot for slot in self._connections if slot.waiting_since is not None]
        if not waiting:
            return  # every connection is being answered: the next one waits in the backlog
        victim = min(waiting, key=lambda slot: slot.waiting_since or 0.0)
        victim.shed = True
        if victim._scope is not None:
            victim._scope.cancel()
        self.shed_total += 1
        self._shed_since_log += 1
        now = trio.current_time()
        if now - self._last_log >= _LOG_EVERY:
            log.warning(
                "%s: at the connection limit (%d): closed %d connection(s) without a complete request "
                "to make room (%d in total)",
                self.name,
                self.limit,
                self._shed_since_log,
                self.shed_total,
            )
            self._last_log = now
            self._shed_since_log = 0
