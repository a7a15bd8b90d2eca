"""Whose session a pool node's event is on: checked against the leases the controller issued.

A sensor's events are its own sessions' (the ingest sets their ``sensor`` to the name in
its certificate). A pool node reports events about guests it leased (egress attempts,
files from a guest's disk): such an event names its ``lease``, which must be one the
controller issued on that very node, and it is stored on that lease's session: its
``session``, ``sensor``, ``src_ip``, ``protocol`` and ``guest`` are the lease's, whatever
the node wrote. A pool node can thus add events to the sessions it served, and to no
other; it cannot pose as a sensor. An event without a lease is about the node itself: its
``session`` and ``sensor`` are ``-``. Every event of a pool node must name it in
``pool_node``; an event naming another node, or a lease that is not the node's, is
dropped (counted as rejected at the ``origin`` stage, like a malformed event).

Lease records never change their node, sensor, session or address, so they are cached.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from controller.events.rows import EventRow
from controller.models import LeaseRecord
from honeyfleet.errors import InvalidArgument
from honeyfleet.events import NO_SESSION, PROTOCOL_NAMES, to_json

LeaseLookup = Callable[[str], Awaitable[LeaseRecord | None]]
# Lease records kept for pool nodes' events (a guest's events come in bursts).
CACHE_LEASES = 4096


class NodeOrigin:
    """Puts a pool node's events on the sessions of its leases (see the module's doc)."""

    def __init__(self, lookup: LeaseLookup) -> None:
        self._lookup = lookup
        self._cache: OrderedDict[str, LeaseRecord] = OrderedDict()

    async def place(self, node: str, row: EventRow) -> EventRow:
        """``row`` on its lease's session; InvalidArgument if the node may not write it."""
        event = row.event
        ref = f"event {row.hf_event_id}"
        if event.get("pool_node") != node:
            raise InvalidArgument(f"{ref} names pool node {str(event.get('pool_node'))[:64]!r}")
        lease_id = event.get("lease")
        if lease_id is None:
            fields = {"session": NO_SESSION["session"], "sensor": NO_SESSION["sensor"]}
        elif isinstance(lease_id, str) and lease_id:
            lease = await self._lease(lease_id)
            if lease is None or lease.pool_node != node:
                raise InvalidArgument(f"{ref}: lease {lease_id[:64]!r} is not one of {node}'s")
            fields = {
                "session": lease.session or NO_SESSION["session"],
                "sensor": lease.sensor.removeprefix("sensor/"),
                "src_ip": lease.src_ip,
                "protocol": PROTOCOL_NAMES.get(lease.protocol, NO_SESSION["protocol"]),
                "guest": lease.guest,
            }
        else:
            raise InvalidArgument(f"{ref}: lease must be a lease id")
        if all(event.get(key) == value for key, value in fields.items()):
            return row
        event.update(fields)
        return dataclasses.replace(
            row,
            sensor=event["sensor"],
            session=event["session"],
            src_ip=event["src_ip"],
            protocol=event["protocol"],
            json=to_json(event),
        )

    async def _lease(self, lease_id: str) -> LeaseRecord | None:
        """The lease record (cached; an unknown lease is asked again next time)."""
        lease = self._cache.get(lease_id)
        if lease is None:
            lease = await self._lookup(lease_id)
            if lease is None:
                return None
            self._cache[lease_id] = lease
            while len(self._cache) > CACHE_LEASES:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(lease_id)
        return lease
