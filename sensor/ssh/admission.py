"""Who gets in: connection counts in total, per address and not yet logged in.

Checked when a TCP connection is accepted, before a byte is read. Beyond a limit the
connection is closed at once, as OpenSSH does past MaxStartups. A spool near its bound
refuses new connections too, keeping room for the events of sessions already running.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING, Any

from sensor.config import SensorConfig
from sensor.metrics import SensorMetrics

if TYPE_CHECKING:
    from sensor.ssh.connection import AttackerConnection


class Admission:
    """Counts connections and refuses those over a limit; keeps the open ones."""

    def __init__(self, config: SensorConfig, metrics: SensorMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self._total = 0
        self._per_ip: Counter[str] = Counter()
        self._unauthenticated = 0
        self._closing: set[asyncio.Task[Any]] = set()
        self.connections: set[AttackerConnection] = set()

    def admit(self, src_ip: str, *, spool_near_full: bool) -> str | None:
        """Count a new connection in, or return why it is refused (a metric label)."""
        config = self._config
        if spool_near_full:
            reason = "spool_near_full"
        elif self._total >= config.max_connections:
            reason = "max_connections"
        elif self._per_ip[src_ip] >= config.max_connections_per_ip:
            reason = "max_connections_per_ip"
        elif self._unauthenticated >= config.max_unauthenticated:
            reason = "max_unauthenticated"
        else:
            self._total += 1
            self._per_ip[src_ip] += 1
            self._unauthenticated += 1
            self._metrics.connections.set(self._total)
            return None
        self._metrics.refusals.labels(reason).inc()
        return reason

    def logged_in(self) -> None:
        """A connection is past login: it no longer counts as unauthenticated."""
        self._unauthenticated -= 1

    def release(self, src_ip: str, *, logged_in: bool) -> None:
        """A connection ended."""
        self._total -= 1
        self._per_ip[src_ip] -= 1
        if self._per_ip[src_ip] <= 0:
            del self._per_ip[src_ip]
        if not logged_in:
            self._unauthenticated -= 1
        self._metrics.connections.set(self._total)

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a connection's clean-up task until it ends (for a clean shutdown)."""
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def drain(self) -> None:
        """Wait for every clean-up task."""
        while self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
