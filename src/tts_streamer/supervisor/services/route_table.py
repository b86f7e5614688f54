"""Route handlers from service methods, so a service's route table names the method behind each route.

A service method takes what its route carries (the body, the id, or both); the command plane calls every
handler with the whole ``RouteCall``. ``with_body(self.create)`` and the others are that adaptation,
typed, instead of a lambda per route.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from tts_streamer.adapters.voipbin.envelope import Response
from tts_streamer.adapters.voipbin.routes import RouteMatch
from tts_streamer.supervisor.services.command_plane import Handler, RouteCall


def with_body(method: Callable[[Any], Awaitable[Response]]) -> Handler:
    """``method(body)``: a route without an id (a create)."""

    async def handler(call: RouteCall) -> Response:
        return await method(call.data)

    handler.__qualname__ = f"with_body({method.__qualname__})"
    return handler


def with_id(method: Callable[[uuid.UUID], Awaitable[Response]]) -> Handler:
    """``method(id)``: a route on one resource, its body unused."""

    async def handler(call: RouteCall) -> Response:
        return await method(call.id)

    handler.__qualname__ = f"with_id({method.__qualname__})"
    return handler


def with_id_and_body(method: Callable[[uuid.UUID, Any], Awaitable[Response]]) -> Handler:
    """``method(id, body)``: an action on one resource."""

    async def handler(call: RouteCall) -> Response:
        return await method(call.id, call.data)

    handler.__qualname__ = f"with_id_and_body({method.__qualname__})"
    return handler


def with_match(method: Callable[[RouteMatch], Awaitable[Response]]) -> Handler:
    """``method(match)``: a route whose query string matters (a list)."""

    async def handler(call: RouteCall) -> Response:
        return await method(call.match)

    handler.__qualname__ = f"with_match({method.__qualname__})"
    return handler
