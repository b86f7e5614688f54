"""Accept loop shared by the admin console and the HTTP server.

Like ``trio.serve_listeners``, but each connection runs in a task named after the server and a
sequence number (``console[3]``, ``http[12]``) so the task tree says what it is; at most
``max_connections`` run at once (the rest wait in the kernel's backlog); and a handler that fails is
logged and closed without taking the server, or the daemon, down with it. A server may pass its own
``slots`` (anything with ``acquire``/``release``, e.g. adapters/http_slots.py, which makes room by
closing idle connections) instead of the plain semaphore.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import trio

log = logging.getLogger(__name__)

# accept(2) errors that mean "overloaded for now", as in trio.serve_listeners: back off and retry.
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_BACKOFF = 0.1

StreamHandler = Callable[[trio.SocketStream], Awaitable[None]]


class Slots(Protocol):
    """What the accept loop needs of its connection limit (``trio.Semaphore`` is one)."""

    async def acquire(self) -> None: ...

    def release(self) -> None: ...


async def serve_stream_listeners(
    listeners: Sequence[trio.SocketListener],
    handler: StreamHandler,
    *,
    name: str,
    max_connections: int,
    slots: Slots | None = None,
) -> None:
    """Serve ``handler(stream)`` on every listener until cancelled; closes the listeners on exit.

    ``slots`` replaces the default limit (a semaphore of ``max_connections``)."""
    if slots is None:
        slots = trio.Semaphore(max_connections)
    numbers = itertools.count(1)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, slots, numbers, name, name=f"{name}-accept")


async def _accept_loop(
    listener: trio.SocketListener,
    handler: StreamHandler,
    slots: Slots,
    numbers: itertools.count[int],
    name: str,
) -> None:
    async with listener, trio.open_nursery() as connections:
        while True:
            # Take a slot only for a client that is there: at the limit, taking one closes a
            # connection, and taken ahead of time that could be one whose request is on its way.
            await trio.lowlevel.wait_readable(listener.socket)
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("%s: accept failed (%s), retrying", name, errno.errorcode[exc.errno])
                await trio.sleep(_ACCEPT_BACKOFF)
                continue
            except BaseException:
                slots.release()
                raise
            number = next(numbers)
            connections.start_soon(
                _run_handler, handler, stream, slots, name, number, name=f"{name}[{number}]"
            )


async def _run_handler(
    handler: StreamHandler, stream: trio.SocketStream, slots: Slots, name: str, number: int
) -> None:
    try:
        await handler(stream)
    except Exception:
        log.exception("%s[%d]: connection handler failed", name, number)
    finally:
        slots.release()
        await trio.aclose_forcefully(stream)
