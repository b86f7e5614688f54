"""Small measurement primitives shared by actors, the admin console and the benchmarks."""

from __future__ import annotations

import collections
from collections.abc import Callable

import attrs


@attrs.define
class LatenessRecorder:
    """Keeps the most recent samples (seconds) for percentiles, plus an all-time count and maximum."""

    capacity: int = 1024
    count: int = 0
    maximum: float = 0.0
    _recent: collections.deque[float] = attrs.field(factory=collections.deque)
    # Also given every sample (e.g. the metrics histogram); must be cheap and must not raise.
    observer: Callable[[float], None] | None = None

    def record(self, seconds: float) -> None:
        if self.observer is not None:
            self.observer(seconds)
        self.count += 1
        self.maximum = max(self.maximum, seconds)
        self._recent.append(seconds)
        if len(self._recent) > self.capacity:
            self._recent.popleft()

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100) of the recent samples; 0.0 when there are none."""
        if not self._recent:
            return 0.0
        ordered = sorted(self._recent)
        index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[index]
