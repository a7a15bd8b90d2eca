"""The controller's lease bookkeeping against real pool nodes (static backend, mTLS).

No herd, no double-counted guest, no stale lease, sensors alive by their event stream,
leases that outlive a controller restart, and guests counted no higher than the
controller allows a node.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest

from controller.models import LeaseState
from controller.server import Controller
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import fleet_pb2, fleet_pb2_grpc, lease_pb2
from tests.conftest import until
from tests.integration.leasing import Sensor, fleet_with_nodes, store_held
from tests.integration.test_events_ingest import batches, session_events, stream_all


def allocate_calls(controller: Controller, result: str) -> float:
    """AllocateGuest calls the controller made, by result."""
    value = controller.events.metrics_registry.get_sample_value(
        "honeyfleet_lease_allocate_calls_total", {"result": result}
    )
    return value or 0.0


async def test_waiting_acquires_are_woken_one_per_freed_guest(
    start_controller, start_pool_node, fleet_pki
) -> None:
    # Three nodes of two guests; a released guest is recycled (unused_timeout) and comes
    # back pristine. Twelve acquires wait meanwhile: each freed guest must cost exactly
    # one AllocateGuest call, not one per waiter.
    controller, address, _ = await fleet_with_nodes(
        start_controller,
        start_pool_node,
        {"n1": 2, "n2": 2, "n3": 2},
        node_options={"unused_timeout": 0.3},
        lease_wait=60.0,
    )
    sensor = Sensor(fleet_pki, "s1", address)
    held = [(await sensor.acquire(f"192.0.2.{i}", f"h{i}")).lease.id for i in range(6)]
    waiting = [
        asyncio.ensure_future(sensor.acquire(f"198.51.100.{i}", f"w{i}", timeout=90))
        for i in range(12)
    ]
    await until(lambda: len(controller.registry.waiters) == 12)
    released: set[str] = set()
    for granted in (6, 12):
        for lease_id in held:
            await sensor.release(lease_id)
        released.update(held)
        await until(lambda n=granted: sum(w.done() for w in waiting) == n, timeout=60)
        held = [w.result().lease.id for w in waiting if w.done()]
        held = [lease_id for lease_id in held if lease_id not in released]
    assert all(w.done() and not w.exception() for w in waiting)
    assert allocate_calls(controller, "granted") == 18
    assert allocate_calls(controller, "refused") == 0


async def test_concurrent_acquires_never_count_on_the_same_last_guest(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 1, "n2": 1}
    )
    sensor = Sensor(fleet_pki, "s1", address)
    # Both ask at once: the first is promised n1's only guest before it even calls, so
    # the second goes straight to n2. Nobody is refused by a node.
    first, second = await asyncio.gather(
        sensor.acquire("192.0.2.1", "a"), sensor.acquire("192.0.2.2", "b")
    )
    assert {first.lease.pool_node, second.lease.pool_node} == {"n1", "n2"}
    assert allocate_calls(controller, "refused") == 0
    # A third finds no free guest anywhere and waits rather than asking a node.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.acquire("192.0.2.3", "c")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert allocate_calls(controller, "refused") == 0
    assert allocate_calls(controller, "granted") == 2
    for node in nodes.values():
        assert len(node.pool.snapshot().lease_ids) == 1


async def test_a_released_lease_is_never_reported_stale(
    start_controller, start_pool_node, fleet_pki, caplog: pytest.LogCaptureFixture
) -> None:
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 2}
    )
    sensor = Sensor(fleet_pki, "s1", address)
    lease = (await sensor.acquire("192.0.2.50")).lease
    pool = nodes["n1"].pool
    caplog.set_level(logging.INFO, logger="poolnode.pool")
    # The lease's record waits for a busy disk; heartbeats go on meanwhile. The node
    # must hear of the release from the controller, not as a lease it no longer knows.
    async with store_held(controller):
        releasing = asyncio.ensure_future(sensor.release(lease.id))
        await until(lambda: pool.lease_sensor(lease.id) is None)
        # Heartbeats sent after the node let the lease go reach the controller.
        after = time.time() + 2 * controller.config.heartbeat_interval
        await until(lambda: (controller.registry.nodes["n1"].last_heartbeat_time or 0) > after)
    await releasing
    reasons = [
        r.getMessage() for r in caplog.records if f"lease {lease.id} released" in r.getMessage()
    ]
    assert reasons and all(m.endswith("session closed") for m in reasons), reasons
    stale = controller.events.metrics_registry.get_sample_value(
        "honeyfleet_lease_stale_reported_total"
    )
    assert stale == 0


async def test_a_sensor_that_only_streams_events_is_alive(start_controller, fleet_pki) -> None:
    controller, address = await start_controller()
    admin = fleet_pb2_grpc.FleetServiceStub(
        secure_channel(address, fleet_pki.files(Role.ADMIN, "alice"))
    )
    before = time.time()
    await stream_all(fleet_pki, address, "edge9", batches(session_events("edge9")))
    listed = await admin.ListSensors(fleet_pb2.ListSensorsRequest())
    (edge,) = [s for s in listed.sensors if s.name == "edge9"]
    assert edge.last_seen_time.ToNanoseconds() / 1e9 >= before
    assert controller.registry.sensors["edge9"].last_seen_time >= before


async def test_a_lease_older_than_its_ttl_survives_a_controller_restart(
    start_controller, start_pool_node, fleet_pki
) -> None:
    ttl = 4.0
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 2}, lease_ttl=ttl
    )
    sensor = Sensor(fleet_pki, "s1", address)
    lease = (await sensor.acquire("192.0.2.60")).lease
    port = int(address.rpartition(":")[2])
    await controller.stop(grace=0)
    # The outage outlasts the lease's TTL: its stored expiry is in the past.
    await asyncio.sleep(ttl * 1.5)
    restarted, _ = await start_controller(listen=f"127.0.0.1:{port}", lease_ttl=ttl)
    stored = await restarted.store.get_lease(lease.id)
    assert stored is not None and stored.expire_time < time.time()
    # Expiry passes (every ttl/4) run before the sensor, back on a new connection,
    # gets round to renewing.
    await asyncio.sleep(ttl / 2)
    renewed = await Sensor(fleet_pki, "s1", address).renew(lease.id)
    assert renewed.state == lease_pb2.LEASE_STATE_ACTIVE
    # The node comes back (with its own backoff) and keeps the session's guest.
    await until(lambda: nodes["n1"].link is not None and nodes["n1"].link.connected.is_set())
    await until(lambda: restarted.registry.nodes["n1"].counts.leased == 1)
    assert nodes["n1"].pool.lease_sensor(lease.id) == "sensor/s1"
    assert restarted.leases.active[lease.id].state is LeaseState.ACTIVE


async def test_a_node_counts_no_more_guests_than_the_controller_allows(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address = await start_controller(max_node_guests=2)
    await start_pool_node("big", address, guests=4)
    nodes = controller.registry.nodes
    await until(lambda: "big" in nodes and nodes["big"].counts.pristine == 2)
    await asyncio.sleep(0.5)  # several heartbeats: the count stays capped
    assert nodes["big"].counts.pristine == 2
    sensor = Sensor(fleet_pki, "s1", address)
    for i in range(2):
        await sensor.acquire(f"192.0.2.{i}", f"s{i}")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.acquire("192.0.2.9", "s9")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_lease_granted_after_its_sensor_gave_up_is_released_at_once(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 1}, lease_ttl=3600.0
    )
    sensor = Sensor(fleet_pki, "s1", address)
    pool = nodes["n1"].pool
    async with store_held(controller):
        # The node grants the guest, but the lease's record waits for the disk past the
        # sensor's deadline: the sensor never hears of the lease.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await sensor.acquire("192.0.2.70", timeout=1)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Nobody would renew it: it ends now, not a lease_ttl later.
        await until(lambda: not controller.leases.active)
        await until(lambda: not pool.snapshot().lease_ids)
    # The same attacker comes back to the guest, now idle.
    assert (await sensor.acquire("192.0.2.70")).lease.pool_node == "n1"


async def test_a_node_marked_dead_while_it_heartbeats_has_its_guests_counted_again(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(start_controller, start_pool_node, {"n1": 2})
    node = controller.registry.nodes["n1"]
    # As after a stall the controller did not notice: the node's stream stays open and
    # its table does not change, so its heartbeats carry only the version.
    node.last_seen_monotonic -= 3600.0
    assert controller.registry.find_dead(0.0) == [node]
    assert controller.registry.nodes["n1"].counts.pristine == 0
    await until(lambda: controller.registry.nodes["n1"].counts.pristine == 2)
    # On the same stream, at once: it did not have to register again.
    assert controller.registry.nodes["n1"] is node
    lease = (await Sensor(fleet_pki, "s1", address).acquire("192.0.2.80")).lease
    assert lease.pool_node == "n1"
