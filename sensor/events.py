"""Where a sensor's events go: the durable spool first, then the optional JSON lines file.

:class:`SessionEvents` binds one session's shared fields (session id, both ends of the
connection, lease, guest) so call sites name only the event id, Cowrie's message
template and the event's own fields. Messages are Cowrie's, verbatim, with ``{field}``
placeholders. Like Cowrie (3.0.6 and later) every event carries ``src_port``, ``dst_ip``
and ``dst_port`` of the connection; an event's own field of that name wins (the
destination of a ``cowrie.direct-tcpip.request``). ``src_ip`` is plain IPv4 for an
IPv4-mapped address, as Cowrie writes it.

Attacker-sent strings (passwords, commands, host and variable names) can be any length,
and the controller refuses an event whose JSON is over ``MAX_EVENT_JSON`` bytes, losing
it. So every string field (a list of strings counting as one) and the message is cut
to at most ``MAX_EVENT_STRING`` bytes of UTF-8 JSON (escapes included: what the
controller counts); an event with more such fields than fit at that size cuts each to
an equal share of the limit instead. Fields that never need that much are cut shorter
(``FIELD_LIMITS``: credentials, host names). A cut value is its prefix, with no marker
added. How many events a session and a source may write is :mod:`sensor.eventbudget`'s.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import MutableMapping
from typing import Any

from honeyfleet.events import MAX_EVENT_JSON, Event, make_event, plain_ip
from sensor.eventbudget import SUMMARY, EventBudget, SessionBudget
from sensor.metrics import SensorMetrics
from sensor.recording import RecordingSummary
from sensor.spool import Spool

log = logging.getLogger(__name__)

# Longest string field or message in an event, in bytes of UTF-8 JSON: long enough for
# the commands attackers send (base64 droppers), short enough that a message and two
# fields as long fit in one event.
MAX_EVENT_STRING = 64 * 1024
# What an event's keys, numbers and shared fields may take besides its strings.
EVENT_RESERVE = 16 * 1024
# Fields with a shorter bound: credentials (OpenSSH's sshd refuses passwords over 1 KiB)
# and host names (at most 253 bytes in DNS; the rest is an attacker's filler).
FIELD_LIMITS = {
    "username": 1024,
    "password": 1024,
    "dst_ip": 256,
    "orig_ip": 256,
}


def json_size(text: str) -> int:
    """Bytes ``text`` takes as a JSON string in an event (escapes included, quotes not)."""
    return len(json.dumps(text, ensure_ascii=False)[1:-1].encode("utf-8", "surrogatepass"))


def cut(text: str, limit: int) -> str:
    """``text``, or its longest prefix found that takes at most ``limit`` bytes of JSON."""
    if len(text) * 6 <= limit:  # no character takes more than six bytes as JSON
        return text
    # A character takes at least one byte, so no prefix longer than ``limit`` fits.
    text = text[:limit]
    while (over := json_size(text) - limit) > 0:
        # Dropping one character per byte over surely fits; the share of the limit in the
        # size may keep more. Either is shorter, so this ends.
        text = text[: max(len(text) - over, len(text) * limit // (limit + over))]
    return text


def cut_list(items: list[str], limit: int) -> list[str]:
    """The first of ``items`` that take at most ``limit`` bytes of JSON together."""
    if sum(len(item) * 6 + 3 for item in items) <= limit:
        return items
    kept: list[str] = []
    for item in items:
        limit -= json_size(item) + 3  # quotes and a comma
        if limit < 0:
            break
        kept.append(item)
    return kept


def is_strings(value: Any) -> bool:
    """Whether ``value`` is a string or a list of strings (the values :func:`cut` bounds)."""
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    )


class EventLog:
    """Writes events to the spool, durably and first (the spool then mirrors them)."""

    def __init__(
        self,
        spool: Spool,
        metrics: SensorMetrics,
        budget: EventBudget | None = None,
        *,
        sensor_uuid: str,
    ) -> None:
        self.spool = spool
        self.budget = budget
        self.sensor_uuid = sensor_uuid
        """The sensor's identity, the ``uuid`` of every event (see :mod:`sensor.instance`)."""
        self._metrics = metrics
        # Read when scraped, so the gauges follow deliveries as well as new events.
        metrics.spool_bytes.set_function(lambda: spool.bytes)
        metrics.spool_events.set_function(lambda: spool.count)
        metrics.spool_near_full.set_function(lambda: int(spool.near_full))
        metrics.spool_full.set_function(lambda: int(spool.full))

    def emit(self, event: Event) -> None:
        """Record one event (durable once :meth:`flush` returns)."""
        if not self.spool.append(event):
            self._metrics.events_dropped.inc()

    async def flush(self) -> None:
        """Wait until every event emitted so far is committed to the spool."""
        await self.spool.flush()

    async def close(self) -> None:
        """Commit what is pending and close the spool (its blocking part on a thread)."""
        await self.spool.stop()
        await asyncio.to_thread(self.spool.close)


class SessionEvents:
    """One session's event emitter and log context."""

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
        args = message_args or {}
        # Each string (or list of strings) and the message get an equal share of the limit.
        strings = sum(is_strings(v) for v in fields.values())
        limit = min(MAX_EVENT_STRING, (MAX_EVENT_JSON - EVENT_RESERVE) // (strings + 1))
        long: list[str] = []

        def bounded(name: str, value: Any) -> Any:
            most = min(limit, FIELD_LIMITS.get(name, limit))
            if isinstance(value, str):
                short: Any = cut(value, most)
            elif is_strings(value):
                short = cut_list(value, most)
            else:
                return value
            if len(short) < len(value):
                long.append(f"{name} ({len(value)} long)")
            return short

        fields = self.endpoints | {k: bounded(k, v) for k, v in fields.items()}
        args = {k: bounded(k, v) for k, v in args.items()}
        message = template.format(session=self.session, src_ip=self.src_ip, **fields, **args)
        message = cut(message, limit)
        if long:
            self.log.info("%s: cut %s to %d bytes", eventid, ", ".join(long), limit)
        event = make_event(
            eventid,
            message,
            session=self.session,
            src_ip=self.src_ip,
            sensor=self.sensor,
            sensor_uuid=self._events.sensor_uuid,
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

        Both are Cowrie 3.1's (``duration_ms``, and its message) and keep the older
        ``duration`` (seconds) as an extra for Cowrie 2.x tools. A recording is never a
        ``duplicate``: each is its own file, not stored by content as Cowrie's are.
        """
        if recording is not None:
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
