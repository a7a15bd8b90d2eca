"""The pool node's own events (egress, files from guests' disks, guest life cycle).

They take the same durable path as a sensor's (:mod:`honeyfleet.eventlog`, spooled in
``state_dir/spool.sqlite3`` and streamed to the controller by
:class:`honeyfleet.uploader.Uploader`), so they survive restarts and reach the store once.

Each event is tied to the attacker's session on the guest it is about: the guest's
newest live lease, else the lease that ended last (a guest idles, or is destroyed, after
its session ended: what its disk holds is still that session's), remembered for the
last ``REMEMBER`` guests. Such an event carries ``session``, ``src_ip``, ``sensor``,
``protocol``, ``lease``, ``guest`` and ``pool_node``; the controller checks the lease
is one of this node's and stores the event on that lease's session. A guest that never
had a lease (or no guest at all) gives a node-level event: ``session``, ``sensor`` and
``protocol`` are ``-`` and ``src_ip`` is ``0.0.0.0`` (:data:`honeyfleet.events.NO_SESSION`).

Event ids of our own start with ``honeyfleet.``; where Cowrie has one
(``cowrie.session.file_download``...) it is used with Cowrie's fields. Messages are
templates with ``{field}`` placeholders and strings are cut to the bounds, as on
sensors (:mod:`honeyfleet.eventbounds`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from honeyfleet.eventbounds import bound
from honeyfleet.eventlog import EventLog
from honeyfleet.events import NO_SESSION, Event, make_event
from poolnode.guest import LeaseHold

log = logging.getLogger(__name__)

# Guests whose last session is remembered after their leases ended.
REMEMBER = 4096


@dataclass(frozen=True)
class SessionContext:
    """What ties a guest's events to the attacker's session: one lease's fields."""

    lease: str
    session: str
    """The sensor's session id ("-" when the controller did not say)."""
    src_ip: str
    sensor: str
    """The sensor's name (without its ``sensor/`` role)."""
    protocol: str
    """"ssh", "telnet", or "-"."""

    @classmethod
    def of(cls, hold: LeaseHold) -> SessionContext:
        """The context of a lease on a guest."""
        sensor = hold.sensor.removeprefix("sensor/")
        return cls(hold.lease_id, hold.session, hold.src_ip, sensor, hold.protocol)


class NodeEvents:
    """Emits the node's events, each with the session context of its guest."""

    def __init__(self, events: EventLog, *, pool_node: str, remember: int = REMEMBER) -> None:
        self._events = events
        self.pool_node = pool_node
        """The node's name, the ``pool_node`` of every event (the controller checks it)."""
        self._remember = remember
        self._live: dict[str, dict[str, SessionContext]] = {}
        self._last: OrderedDict[str, SessionContext] = OrderedDict()

    def leased(self, guest_id: str, hold: LeaseHold) -> None:
        """A lease was put on the guest: its events belong to that session from now on."""
        context = SessionContext.of(hold)
        self._live.setdefault(guest_id, {})[context.lease] = context
        self._keep(guest_id, context)

    def released(self, guest_id: str, lease_id: str, reason: str) -> None:
        """A lease on the guest ended (``honeyfleet.guest.released`` on its session)."""
        context = self._live.get(guest_id, {}).pop(lease_id, None)
        if not self._live.get(guest_id):
            self._live.pop(guest_id, None)
            if context is not None:
                # The last session to leave the guest owns what it left behind.
                self._keep(guest_id, context)
        if context is not None:
            self._emit(
                context,
                guest_id,
                "honeyfleet.guest.released",
                "Lease {lease} on guest {guest} ended: {reason}",
                {"reason": reason},
            )

    def destroyed(self, guest_id: str, reason: str, *, used: bool) -> None:
        """The guest was destroyed (``honeyfleet.guest.destroyed``, on its last session if
        an attacker used it; a never-used guest's end is no news)."""
        self._live.pop(guest_id, None)
        if used:
            self.emit(
                guest_id,
                "honeyfleet.guest.destroyed",
                "Guest {guest} destroyed: {reason}",
                reason=reason,
            )

    def context(self, guest_id: str | None) -> SessionContext | None:
        """The session a guest's events belong to: its newest live lease, else the one that
        ended last; None when it never had one."""
        if guest_id is None:
            return None
        live = self._live.get(guest_id)
        if live:
            return next(reversed(live.values()))
        return self._last.get(guest_id)

    def emit(
        self,
        guest_id: str | None,
        eventid: str,
        template: str,
        *,
        message_args: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Event:
        """Build, record (durable once :meth:`flush` returns) and return an event.

        ``guest_id`` names the guest the event is about (None: about the node itself);
        the session context is filled in from its lease. ``template`` is formatted with
        the context, the event's fields and ``message_args`` (values for the message
        only); attacker data in values is safe and strings are cut to the bounds.
        """
        return self._emit(self.context(guest_id), guest_id, eventid, template, fields, message_args)

    @property
    def near_full(self) -> bool:
        """Whether the spool is near its bound (or the disk short): shed what can be shed
        (bulky or repeated events) rather than have later events refused."""
        return self._events.spool.near_full

    async def flush(self) -> None:
        """Wait until the events emitted so far are durable."""
        await self._events.flush()

    def _emit(
        self,
        context: SessionContext | None,
        guest_id: str | None,
        eventid: str,
        template: str,
        fields: dict[str, Any],
        message_args: dict[str, Any] | None = None,
    ) -> Event:
        """Build an event on ``context`` (node-level when None) and spool it."""
        shared = _shared(context) | {"pool_node": self.pool_node, "guest": guest_id or "-"}
        if context is not None:
            shared["lease"] = context.lease
        cut = bound(template, fields, message_args, shared)
        if cut.cut:
            log.info("%s: cut %s to %d bytes", eventid, ", ".join(cut.cut), cut.limit)
        event = make_event(
            eventid,
            cut.message,
            session=shared["session"],
            src_ip=shared["src_ip"],
            sensor=shared["sensor"],
            sensor_uuid=self._events.instance_uuid,
            protocol=shared["protocol"],
            context={
                "pool_node": self.pool_node,
                "guest": guest_id,
                "lease": context.lease if context is not None else None,
            },
            **cut.fields,
        )
        self._events.emit(event)
        return event

    def _keep(self, guest_id: str, context: SessionContext) -> None:
        """Remember the guest's newest session, for the last ``remember`` guests."""
        self._last[guest_id] = context
        self._last.move_to_end(guest_id)
        while len(self._last) > self._remember:
            self._last.popitem(last=False)


def _shared(context: SessionContext | None) -> dict[str, str]:
    """The session fields of an event on ``context``, or of a node-level one."""
    if context is None:
        return dict(NO_SESSION)
    return {
        "session": context.session,
        "src_ip": context.src_ip,
        "sensor": context.sensor,
        "protocol": context.protocol,
    }
