"""PostgreSQL stopped mid-stream and started again: ingest pauses, then completes, losing nothing.

While the store is down the controller acknowledges nothing, reports the ingest
service NOT_SERVING and ``honeyfleet_store_up`` 0, and holds at most
``ingest_queue_batches`` batches (the other streams wait: backpressure). When the
server is back, the held batches are written and acknowledged without any help.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from tests.conftest import ControllerFactory, FleetPki, until
from tests.integration.test_events_ingest import (
    SensorStream,
    batches,
    bulk_events,
    postgres_counts,
)

if TYPE_CHECKING:  # imported by pytest_plugins, before assertion rewriting would see it
    from tests.postgres import PostgresServer

pytest_plugins = ["tests.postgres"]
pytestmark = pytest.mark.postgres
SENSORS = ["edge1", "edge2", "edge3", "edge4"]
INGEST = "honeyfleet.v1.EventIngestService"
RPC_TIMEOUT = 5  # one health check
STATUS_TIMEOUT = 60  # for the ingest service to report a new status


async def test_postgres_outage_pauses_ingest_then_it_completes(
    postgres_server: PostgresServer,
    postgres_dsn: str,
    start_controller: ControllerFactory,
    fleet_pki: FleetPki,
) -> None:
    controller, address = await start_controller(
        store="postgres", postgres_dsn=postgres_dsn, ingest_queue_batches=2
    )
    work = {name: batches(bulk_events(2000, name)) for name in SENSORS}
    streams = {name: SensorStream(fleet_pki, name, address) for name in SENSORS}
    for name in SENSORS:
        await streams[name].send_all(work[name][:2])

    health = health_pb2_grpc.HealthStub(
        secure_channel(address, fleet_pki.files(Role.ADMIN, "alice"))
    )
    statuses: list[int] = []

    async def ingest_status() -> None:
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service=INGEST), timeout=RPC_TIMEOUT
        )
        statuses.append(reply.status)

    async def until_status(wanted: int) -> None:
        """Poll health until the ingest service reports ``wanted`` (bounded)."""
        async with asyncio.timeout(STATUS_TIMEOUT):
            while not statuses or statuses[-1] != wanted:
                await ingest_status()
                await asyncio.sleep(0.1)

    await postgres_server.stop()
    try:
        held = {name: asyncio.create_task(streams[name].send(work[name][2])) for name in SENSORS}
        await until_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        assert controller.events.metrics.store_up._value.get() == 0
        assert controller.events.metrics.store_errors.labels("write")._value.get() >= 1
        # Nothing is acknowledged while the store is down, and the queue stays bounded.
        assert not any(task.done() for task in held.values())
        assert controller.events.writer._queue.qsize() <= 2
    finally:
        await postgres_server.start()

    acks = await asyncio.wait_for(asyncio.gather(*held.values()), 120)
    assert all(a.stored == len(work["edge1"][2].events) for a in acks)
    await until(lambda: controller.events.metrics.store_up._value.get() == 1)
    statuses.clear()
    await until_status(health_pb2.HealthCheckResponse.SERVING)
    for name in SENSORS:
        await streams[name].send_all(work[name][3:])
        await streams[name].close()
    total = sum(len(b.events) for reqs in work.values() for b in reqs)
    assert await postgres_counts(postgres_dsn) == (total, total)
