"""A sensor's events: one session's emitter on top of the shared event log.

:class:`SessionEvents` binds one session's shared fields (session id, both ends of the
connection, lease, guest) so call sites name only the event id, Cowrie's message
template and the event's own fields. Messages are Cowrie's, verbatim, with ``{field}``
placeholders. Like Cowrie (3.0.6 and later) every event carries ``src_port``, ``dst_ip``
and ``dst_port`` of the connection; an event's own field of that name wins (the
destination of a ``cowrie.direct-tcpip.request``). ``src_ip`` is plain IPv4 for an
IPv4-mapped address, as Cowrie writes it. Strings are cut to the bounds of
:mod:`honeyfleet.eventbounds`; how many events a session and a source may write is
:mod:`sensor.eventbudget`'s. The spool and its delivery are the base's
(:mod:`honeyfleet.eventlog`, :mod:`honeyfleet.spool`, :mod:`honeyfleet.uploader`).
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from honeyfleet import eventlog
from honeyfleet.eventbounds import bound
from honeyfleet.events import Event, make_event, plain_ip
from honeyfleet.spool import Spool
from sensor.eventbudget import SUMMARY, EventBudget, SessionBudget
from sensor.metrics import SensorMetrics
from sensor.recording import RecordingSummary

log = logging.getLogger(__name__)


class EventLog(eventlog.EventLog):
    """The sensor's event log: the shared one, with the sensor's event budget."""

    def __init__(
        self,
        spool: Spool,
        metrics: SensorMetrics,
        budget: EventBudget | None = None,
        *,
        sensor_uuid: str,
    ) -> None:
        super().__init__(spool, metrics.spool, instance_uuid=sensor_uuid)
        self.budget = budget
        self.sensor_uuid = sensor_uuid
        """The sensor's identity, the ``uuid`` of every event (see :mod:`honeyfleet.instance`)."""


class SessionEvents:
    """One session's event emitter and log context."""

    __slots__ = (
        "_budget",
        "_events",
        "context",
        "endpoints",
        "log",
        "protocol",
        "sensor",
        "session",
        "src_ip",
    )

    def __init__(
        self,
        events: EventLog,
        *,
        session: str,
        peer: tuple[str, int],
        local: tuple[str, int],
        sensor: str,
        protocol: str,
    ) -> None:
        self._events = events
        self.session = session
        self.src_ip = plain_ip(peer[0])
        self.sensor = sensor
        self.protocol = protocol
        # The connection's ends, on every event (Cowrie's names).
        self.endpoints = {"src_port": peer[1], "dst_ip": plain_ip(local[0]), "dst_port": local[1]}
        # Fleet fields known later in the session: pool_node, guest, lease.
        self.context: dict[str, str] = {}
        self.log = SessionLogger(log, self)
        self._budget: SessionBudget | None = (
            events.budget.session() if events.budget is not None else None
        )

    def emit(
        self,
        eventid: str,
        template: str,
        *,
        message_args: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Event | None:
        """Build, record and return an event; None if the event budget refuses it.

        ``template`` is formatted with the event's fields plus ``message_args`` (values
        for the message only). Attacker data in values is safe: only the template's own
        braces are interpreted. Strings are cut to the bound (see the module's doc).
        """
        if self._budget is not None:
            scope = self._budget.check(eventid, self.src_ip)
            if scope is not None:
                if self._budget.suppressed == 1:
                    self.log.warning("event budget (%s) exceeded", scope.value)
                    self.emit(
                        SUMMARY,
                        "Event budget exceeded ({budget}): later events of this session"
                        " are not kept",
                        budget=scope.value,
                        first_lost=eventid,
                    )
                return None
        shared = {"session": self.session, "src_ip": self.src_ip, **self.endpoints}
        cut = bound(template, fields, message_args, shared)
        if cut.cut:
            self.log.info("%s: cut %s to %d bytes", eventid, ", ".join(cut.cut), cut.limit)
        event = make_event(
            eventid,
            cut.message,
            session=self.session,
            src_ip=self.src_ip,
            sensor=self.sensor,
            sensor_uuid=self._events.sensor_uuid,
            protocol=self.protocol,
            context=self.context,
            **(self.endpoints | cut.fields),
        )
        self._events.emit(event)
        return event

    async def flush(self) -> None:
        """Wait until the events emitted so far are durable."""
        await self._events.flush()

    def emit_closed(
        self,
        recording: RecordingSummary | None,
        duration: float,
        reason: str,
        *,
        recording_sha256: str | None = None,
    ) -> None:
        """A session's last events: its recording's ``log.closed``, then ``session.closed``.

        Both are Cowrie 3.1's (``duration_ms``, and its message) and keep the older
        ``duration`` (seconds) as an extra for Cowrie 2.x tools. A recording is never a
        ``duplicate``: each is its own file, not stored by content as Cowrie's are.
        ``recording_sha256`` names the recording in the controller's artefact store
        (``ttylog_sha256``; Cowrie's ``shasum`` covers the attacker's input only).
        """
        if recording is not None:
            stored: dict[str, Any] = {"ttylog_sha256": recording_sha256} if recording_sha256 else {}
            self.emit(
                "cowrie.log.closed",
                "Closing TTY Log: {ttylog} after {duration_ms} milliseconds",
                ttylog=str(recording.path),
                size=recording.size,
                shasum=recording.shasum,
                duplicate=False,
                duration_ms=round(recording.duration * 1000),
                duration=round(recording.duration, 1),
                truncated=recording.truncated,
                **stored,
            )
        lost: dict[str, Any] = (
            {"events_suppressed": self._budget.suppressed} if self._budget else {}
        )
        self.emit(
            "cowrie.session.closed",
            "Connection lost after {duration_ms} milliseconds",
            duration_ms=round(duration * 1000),
            duration=round(duration, 1),
            reason=reason,
            **lost,
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
