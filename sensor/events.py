"""Where a sensor's events go: the durable spool first, then the optional JSON lines file.

:class:`SessionEvents` binds one session's shared fields (session id, addresses, lease,
guest) so call sites name only the event id, Cowrie's message template and the
event's own fields. Messages are Cowrie's, verbatim, with ``{field}`` placeholders.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from honeyfleet.events import Event, make_event
from sensor.metrics import SensorMetrics
from sensor.recording import RecordingSummary
from sensor.spool import Spool

log = logging.getLogger(__name__)


class EventLog:
    """Writes events to the spool, durably and first (the spool then mirrors them)."""

    def __init__(self, spool: Spool, metrics: SensorMetrics) -> None:
        self.spool = spool
        self._metrics = metrics
        # Read when scraped, so the gauges follow deliveries as well as new events.
        metrics.spool_bytes.set_function(lambda: spool.bytes)
        metrics.spool_events.set_function(lambda: spool.count)

    def emit(self, event: Event) -> None:
        """Record one event (durable once :meth:`flush` returns)."""
        if not self.spool.append(event):
            self._metrics.events_dropped.inc()

    async def flush(self) -> None:
        """Wait until every event emitted so far is committed to the spool."""
        await self.spool.flush()

    def close(self) -> None:
        """Commit what is pending and close the spool (blocks: for shutdown)."""
        self.spool.close()


class SessionEvents:
    """One session's event emitter and log context."""

    def __init__(
        self, events: EventLog, *, session: str, src_ip: str, sensor: str, protocol: str
    ) -> None:
        self._events = events
        self.session = session
        self.src_ip = src_ip
        self.sensor = sensor
        self.protocol = protocol
        # Fleet fields known later in the session: pool_node, guest, lease.
        self.context: dict[str, str] = {}
        self.log = SessionLogger(log, self)

    def emit(
        self,
        eventid: str,
        template: str,
        *,
        message_args: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Event:
        """Build, record and return an event.

        ``template`` is formatted with the event's fields plus ``message_args`` (values
        for the message only). Attacker data in values is safe: only the template's own
        braces are interpreted.
        """
        message = template.format(
            session=self.session, src_ip=self.src_ip, **fields, **(message_args or {})
        )
        event = make_event(
            eventid,
            message,
            session=self.session,
            src_ip=self.src_ip,
            sensor=self.sensor,
            protocol=self.protocol,
            context=self.context,
            **fields,
        )
        self._events.emit(event)
        return event

    async def flush(self) -> None:
        """Wait until the events emitted so far are durable."""
        await self._events.flush()

    def emit_closed(self, recording: RecordingSummary | None, duration: float, reason: str) -> None:
        """A session's last events: its recording's ``log.closed``, then ``session.closed``.

        Both carry ``duration_ms`` and the older ``duration`` (seconds) for Cowrie 2.x tools.
        """
        if recording is not None:
            self.emit(
                "cowrie.log.closed",
                "Closing TTY Log: {ttylog} after {duration} seconds",
                ttylog=str(recording.path),
                size=recording.size,
                shasum=recording.shasum,
                duration=round(recording.duration, 1),
                duration_ms=round(recording.duration * 1000),
                truncated=recording.truncated,
            )
        self.emit(
            "cowrie.session.closed",
            "Connection lost after {duration} seconds",
            duration=round(duration, 1),
            duration_ms=round(duration * 1000),
            reason=reason,
        )


class SessionLogger(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every log line with the session id, source address, lease and guest."""

    def __init__(self, logger: logging.Logger, session: SessionEvents) -> None:
        super().__init__(logger, {})
        self._session = session

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        """Add the session context."""
        s = self._session
        lease = s.context.get("lease", "-")
        guest = s.context.get("guest", "-")
        return f"[{s.session} {s.src_ip} lease={lease} guest={guest}] {msg}", kwargs
