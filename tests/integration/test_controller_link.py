"""What a pool node's controller link sends on its heartbeat stream, seen by a recording
controller over mTLS on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from honeyfleet.pki.identity import Role
from honeyfleet.tls import server_credentials
from honeyfleet.v1 import common_pb2, poolnode_pb2, registry_pb2, registry_pb2_grpc
from poolnode.controller_link import ControllerLink
from tests.conftest import FleetPki


class RecordingRegistry(registry_pb2_grpc.PoolNodeRegistryServiceServicer):
    """Records every heartbeat message and sends what the test queues."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[registry_pb2.HeartbeatRequest] = asyncio.Queue()
        self.replies: asyncio.Queue[registry_pb2.HeartbeatResponse] = asyncio.Queue()

    async def RegisterPoolNode(
        self, request: registry_pb2.RegisterPoolNodeRequest, context: Any
    ) -> registry_pb2.RegisterPoolNodeResponse:
        """Heartbeats every minute: no heartbeat at the interval within a test."""
        interval = Duration()
        interval.FromSeconds(60)
        return registry_pb2.RegisterPoolNodeResponse(heartbeat_interval=interval)

    async def Heartbeat(
        self, request_iterator: AsyncIterator[registry_pb2.HeartbeatRequest], context: Any
    ) -> AsyncIterator[registry_pb2.HeartbeatResponse]:
        """Record what comes; send what is queued."""

        async def read() -> None:
            async for request in request_iterator:
                self.received.put_nowait(request)

        reader = asyncio.create_task(read())
        try:
            while True:
                yield await self.replies.get()
        finally:
            reader.cancel()


async def test_allocation_answers_carry_a_changed_table_in_an_early_heartbeat(
    fleet_pki: FleetPki,
) -> None:
    registry = RecordingRegistry()
    server = grpc.aio.server()
    registry_pb2_grpc.add_PoolNodeRegistryServiceServicer_to_server(registry, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(fleet_pki.files(Role.CONTROLLER, "ctl"))
    )
    await server.start()
    version = 1
    trips: list[float] = []

    async def allocate(
        request: poolnode_pb2.AllocateGuestRequest,
    ) -> poolnode_pb2.AllocateGuestResponse:
        nonlocal version
        version += 1
        link.nudge()  # a guest changed by itself meanwhile (say one finished booting)
        return poolnode_pb2.AllocateGuestResponse(
            guest=common_pb2.Guest(id="g1", state=common_pb2.GUEST_STATE_LEASED),
            table_version=version,
        )

    link = ControllerLink(
        f"127.0.0.1:{port}",
        fleet_pki.files(Role.POOLNODE, "n1"),
        registration=lambda: registry_pb2.RegisterPoolNodeRequest(
            address="127.0.0.1:1", capacity=1
        ),
        snapshot=lambda: registry_pb2.HeartbeatRequest(table_version=version),
        table_version=lambda: version,
        on_response=lambda reply: asyncio.sleep(0),
        allocate=allocate,
        on_round_trip=trips.append,
    )
    task = asyncio.create_task(link.run())
    try:
        first = await registry.received.get()
        assert not first.early
        registry.replies.put_nowait(
            registry_pb2.HeartbeatResponse(
                allocate=[poolnode_pb2.AllocateGuestRequest(lease_id="l1")]
            )
        )
        # One message, long before the nudge's gap (six seconds) is up: the answer and
        # the table it changed.
        second = await registry.received.get()
        assert [a.lease_id for a in second.allocations] == ["l1"]
        assert second.early
        assert not second.answers_only
        assert second.table_version == 2
        assert not second.table_unchanged
        assert len(trips) == 1  # the first heartbeat's answer; the early one waits for none
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(None)
