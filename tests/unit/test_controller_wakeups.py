"""Waiting acquires are never left asleep beside a free guest.

The controller's own bookkeeping (registry, lease manager, real state store) against a
pool node whose AllocateGuest answers are played by the test, so the interleavings of a
heartbeat, an answer and a caller leaving are chosen, not hoped for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from controller.leases import LeaseManager
from controller.registry import Registry
from controller.statestore import StateStore
from honeyfleet.errors import RPCError
from honeyfleet.v1 import common_pb2, lease_pb2, poolnode_pb2, registry_pb2
from tests.conftest import until
from tests.unit.bookkeeping import bookkeeping

PRISTINE = common_pb2.GUEST_STATE_PRISTINE
LEASED = common_pb2.GUEST_STATE_LEASED


@dataclass
class Call:
    request: poolnode_pb2.AllocateGuestRequest
    answer: asyncio.Future[poolnode_pb2.AllocateGuestResponse | RPCError] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class HeldNode:
    """NodeClients whose every AllocateGuest call waits for the test to answer it."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[Call] = asyncio.Queue()

    async def allocate(
        self, node: str, address: str, request: poolnode_pb2.AllocateGuestRequest
    ) -> poolnode_pb2.AllocateGuestResponse:
        call = Call(request)
        self.calls.put_nowait(call)
        answer = await call.answer
        if isinstance(answer, RPCError):
            raise answer
        return answer


@dataclass
class Fleet:
    registry: Registry
    leases: LeaseManager
    node: HeldNode

    def table(self, version: int, guests: list[common_pb2.Guest], leases: list[str]) -> None:
        self.registry.heartbeat(
            "n1",
            registry_pb2.HeartbeatRequest(table_version=version, guests=guests, lease_ids=leases),
            received=0.0,
        )

    def unchanged(self, version: int) -> None:
        self.registry.heartbeat(
            "n1",
            registry_pb2.HeartbeatRequest(table_version=version, table_unchanged=True),
            received=0.0,
        )

    def acquire(self, session: str) -> asyncio.Task[object]:
        request = lease_pb2.AcquireLeaseRequest(
            src_ip="192.0.2.1", protocol=common_pb2.PROTOCOL_SSH, session=session
        )
        return asyncio.create_task(self.leases.acquire("s1", request))

    async def queued(self, count: int) -> None:
        """Let the acquires run until ``count`` of them wait for a guest."""
        await until(lambda: len(self.registry.waiters) == count)

    async def call(self) -> Call:
        """The next AllocateGuest call (failing, not hanging, if none comes)."""
        await until(lambda: not self.node.calls.empty())
        return self.node.calls.get_nowait()


def guest(guest_id: str, state: common_pb2.GuestState.ValueType) -> common_pb2.Guest:
    return common_pb2.Guest(id=guest_id, state=state)


def granted(call: Call, guest_id: str, version: int) -> None:
    call.answer.set_result(
        poolnode_pb2.AllocateGuestResponse(
            guest=guest(guest_id, LEASED),
            credentials=common_pb2.GuestCredentials(),
            table_version=version,
        )
    )


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    """One node of two guests; acquires wait up to an hour (only a wake-up ends a wait)."""
    store = StateStore(tmp_path / "controller.sqlite3")
    await store.open()
    node = HeldNode()
    registry, leases = bookkeeping(store, node, dead_after=3600.0)
    await registry.register_node(
        "n1", registry_pb2.RegisterPoolNodeRequest(address="127.0.0.1:1", capacity=2)
    )
    yield Fleet(registry, leases, node)
    await store.close()


async def test_a_guest_freed_while_an_allocation_is_answered_wakes_a_waiter(
    fleet: Fleet,
) -> None:
    fleet.table(1, [guest("g1", PRISTINE), guest("g2", LEASED)], ["L0"])
    first = fleet.acquire("a")
    call = await fleet.call()
    second = fleet.acquire("b")
    await fleet.queued(1)
    # Before the node's answer arrives, its table shows the allocation already and g2
    # back pristine: the promise to the first acquire must not hide g2.
    fleet.table(3, [guest("g1", LEASED), guest("g2", PRISTINE)], [call.request.lease_id])
    granted(call, "g1", 2)
    await first
    granted(await fleet.call(), "g2", 4)
    await second


async def test_an_acquire_that_leaves_mid_allocation_hands_its_guest_on(fleet: Fleet) -> None:
    fleet.table(1, [guest("g1", PRISTINE), guest("g2", LEASED)], ["L0"])
    first = fleet.acquire("a")
    await fleet.call()
    second = fleet.acquire("b")
    await fleet.queued(1)
    first.cancel()
    # The node never allocated: g1 is still pristine and goes to the waiting acquire.
    call = await fleet.call()
    granted(call, "g1", 2)
    await second
    assert fleet.registry.nodes["n1"].view.reserved == 0
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_node_whose_call_failed_is_asked_again_after_its_next_heartbeat(
    fleet: Fleet,
) -> None:
    fleet.table(1, [guest("g1", PRISTINE), guest("g2", LEASED)], ["L0"])
    acquiring = fleet.acquire("a")
    (await fleet.call()).answer.set_result(
        RPCError("AllocateGuest", grpc.StatusCode.UNAVAILABLE, "connection reset")
    )
    # Not asked again at once (it would fail again): the acquire waits...
    await fleet.queued(1)
    assert fleet.node.calls.empty()
    # ...until the node heartbeats, its table unchanged.
    fleet.unchanged(1)
    granted(await fleet.call(), "g1", 2)
    await acquiring
