"""A per-address token bucket, for endpoints open to callers without a certificate."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

#: Addresses remembered at once; the oldest are forgotten first (a full bucket again).
MAX_TRACKED = 10_000


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class RateLimiter:
    """Allows ``burst`` requests at once per address, refilled at ``per_minute``."""

    per_minute: float
    """Requests one address may make per minute, once its burst is spent."""
    burst: int
    """Requests one address may make back to back."""
    _buckets: OrderedDict[str, _Bucket] = field(default_factory=OrderedDict)

    def allow(self, address: str, now: float | None = None) -> bool:
        """Spend one request of ``address``; False if it has none left."""
        now = time.monotonic() if now is None else now
        bucket = self._buckets.pop(address, None)
        if bucket is None:
            bucket = _Bucket(float(self.burst), now)
        bucket.tokens = min(
            float(self.burst), bucket.tokens + (now - bucket.stamp) * self.per_minute / 60.0
        )
        bucket.stamp = now
        allowed = bucket.tokens >= 1.0
        if allowed:
            bucket.tokens -= 1.0
        self._buckets[address] = bucket
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return allowed


def peer_address(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host, _, _ = rest.rpartition(":")
    return host.strip("[]")
