"""Which messages the controller sends on a pool node's heartbeat stream: none that the
node does not need, and a lease's end together with the next allocation to its node."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller import leases as lease_module
from controller.leases import LeaseManager
from controller.models import LeaseRecord
from controller.registry import Registry
from controller.registry_service import PoolNodeRegistryServicer
from honeyfleet.v1 import common_pb2, lease_pb2, poolnode_pb2, registry_pb2
from tests.conftest import until
from tests.unit.bookkeeping import heartbeat_service

PRISTINE = common_pb2.GUEST_STATE_PRISTINE


class NodeStream:
    """One node's heartbeat stream into a real servicer: what the node sends, and the
    controller's messages as they come."""

    def __init__(self, servicer: PoolNodeRegistryServicer) -> None:
        self._sent: asyncio.Queue[registry_pb2.HeartbeatRequest] = asyncio.Queue()
        self._replies: asyncio.Queue[registry_pb2.HeartbeatResponse] = asyncio.Queue()
        self._handler = servicer.Heartbeat(self._requests(), None)
        # The handler runs only while its replies are taken, as gRPC takes them.
        self._taker = asyncio.create_task(self._take())

    async def _take(self) -> None:
        async for reply in self._handler:
            self._replies.put_nowait(reply)

    async def close(self) -> None:
        """End the stream."""
        self._taker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._taker
        await self._handler.aclose()

    async def _requests(self) -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        while True:
            yield await self._sent.get()

    def send(self, **fields: object) -> None:
        """Send one HeartbeatRequest."""
        self._sent.put_nowait(registry_pb2.HeartbeatRequest(**fields))  # type: ignore[arg-type]

    async def next(self) -> registry_pb2.HeartbeatResponse:
        """The controller's next message."""
        return await self._replies.get()


@pytest.fixture
async def fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Registry, LeaseManager, NodeStream]]:
    """Node n1 (two pristine guests, allocations on its stream) with its stream open."""
    store, registry, leases, servicer = await heartbeat_service(
        tmp_path, monkeypatch, dead_after=3600.0
    )
    await registry.register_node(
        "n1",
        registry_pb2.RegisterPoolNodeRequest(
            address="127.0.0.1:1", capacity=2, stream_allocations=True
        ),
    )
    stream = NodeStream(servicer)
    guests = [common_pb2.Guest(id=f"g{i}", state=PRISTINE) for i in (1, 2)]
    stream.send(table_version=1, guests=guests)
    await stream.next()
    try:
        yield registry, leases, stream
    finally:
        await stream.close()
        await store.close()


def acquire(
    leases: LeaseManager, src_ip: str
) -> asyncio.Task[tuple[LeaseRecord, common_pb2.GuestCredentials]]:
    """An acquire of sensor s1's, running."""
    request = lease_pb2.AcquireLeaseRequest(
        src_ip=src_ip, protocol=common_pb2.PROTOCOL_SSH, session=f"session-{src_ip}"
    )
    return asyncio.create_task(leases.acquire("sensor/s1", request))


def grant(stream: NodeStream, request: poolnode_pb2.AllocateGuestRequest, guest: str) -> None:
    """Answer an allocation as a node does, with ``guest``."""
    granted = poolnode_pb2.AllocateGuestResponse(
        guest=common_pb2.Guest(id=guest, state=common_pb2.GUEST_STATE_LEASED)
    )
    answer = registry_pb2.AllocationAnswer(lease_id=request.lease_id, granted=granted)
    stream.send(allocations=[answer], answers_only=True)


async def granted(leases: LeaseManager, stream: NodeStream, src_ip: str, guest: str) -> LeaseRecord:
    """A lease of sensor s1's, granted on ``guest`` by the node."""
    pending = acquire(leases, src_ip)
    grant(stream, (await stream.next()).allocate[0], guest)
    lease, _ = await pending
    return lease


async def test_an_early_heartbeat_is_answered_only_when_there_is_something_to_tell(
    fleet: tuple[Registry, LeaseManager, NodeStream],
) -> None:
    registry, _, stream = fleet
    node = registry.nodes["n1"]
    # A nudge with a new table and nothing for the node: no reply.
    guests = [common_pb2.Guest(id="g3", state=PRISTINE)]
    stream.send(table_version=2, guests=guests, early=True)
    await until(lambda: node.view.table_version == 2)
    # Changed after it was read: a reply to it would not show the drain.
    await registry.set_draining("n1", True)
    stream.send(table_version=2, table_unchanged=True)
    reply = await stream.next()
    assert reply.draining
    assert not reply.between_heartbeats
    # A nudge that shows a lease the controller does not know is answered at once.
    stream.send(table_version=3, guests=guests, lease_ids=["unknown"], early=True)
    reply = await stream.next()
    assert list(reply.stale_lease_ids) == ["unknown"]
    assert reply.between_heartbeats


async def test_a_lease_end_rides_along_with_the_next_allocation_to_its_node(
    fleet: tuple[Registry, LeaseManager, NodeStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, leases, stream = fleet
    monkeypatch.setattr(lease_module, "END_LINGER", 3600.0)
    lease = await granted(leases, stream, "192.0.2.1", "g1")
    await leases.release("sensor/s1", lease.id, "session closed")
    second = acquire(leases, "192.0.2.2")
    message = await stream.next()
    assert [e.lease_id for e in message.ended_leases] == [lease.id]
    assert len(message.allocate) == 1
    grant(stream, message.allocate[0], "g2")
    lease, _ = await second
    # With no allocation to ride along with, an end goes after the linger.
    monkeypatch.setattr(lease_module, "END_LINGER", 0.0)
    await leases.release("sensor/s1", lease.id, "session closed")
    message = await stream.next()
    assert [e.lease_id for e in message.ended_leases] == [lease.id]
    assert not message.allocate


async def test_a_nudge_with_only_ends_to_tell_gets_no_reply_and_the_next_one_takes_them(
    fleet: tuple[Registry, LeaseManager, NodeStream], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, leases, stream = fleet
    monkeypatch.setattr(lease_module, "END_LINGER", 3600.0)
    lease = await granted(leases, stream, "192.0.2.1", "g1")
    await leases.release("sensor/s1", lease.id, "session closed")
    # A guest changed by itself (a nudge): an end alone is no reason for a message...
    guests = [
        common_pb2.Guest(id="g1", state=common_pb2.GUEST_STATE_LEASED),
        common_pb2.Guest(id="g3", state=PRISTINE),
    ]
    stream.send(table_version=3, guests=guests, lease_ids=[lease.id], early=True)
    await until(lambda: registry.nodes["n1"].view.table_version == 3)
    # ...the reply to the next heartbeat, which goes anyway, carries it.
    stream.send(table_version=3, table_unchanged=True)
    reply = await stream.next()
    assert not reply.between_heartbeats
    assert [e.lease_id for e in reply.ended_leases] == [lease.id]
