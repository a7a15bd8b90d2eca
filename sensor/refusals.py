"""Events for refused connections, at a bounded rate (shared by the SSH and Telnet frontends)."""

from __future__ import annotations

import time

from honeyfleet.events import make_event, new_session_id
from sensor.events import EventLog


class RefusalReporter:
    """Counts refused connections and reports them as one event per interval.

    However many connections a flood brings, it costs one event per interval, so it
    cannot eat the spool headroom kept for running sessions.
    """

    def __init__(self, events: EventLog, *, sensor: str, protocol: str, interval: float) -> None:
        self._events = events
        self._sensor = sensor
        self._protocol = protocol
        self._interval = interval
        self._refused = 0
        self._last_event = 0.0

    def refused(self, src_ip: str, reason: str) -> None:
        """Count one refusal; emit the event if the interval has passed."""
        self._refused += 1
        now = time.monotonic()
        if now - self._last_event < self._interval:
            return
        self._events.emit(
            make_event(
                "honeyfleet.session.refused",
                f"Refused {self._refused} connection(s): {reason}",
                session=new_session_id(),
                src_ip=src_ip,
                sensor=self._sensor,
                protocol=self._protocol,
                reason=reason,
                count=self._refused,
            )
        )
        self._refused = 0
        self._last_event = now
