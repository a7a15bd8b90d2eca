"""An in-memory guest table implementing poolnode.service.Pool, for control-plane tests.

Guests are instantly pristine; the allocation rules mirror the real pool's (same address
first, then pristine, then the least-loaded shared guest when allowed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from honeyfleet.errors import ResourceExhausted
from honeyfleet.v1 import common_pb2, registry_pb2
from poolnode.service import Allocation


@dataclass
class MemoryGuest:
    """One pretend guest."""

    id: str
    src_ips: list[str] = field(default_factory=list)
    leases: set[str] = field(default_factory=set)

    @property
    def state(self) -> int:
        """Pristine until used, then leased or idle."""
        if self.leases:
            return common_pb2.GUEST_STATE_LEASED
        return common_pb2.GUEST_STATE_IDLE if self.src_ips else common_pb2.GUEST_STATE_PRISTINE


class MemoryPool:
    """A pool of ``size`` pretend guests that records releases."""

    backend = "memory"

    def __init__(self, name: str, size: int) -> None:
        self.guests = [MemoryGuest(f"{name}-g{i}") for i in range(size)]
        self.lease_owner: dict[str, str] = {}
        self.lease_guest: dict[str, MemoryGuest] = {}
        self.released: list[tuple[str, str]] = []
        self.created = time.time()

    @property
    def capacity(self) -> int:
        """Number of guests."""
        return len(self.guests)

    async def allocate(
        self, lease_id: str, src_ip: str, sensor: str, *, allow_shared: bool
    ) -> Allocation:
        """Pick a guest by the pool's rules."""
        mine = [g for g in self.guests if src_ip in g.src_ips]
        pristine = [g for g in self.guests if not g.src_ips]
        shared = sorted((g for g in self.guests if g.src_ips), key=lambda g: len(g.leases))
        if mine:
            guest = mine[0]
        elif pristine:
            guest = pristine[0]
        elif allow_shared and shared:
            guest = shared[0]
        else:
            raise ResourceExhausted("no pristine guest left")
        if src_ip not in guest.src_ips:
            guest.src_ips.append(src_ip)
        guest.leases.add(lease_id)
        self.lease_owner[lease_id] = sensor
        self.lease_guest[lease_id] = guest
        return Allocation(
            guest=self._proto(guest),
            credentials=common_pb2.GuestCredentials(username="root", password="guest-secret"),
            shared=len(guest.src_ips) > 1,
        )

    async def release(self, lease_id: str, reason: str) -> None:
        """Drop a lease; remember it for assertions."""
        guest = self.lease_guest.pop(lease_id, None)
        self.lease_owner.pop(lease_id, None)
        if guest is not None:
            guest.leases.discard(lease_id)
            self.released.append((lease_id, reason))

    def lease_sensor(self, lease_id: str) -> str | None:
        """The sensor a lease was issued to."""
        return self.lease_owner.get(lease_id)

    def snapshot(self) -> registry_pb2.HeartbeatRequest:
        """The heartbeat view of the table."""
        counts = common_pb2.GuestCounts()
        for g in self.guests:
            if g.state == common_pb2.GUEST_STATE_PRISTINE:
                counts.pristine += 1
            elif g.state == common_pb2.GUEST_STATE_LEASED:
                counts.leased += 1
            else:
                counts.idle += 1
        return registry_pb2.HeartbeatRequest(
            guest_counts=counts,
            guests=[self._proto(g) for g in self.guests],
            lease_ids=sorted(self.lease_guest),
        )

    def _proto(self, guest: MemoryGuest) -> common_pb2.Guest:
        return common_pb2.Guest(
            id=guest.id, state=guest.state, src_ips=guest.src_ips, lease_count=len(guest.leases)
        )
