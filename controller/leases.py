"""Leases: placing sessions on guests, renewing, releasing, expiring and failing them."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping

from controller.models import LeaseRecord, LeaseState
from controller.nodeclient import NodeClients
from controller.registry import Registry
from controller.scheduler import note_allocation, plan
from controller.statestore import StateStore
from honeyfleet.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RPCError,
)
from honeyfleet.v1 import common_pb2, lease_pb2, poolnode_pb2

log = logging.getLogger(__name__)

MAX_SESSION_ID = 128
MAX_LABELS = 16
MAX_LABEL_TEXT = 128


class LeaseManager:
    """Every active lease, kept in memory and mirrored in the state store."""

    def __init__(
        self,
        registry: Registry,
        store: StateStore,
        nodes: NodeClients,
        *,
        ttl: float,
        wait: float,
        missing_grace: float,
    ) -> None:
        self._registry = registry
        self._store = store
        self._nodes = nodes
        self.ttl = ttl
        self._wait = wait
        # A lease younger than this may be missing from a heartbeat sent before it existed.
        self._missing_grace = missing_grace
        self.active: dict[str, LeaseRecord] = {}
        self._allocating: set[str] = set()

    async def load(self) -> None:
        """Reload active leases after a restart."""
        for lease in await self._store.load_active_leases():
            self.active[lease.id] = lease
        if self.active:
            log.info("resumed %d active leases", len(self.active))

    def count_by(self, attribute: str) -> Counter[str]:
        """Active leases per pool node or per sensor."""
        return Counter(getattr(lease, attribute) for lease in self.active.values())

    async def acquire(
        self, sensor: str, request: lease_pb2.AcquireLeaseRequest
    ) -> tuple[LeaseRecord, common_pb2.GuestCredentials]:
        """Place a session on a guest, waiting up to lease_wait for capacity."""
        _validate_acquire(request)
        labels = dict(request.labels)
        deadline = time.monotonic() + self._wait
        while True:
            for placement in plan(
                self._registry.nodes.values(), request.src_ip, labels, self.count_by("pool_node")
            ):
                node = placement.node
                lease_id = uuid.uuid4().hex
                self._allocating.add(lease_id)
                try:
                    response = await self._nodes.allocate(
                        node.address,
                        poolnode_pb2.AllocateGuestRequest(
                            lease_id=lease_id,
                            src_ip=request.src_ip,
                            protocol=request.protocol,
                            sensor=sensor,
                            allow_shared=placement.allow_shared,
                        ),
                    )
                except RPCError as e:
                    self._allocating.discard(lease_id)
                    log.info(
                        "pool node %s could not allocate (%s): %s",
                        node.name,
                        placement.reason,
                        e.details,
                    )
                    continue
                note_allocation(node, response.guest)
                now = time.time()
                lease = LeaseRecord(
                    id=lease_id,
                    pool_node=node.name,
                    pool_node_address=node.address,
                    guest=response.guest.id,
                    sensor=sensor,
                    src_ip=request.src_ip,
                    protocol=request.protocol,
                    session=request.session,
                    shared=response.shared,
                    create_time=now,
                    expire_time=now + self.ttl,
                )
                try:
                    await self._store.save_lease(lease, counter="leases_issued")
                    self.active[lease.id] = lease
                finally:
                    self._allocating.discard(lease_id)
                log.info(
                    "lease %s: session %s from %s on %s/%s (%s) for %s",
                    lease.id,
                    lease.session,
                    lease.src_ip,
                    lease.pool_node,
                    lease.guest,
                    placement.reason,
                    sensor,
                )
                return lease, response.credentials
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await self._store.add_counter("leases_refused")
                log.warning(
                    "no guest for session %s from %s within %.0fs",
                    request.session,
                    request.src_ip,
                    self._wait,
                )
                raise ResourceExhausted(
                    f"no guest available within {self._wait:.0f}s (lease_wait); "
                    "add pool nodes or raise max_vms"
                )
            async with self._registry.changed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await self._registry.changed.wait()

    async def _own(self, sensor: str, lease_id: str) -> LeaseRecord:
        """The calling sensor's lease, active or ended."""
        lease = self.active.get(lease_id) or await self._store.get_lease(lease_id)
        # Another sensor's lease looks exactly like a missing one: ids are not secrets
        # we confirm to strangers.
        if lease is None or lease.sensor != sensor:
            raise NotFound(f"no lease {lease_id!r} for {sensor}")
        return lease

    async def renew(self, sensor: str, lease_id: str) -> LeaseRecord:
        """Extend an active lease by its TTL."""
        lease = await self._own(sensor, lease_id)
        if lease.state is not LeaseState.ACTIVE:
            raise FailedPrecondition(
                f"lease {lease_id} {lease.state.name.lower()}: {lease.end_reason}"
            )
        lease.expire_time = time.time() + self.ttl
        await self._store.save_lease(lease)
        return lease

    async def release(self, sensor: str, lease_id: str, reason: str) -> LeaseRecord:
        """End a lease at session end; releasing an ended lease is a no-op."""
        lease = await self._own(sensor, lease_id)
        if lease.state is LeaseState.ACTIVE:
            await self._end(lease, LeaseState.RELEASED, reason[:200] or "session ended")
        return lease

    async def _end(self, lease: LeaseRecord, state: LeaseState, reason: str) -> None:
        """End one lease, persist it and tell its node (best effort: heartbeats catch up)."""
        lease.end(state, reason, time.time())
        self.active.pop(lease.id, None)
        await self._store.save_lease(lease)
        log.info("lease %s %s: %s", lease.id, state.name.lower(), reason)
        node = self._registry.nodes.get(lease.pool_node)
        if node is not None:
            try:
                await self._nodes.release(node.address, lease.id, reason)
            except RPCError as e:
                log.info("pool node %s not told of lease %s end yet: %s", node.name, lease.id, e)

    async def expire_due(self) -> None:
        """Expire leases whose sensor stopped renewing them."""
        now = time.time()
        for lease in [lease for lease in self.active.values() if lease.expire_time < now]:
            # Ending one lease awaits the disk and its node: meanwhile its sensor may have
            # renewed or released a later one in this list.
            if lease.state is not LeaseState.ACTIVE or lease.expire_time >= now:
                continue
            await self._end(
                lease, LeaseState.EXPIRED, "not renewed within lease_ttl (sensor vanished)"
            )

    async def fail_node(self, node: str, reason: str) -> None:
        """Fail every active lease on a node (it died)."""
        now = time.time()
        failed = [lease for lease in self.active.values() if lease.pool_node == node]
        for lease in failed:
            lease.end(LeaseState.FAILED, reason, now)
            del self.active[lease.id]
        if failed:
            await self._store.save_leases(failed)
            log.warning("failed %d leases of pool node %s: %s", len(failed), node, reason)

    async def reconcile(self, node: str, reported: Mapping[str, None]) -> list[str]:
        """Compare a heartbeat's lease list with ours; returns leases the node should drop.

        Leases we hold that the node no longer does (it lost the guest) fail.
        """
        stale = [i for i in reported if i not in self.active and i not in self._allocating]
        cutoff = time.time() - self._missing_grace
        lost = [
            lease
            for lease in self.active.values()
            if lease.pool_node == node and lease.id not in reported and lease.create_time < cutoff
        ]
        for lease in lost:
            # Released (or failed) while an earlier one was being ended: already over.
            if lease.state is not LeaseState.ACTIVE:
                continue
            await self._end(lease, LeaseState.FAILED, f"pool node {node} no longer holds the guest")
        return stale


def _validate_acquire(request: lease_pb2.AcquireLeaseRequest) -> None:
    """Refuse malformed lease requests with a message naming the field."""
    try:
        ipaddress.ip_address(request.src_ip)
    except ValueError:
        raise InvalidArgument(f"src_ip {request.src_ip[:64]!r} is not an IP address") from None
    if request.protocol == common_pb2.PROTOCOL_UNSPECIFIED:
        raise InvalidArgument("protocol must be PROTOCOL_SSH or PROTOCOL_TELNET")
    if not request.session or len(request.session) > MAX_SESSION_ID:
        raise InvalidArgument(f"session must be 1..{MAX_SESSION_ID} characters")
    if len(request.labels) > MAX_LABELS or any(
        len(k) > MAX_LABEL_TEXT or len(v) > MAX_LABEL_TEXT for k, v in request.labels.items()
    ):
        raise InvalidArgument(f"at most {MAX_LABELS} labels of {MAX_LABEL_TEXT} characters")
