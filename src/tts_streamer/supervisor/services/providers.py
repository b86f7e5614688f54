"""Which voice engine speaks for a request's ``provider``, and saying so when it is not the one named.

A speaking names its provider (``aws``, ``gcp``, ``elevenlabs``: the Go service's names). When the daemon
has no engine of that name (credentials not configured, a broken setting), the request is still spoken,
by the default engine; but a customer then hears another voice, so it must never be silent: a WARNING
per request naming the provider, why it is unavailable and the fallback used, and
``tts_streamer_provider_unavailable_total{provider,fallback}``. ``/health/ready`` lists the reasons
(``vendors_unavailable``) from start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Protocol

import attrs

log = logging.getLogger(__name__)


class FallbackCounter(Protocol):
    """``ops/metrics.Metrics``: ``tts_streamer_provider_unavailable_total{provider,fallback}``."""

    def provider_fell_back(self, provider: str, fallback: str) -> None: ...


@attrs.define
class ProviderResolver:
    engines: frozenset[str]
    default_engine: str
    unavailable: Mapping[str, str] = attrs.field(factory=dict)  # vendor -> reason (build_engines)
    metrics: FallbackCounter | None = None

    @classmethod
    def of(cls, engines: Collection[str], default_engine: str = "espeak") -> ProviderResolver:
        return cls(frozenset(engines), default_engine)

    def engine_for(self, provider: str, *, request: str) -> str | None:
        """The engine named ``provider``, or None (the default engine) with a warning and a count."""
        if provider in self.engines:
            return provider
        reason = self.unavailable.get(provider, "no engine of that name")
        log.warning(
            "%s: provider %s is not available (%s); speaking with %s instead",
            request,
            provider,
            reason,
            self.default_engine,
        )
        if self.metrics is not None:
            self.metrics.provider_fell_back(provider, self.default_engine)
        return None
