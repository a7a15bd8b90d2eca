"""Lease calls on the sensor's one stream (LeaseService.Leases), against a real controller."""

from __future__ import annotations

import asyncio

import pytest

from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import common_pb2
from sensor.leases import LeaseClient, LeaseFailed
from tests.conftest import until
from tests.integration.leasing import fleet_with_nodes


async def test_calls_on_the_stream_are_answered_each_under_its_own_id(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 2, "n2": 2}
    )
    channel = secure_channel(address, fleet_pki.files(Role.SENSOR, "s1"))
    client = LeaseClient(channel, timeout=20.0, labels={})
    try:
        # Four at once, answered in whatever order they are placed.
        leases = await asyncio.gather(
            *(client.acquire(f"192.0.2.{i}", f"s{i}", common_pb2.PROTOCOL_SSH) for i in range(4))
        )
        assert {lease.id for lease in leases} == set(controller.leases.active)
        for lease in leases:
            assert nodes[lease.pool_node].pool.lease_sensor(lease.id) == "sensor/s1"
        # A fifth finds no guest: the controller's answer (not a timeout) comes back.
        with pytest.raises(LeaseFailed, match="RESOURCE_EXHAUSTED"):
            await LeaseClient(channel, timeout=2.0, labels={}).acquire(
                "192.0.2.9", "late", common_pb2.PROTOCOL_SSH
            )
        await asyncio.gather(*(client.release(lease, "session closed") for lease in leases))
        assert not controller.leases.active
    finally:
        client.close()
        await channel.close(None)


async def test_a_closed_stream_cancels_the_calls_it_carried(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 1}, lease_wait=20.0
    )
    channel = secure_channel(address, fleet_pki.files(Role.SENSOR, "s1"))
    client = LeaseClient(channel, timeout=30.0, labels={})
    try:
        held = await client.acquire("192.0.2.1", "a", common_pb2.PROTOCOL_SSH)
        waiting = asyncio.ensure_future(client.acquire("192.0.2.2", "b", common_pb2.PROTOCOL_SSH))
        await until(lambda: len(controller.registry.waiters) == 1)
        client.close()
        # The controller stops waiting for a guest nobody will use...
        await until(lambda: len(controller.registry.waiters) == 0)
        # ...and the sensor's request fails at once, as a cancelled call would.
        with pytest.raises(LeaseFailed, match="CANCELLED"):
            await waiting
        # The next call opens a new stream.
        await client.release(held, "session closed")
        assert not controller.leases.active
    finally:
        client.close()
        await channel.close(None)
