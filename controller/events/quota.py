"""Per-sensor ingest quotas: what one (possibly compromised) sensor may hold of the controller.

A sensor's uploader keeps one event stream with one batch in flight. A sensor with its
key in someone else's hands could open up to ``max_concurrent_streams`` streams per
connection, over many connections, each with a 4 MiB batch. The quota caps, per sensor
name (over all its connections), the open event streams and the bytes of batches
received but not yet acknowledged; past either, the stream is refused with
RESOURCE_EXHAUSTED and a retry hint (counted by reason), never queued.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from honeyfleet.errors import ResourceExhausted


class Overloaded(ResourceExhausted):
    """Ingest refuses work for now; ``retry_after`` says when trying again makes sense."""

    def __init__(self, message: str, *, reason: str, retry_after: float) -> None:
        super().__init__(f"{message}; retry in {retry_after:.1f}s", retry_after=retry_after)
        self.reason = reason


@dataclass(frozen=True)
class QuotaLimits:
    """The per-sensor bounds."""

    streams: int
    """Event streams one sensor may have open at once."""
    bytes: int
    """Bytes of batches one sensor may have received and not yet acknowledged."""
    retry_after: float
    """Seconds a refused sensor is told to wait before trying again."""


class IngestQuota:
    """Counts each sensor's open streams and unacknowledged bytes against the limits."""

    def __init__(self, limits: QuotaLimits) -> None:
        self.limits = limits
        self._streams: collections.Counter[str] = collections.Counter()
        self._bytes: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def stream(self, sensor: str) -> Iterator[None]:
        """Hold one of ``sensor``'s stream places while the context lasts (Overloaded if none)."""
        if self._streams[sensor] >= self.limits.streams:
            raise Overloaded(
                f"sensor {sensor} already has {self._streams[sensor]} event streams open "
                f"(limit {self.limits.streams})",
                reason="sensor_streams",
                retry_after=self.limits.retry_after,
            )
        self._streams[sensor] += 1
        try:
            yield
        finally:
            self._streams[sensor] -= 1
            if not self._streams[sensor]:
                del self._streams[sensor]

    @contextlib.contextmanager
    def batch(self, sensor: str, size: int) -> Iterator[None]:
        """Account a received batch of ``size`` bytes until acknowledged (Overloaded if over)."""
        held = self._bytes[sensor]
        # A batch is always let in when the sensor holds nothing, whatever its size (the
        # gRPC message limit bounds it), so a sensor is never wedged on one large batch.
        if held and held + size > self.limits.bytes:
            raise Overloaded(
                f"sensor {sensor} has {held} bytes of events unacknowledged "
                f"(limit {self.limits.bytes})",
                reason="sensor_bytes",
                retry_after=self.limits.retry_after,
            )
        self._bytes[sensor] += size
        try:
            yield
        finally:
            self._bytes[sensor] -= size
            if not self._bytes[sensor]:
                del self._bytes[sensor]

    def sensors(self) -> int:
        """Sensors with at least one open event stream."""
        return len(self._streams)
