"""Egress events: tied to the guest's session, bounded per guest, shed when the spool fills."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from poolnode.egress.bounds import EventBounds
from poolnode.events import NodeEvents
from poolnode.metrics import PoolMetrics

log = logging.getLogger(__name__)

DNS = "dns"
CONNECT = "connect"
DOWNLOAD = "download"


class Reporter:
    """Turns what a guest did into events on its attacker's session."""

    def __init__(
        self,
        bounds: EventBounds,
        guest_at: Callable[[str], str | None],
        metrics: PoolMetrics | None = None,
    ) -> None:
        self._bounds = bounds
        self._guest_at = guest_at
        self._metrics = metrics
        self.events: NodeEvents | None = None
        """Where events go (set before start; None: nothing is reported)."""
        self.suppressed = 0
        """Events not sent: over a guest's bound, or shed with the spool near full."""

    def session_of(self, guest_ip: str) -> str:
        """The session the guest at ``guest_ip`` is on ("-" if none)."""
        context = self.events.context(self._guest_at(guest_ip)) if self.events else None
        return context.session if context is not None else "-"

    def report(
        self, guest_ip: str, budget: str, eventid: str, template: str, **fields: Any
    ) -> bool:
        """Send an event about the guest at ``guest_ip`` within its ``budget`` (DNS,
        CONNECT, DOWNLOAD); whether it was sent."""
        events = self.events
        if events is None:
            return False
        before = None if events.near_full else self._bounds.take(guest_ip, budget)
        if self._metrics is not None:
            outcome = "suppressed" if before is None else "sent"
            self._metrics.egress_events.labels(budget, outcome).inc()
        if before is None:
            self.suppressed += 1
            return False
        if before:
            fields["suppressed"] = before
        events.emit(self._guest_at(guest_ip), eventid, template, guest_ip=guest_ip, **fields)
        return True
