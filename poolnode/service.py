"""PoolNodeService: the controller's handle on a node's pool of guests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from honeyfleet.events import PROTOCOL_NAMES
from honeyfleet.v1 import common_pb2, poolnode_pb2, poolnode_pb2_grpc, registry_pb2


@dataclass(frozen=True)
class Allocation:
    """A guest put under a lease, and how to log into it."""

    guest: common_pb2.Guest
    credentials: common_pb2.GuestCredentials
    shared: bool
    # The pool's table version once the allocation was made.
    table_version: int


class Pool(Protocol):
    """What the service needs of a pool of guests (VMs or static hosts)."""

    @property
    def capacity(self) -> int:
        """Guests the pool keeps alive (max_vms, or the number of static hosts)."""
        ...

    @property
    def backend(self) -> str:
        """The backend's name, e.g. "libvirt" or "static"."""
        ...

    async def allocate(
        self,
        lease_id: str,
        src_ip: str,
        sensor: str,
        *,
        allow_shared: bool,
        session: str = "-",
        protocol: str = "-",
    ) -> Allocation:
        """Lease a guest (same-address guest first, then pristine, then shared if allowed).

        ``session`` and ``protocol`` are the attacker's session, for the node's events.
        Raises ResourceExhausted when no guest can be had.
        """
        ...

    async def release(self, lease_id: str, reason: str) -> int:
        """End a lease (unknown leases are ignored); returns the table version after it."""
        ...

    def lease_sensor(self, lease_id: str) -> str | None:
        """The sensor a live lease was issued to, or None."""
        ...

    def snapshot(self) -> registry_pb2.HeartbeatRequest:
        """The guest table as sent in heartbeats."""
        ...


async def allocate_guest(
    pool: Pool, request: poolnode_pb2.AllocateGuestRequest
) -> poolnode_pb2.AllocateGuestResponse:
    """Put the controller's lease on a guest (asked by a call or on the heartbeat stream)."""
    allocation = await pool.allocate(
        request.lease_id,
        request.src_ip,
        request.sensor,
        allow_shared=request.allow_shared,
        session=request.session or "-",
        protocol=PROTOCOL_NAMES.get(request.protocol, "-"),
    )
    return poolnode_pb2.AllocateGuestResponse(
        guest=allocation.guest,
        credentials=allocation.credentials,
        shared=allocation.shared,
        table_version=allocation.table_version,
    )


class PoolNodeServicer(poolnode_pb2_grpc.PoolNodeServiceServicer):
    """Allocate, release and status, for the controller."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    async def AllocateGuest(
        self, request: poolnode_pb2.AllocateGuestRequest, context: Any
    ) -> poolnode_pb2.AllocateGuestResponse:
        """Put the controller's lease on a guest."""
        return await allocate_guest(self._pool, request)

    async def ReleaseGuest(
        self, request: poolnode_pb2.ReleaseGuestRequest, context: Any
    ) -> poolnode_pb2.ReleaseGuestResponse:
        """End a lease."""
        version = await self._pool.release(request.lease_id, request.reason)
        return poolnode_pb2.ReleaseGuestResponse(table_version=version)

    async def GetPoolStatus(
        self, request: poolnode_pb2.GetPoolStatusRequest, context: Any
    ) -> poolnode_pb2.GetPoolStatusResponse:
        """The guest table."""
        snap = self._pool.snapshot()
        return poolnode_pb2.GetPoolStatusResponse(
            guest_counts=snap.guest_counts, guests=snap.guests, lease_ids=snap.lease_ids
        )
