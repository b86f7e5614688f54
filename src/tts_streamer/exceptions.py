"""The configuration error every layer may raise, and helpers for Trio's strict exception groups, used
where a component converts them to one error."""

from __future__ import annotations

from typing import TypeVar

import trio

E = TypeVar("E", bound=BaseException)


class ConfigError(ValueError):
    """A setting (or what the broker holds under a configured name) the daemon cannot start with:
    ``serve`` exits 2 naming it."""


def leaves(exc: BaseException) -> list[BaseException]:
    """The non-group exceptions inside ``exc``, depth first (``[exc]`` if it is not a group)."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]


def first_of(exc: BaseException, kind: type[E]) -> E | None:
    """The first leaf of type ``kind`` inside ``exc``, if any."""
    return next((leaf for leaf in leaves(exc) if isinstance(leaf, kind)), None)


def sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a context manager that hides its nursery should raise, as trio-websocket's own do: the one
    exception in ``group`` that is not a Cancelled; a Cancelled if that is all there is; else ``group``."""
    found = leaves(group)
    real = [exc for exc in found if not isinstance(exc, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real and found:
        return found[0]
    return group
