"""Where a role's events go first: the durable spool, with its state as metrics.

Every role that writes events (sensors, pool nodes) appends them to its own
:class:`honeyfleet.spool.Spool`, which :class:`honeyfleet.uploader.Uploader` streams to
the controller. :class:`EventLog` is that write side, and :class:`SpoolMetrics` its
gauges, named after the role (``honeyfleet_<role>_spool_bytes``...).
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge

from honeyfleet.events import Event
from honeyfleet.spool import Spool


class SpoolMetrics:
    """A spool's gauges and its drop counter, in the role's registry."""

    def __init__(self, prefix: str, registry: CollectorRegistry) -> None:
        r = registry
        self.bytes = Gauge(
            f"{prefix}_spool_bytes", "Undelivered event bytes in the spool", registry=r
        )
        self.events = Gauge(f"{prefix}_spool_events", "Undelivered events in the spool", registry=r)
        self.near_full = Gauge(
            f"{prefix}_spool_near_full",
            "1 while the spool refuses new sessions (near its bound, or short of disk)",
            registry=r,
        )
        self.full = Gauge(
            f"{prefix}_spool_full",
            "1 while the disk is full: events commit into the spool's reserve, or wait",
            registry=r,
        )
        self.dropped = Counter(
            f"{prefix}_events_dropped", "Events dropped because the spool was full", registry=r
        )

    def follow(self, spool: Spool) -> None:
        """Read the gauges from ``spool`` when scraped (they follow deliveries too)."""
        self.bytes.set_function(lambda: spool.bytes)
        self.events.set_function(lambda: spool.count)
        self.near_full.set_function(lambda: int(spool.near_full))
        self.full.set_function(lambda: int(spool.full))


class EventLog:
    """Writes events to the spool, durably and first (the spool then mirrors them)."""

    def __init__(self, spool: Spool, metrics: SpoolMetrics, *, instance_uuid: str) -> None:
        self.spool = spool
        self.instance_uuid = instance_uuid
        """The writing instance's identity, the ``uuid`` of its events (see
        :mod:`honeyfleet.instance`)."""
        self._metrics = metrics
        metrics.follow(spool)

    def emit(self, event: Event) -> None:
        """Record one event (durable once :meth:`flush` returns)."""
        if not self.spool.append(event):
            self._metrics.dropped.inc()

    async def flush(self) -> None:
        """Wait until every event emitted so far is committed to the spool."""
        await self.spool.flush()

    async def close(self) -> None:
        """Commit what is pending and close the spool (its blocking part on a thread)."""
        await self.spool.stop()
        await asyncio.to_thread(self.spool.close)
