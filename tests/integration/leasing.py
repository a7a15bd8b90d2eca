"""Helpers of the lease tests: a sensor's lease calls, a fleet of pool nodes, a held store."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from controller.server import Controller
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import common_pb2, lease_pb2, lease_pb2_grpc
from poolnode.server import PoolNode
from tests.conftest import ControllerFactory, FleetPki, PoolNodeFactory, until


@contextlib.asynccontextmanager
async def store_held(controller: Controller) -> AsyncIterator[None]:
    """Hold the state store's only thread: every write waits until the block ends.

    Lease changes happen in memory first and are then saved, so this freezes whoever
    writes at the point where it awaits the disk, while everything else runs on.
    """
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(60)  # bounded: a failing test must not wedge the store forever

    holder = asyncio.ensure_future(controller.store._run(hold))
    try:
        await until(entered.is_set)
        yield
    finally:
        release.set()
        await holder


class Sensor:
    """A sensor's lease client over a real mTLS channel."""

    def __init__(self, fleet_pki: FleetPki, name: str, controller: str) -> None:
        self.channel = secure_channel(controller, fleet_pki.files(Role.SENSOR, name))
        self.stub = lease_pb2_grpc.LeaseServiceStub(self.channel)

    async def acquire(
        self, src_ip: str, session: str = "s", *, timeout: float = 10, **labels: str
    ) -> lease_pb2.AcquireLeaseResponse:
        return await self.stub.AcquireLease(
            lease_pb2.AcquireLeaseRequest(
                src_ip=src_ip, protocol=common_pb2.PROTOCOL_SSH, session=session, labels=labels
            ),
            timeout=timeout,
        )

    async def renew(self, lease_id: str) -> lease_pb2.Lease:
        return (await self.stub.RenewLease(lease_pb2.RenewLeaseRequest(lease_id=lease_id))).lease

    async def release(self, lease_id: str) -> lease_pb2.Lease:
        response = await self.stub.ReleaseLease(
            lease_pb2.ReleaseLeaseRequest(lease_id=lease_id, reason="session closed")
        )
        return response.lease


async def fleet_with_nodes(
    start_controller: ControllerFactory,
    start_pool_node: PoolNodeFactory,
    sizes: dict[str, int],
    node_options: dict[str, object] | None = None,
    **kw: object,
) -> tuple[Controller, str, dict[str, PoolNode]]:
    """A controller and pool nodes (name -> guests), all registered and heartbeating."""
    controller, address = await start_controller(**kw)
    nodes = {
        name: await start_pool_node(name, address, guests=n, **(node_options or {}))
        for name, n in sizes.items()
    }
    await until(
        lambda: all(
            n in controller.registry.nodes
            and controller.registry.nodes[n].counts.pristine == sizes[n]
            for n in sizes
        )
    )
    return controller, address, nodes
