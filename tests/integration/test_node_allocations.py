"""How the controller asks real pool nodes for guests: on the node's heartbeat stream,
or by an AllocateGuest call when the node does not take allocations there."""

from __future__ import annotations

from typing import Any

import pytest

from controller.server import Controller
from honeyfleet.errors import Unavailable
from poolnode.controller_link import ControllerLink
from poolnode.service import PoolNodeServicer
from tests.integration.leasing import Sensor, fleet_with_nodes


def allocations(controller: Controller, result: str) -> float:
    """Allocations the controller asked nodes for, by result."""
    value = controller.events.metrics_registry.get_sample_value(
        "honeyfleet_lease_allocate_calls_total", {"result": result}
    )
    return value or 0.0


def refuse_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pool nodes fail every AllocateGuest call from now on."""

    async def refused(self: PoolNodeServicer, request: Any, context: Any) -> Any:
        raise Unavailable("this test allows no AllocateGuest call")

    monkeypatch.setattr(PoolNodeServicer, "AllocateGuest", refused)


async def test_a_node_is_asked_for_guests_on_its_heartbeat_stream(
    start_controller, start_pool_node, fleet_pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_calls(monkeypatch)
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 2}
    )
    sensor = Sensor(fleet_pki, "s1", address)
    leases = [(await sensor.acquire(f"192.0.2.{i}")).lease for i in (1, 2)]
    pool = nodes["n1"].pool
    assert {pool.lease_sensor(lease.id) for lease in leases} == {"sensor/s1"}
    assert allocations(controller, "granted") == 2
    assert allocations(controller, "failed") == 0


async def test_a_node_that_does_not_take_allocations_on_its_stream_is_called(
    start_controller, start_pool_node, fleet_pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a pool node of an earlier release registers.
    monkeypatch.setattr(ControllerLink, "stream_allocations", False)
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 1}
    )
    lease = (await Sensor(fleet_pki, "s1", address).acquire("192.0.2.1")).lease
    assert nodes["n1"].pool.lease_sensor(lease.id) == "sensor/s1"
    assert not controller.registry.nodes["n1"].stream_allocations
    assert allocations(controller, "granted") == 1
