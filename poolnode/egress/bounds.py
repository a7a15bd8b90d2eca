"""Per-guest bounds on egress events: a token bucket per guest address and kind.

A guest that floods (a DNS loop, a port scan) gets ``burst`` events at once and then
``per_minute``; what is over the bound is counted, and the next event that passes says
how many were suppressed before it, so the record stays honest without growing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

TRACKED = 4096
"""Buckets kept (the least recently used guest's is forgotten first)."""


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    suppressed: int = 0


class EventBounds:
    """Decides whether a guest's next egress event of a kind may be sent."""

    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        tracked: int = TRACKED,
    ) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._tracked = tracked
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def take(self, guest: str, kind: str) -> int | None:
        """Spend one event of ``kind`` for ``guest``: None when over the bound (counted),
        else how many of that kind were suppressed since the last one that passed."""
        now = self._clock()
        key = (guest, kind)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._burst, now)
            while len(self._buckets) > self._tracked:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(key)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.stamp) * self._rate)
        bucket.stamp = now
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            return None
        bucket.tokens -= 1.0
        suppressed, bucket.suppressed = bucket.suppressed, 0
        return suppressed
