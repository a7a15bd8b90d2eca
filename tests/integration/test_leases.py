"""Lease placement and fleet liveness: a real controller and real pool-node gRPC servers."""

from __future__ import annotations

import time

import grpc
import pytest

from controller.models import LeaseState
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import fleet_pb2, fleet_pb2_grpc, lease_pb2
from tests.conftest import until
from tests.integration.leasing import Sensor, fleet_with_nodes, store_held


async def test_leases_spread_by_pristine_capacity(
    start_controller, start_pool_node, fleet_pki
) -> None:
    _controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 3, "n2": 2, "n3": 1}
    )
    sensor = Sensor(fleet_pki, "s1", address)
    placed = [
        (await sensor.acquire(f"203.0.113.{i}", f"sess{i}")).lease.pool_node for i in range(6)
    ]
    # Most pristine first, re-evaluated after every allocation; ties go to the node with
    # fewer active leases.
    assert placed == ["n1", "n2", "n1", "n3", "n2", "n1"]
    for name, node in nodes.items():
        assert len(node.pool.snapshot().lease_ids) == placed.count(name)
    # Every guest is used: the seventh attacker waits lease_wait and is refused.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.acquire("203.0.113.99")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "lease_wait" in (e.value.details() or "")


async def test_same_attacker_from_two_sensors_gets_same_guest(
    start_controller, start_pool_node, fleet_pki
) -> None:
    _, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 2, "n2": 2, "n3": 2}
    )
    first = await Sensor(fleet_pki, "s1", address).acquire("198.51.100.7", "a")
    other = await Sensor(fleet_pki, "s2", address).acquire("198.51.100.8", "b")
    again = await Sensor(fleet_pki, "s2", address).acquire("198.51.100.7", "c")
    assert (again.lease.pool_node, again.lease.guest) == (first.lease.pool_node, first.lease.guest)
    assert again.lease.sensor == "sensor/s2" and first.lease.sensor == "sensor/s1"
    assert other.lease.guest != first.lease.guest
    # SSH runs on the pool node's own login into the guest: no credentials for sensors.
    assert not first.credentials.username and not first.credentials.password


async def test_affinity_survives_release_while_guest_idles(
    start_controller, start_pool_node, fleet_pki
) -> None:
    _, address, _ = await fleet_with_nodes(start_controller, start_pool_node, {"n1": 2, "n2": 2})
    sensor = Sensor(fleet_pki, "s1", address)
    first = await sensor.acquire("198.51.100.20", "a")
    released = await sensor.release(first.lease.id)
    assert released.state == lease_pb2.LEASE_STATE_RELEASED
    assert (await sensor.release(first.lease.id)).state == lease_pb2.LEASE_STATE_RELEASED
    again = await sensor.acquire("198.51.100.20", "b")
    assert again.lease.guest == first.lease.guest


async def test_sensor_identity_comes_from_certificate(
    start_controller, start_pool_node, fleet_pki
) -> None:
    _, address, _ = await fleet_with_nodes(start_controller, start_pool_node, {"n1": 2})
    mine = await Sensor(fleet_pki, "s1", address).acquire("192.0.2.1")
    thief = Sensor(fleet_pki, "s2", address)
    for call in (thief.renew, thief.release):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(mine.lease.id)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_bad_lease_requests_name_the_field(
    start_controller, start_pool_node, fleet_pki
) -> None:
    _, address, _ = await fleet_with_nodes(start_controller, start_pool_node, {"n1": 1})
    sensor = Sensor(fleet_pki, "s1", address)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.acquire("not-an-ip")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "src_ip" in (e.value.details() or "")


async def test_labels_restrict_nodes(start_controller, start_pool_node, fleet_pki) -> None:
    controller, address = await start_controller()
    await start_pool_node("plain", address, guests=2)
    await start_pool_node("wrt", address, guests=2, labels={"image": "openwrt"})
    await until(
        lambda: (
            len(controller.registry.nodes) == 2
            and all(n.counts.pristine == 2 for n in controller.registry.nodes.values())
        )
    )
    sensor = Sensor(fleet_pki, "s1", address)
    for i in range(2):
        assert (await sensor.acquire(f"192.0.2.{i}", image="openwrt")).lease.pool_node == "wrt"
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.acquire("192.0.2.50", image="openwrt")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_shared_guests_only_where_allowed(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address = await start_controller()
    await start_pool_node("solo", address, guests=1)
    await start_pool_node("shared", address, guests=1, share_guests=True)
    await until(
        lambda: (
            len(controller.registry.nodes) == 2
            and all(n.counts.pristine == 1 for n in controller.registry.nodes.values())
        )
    )
    sensor = Sensor(fleet_pki, "s1", address)
    a = await sensor.acquire("192.0.2.1")
    b = await sensor.acquire("192.0.2.2")
    assert {a.lease.pool_node, b.lease.pool_node} == {"solo", "shared"}
    c = await sensor.acquire("192.0.2.3")
    assert c.lease.pool_node == "shared" and c.lease.shared


async def test_dead_node_gets_no_leases_and_its_leases_fail(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 3, "n2": 2}
    )
    sensor = Sensor(fleet_pki, "s1", address)
    on_n1 = await sensor.acquire("192.0.2.10")
    assert on_n1.lease.pool_node == "n1"
    await nodes["n1"].stop(grace=0)
    await until(lambda: controller.registry.nodes["n1"].state.name == "DEAD")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.renew(on_n1.lease.id)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "n1 stopped heartbeating" in (e.value.details() or "")
    # The same attacker now lands on the live node.
    assert (await sensor.acquire("192.0.2.10")).lease.pool_node == "n2"
    assert (await sensor.acquire("192.0.2.11")).lease.pool_node == "n2"
    admin = fleet_pb2_grpc.FleetServiceStub(
        secure_channel(address, fleet_pki.files(Role.ADMIN, "alice"))
    )
    listed = await admin.ListPoolNodes(
        fleet_pb2.ListPoolNodesRequest(state=fleet_pb2.POOL_NODE_STATE_DEAD)
    )
    assert [n.name for n in listed.pool_nodes] == ["n1"]


async def test_unrenewed_lease_expires_and_node_is_told(
    start_controller, start_pool_node, fleet_pki
) -> None:
    # A TTL no test outlives: the lease is still held when checked, and expires only
    # once the test makes it overdue (as a sensor that stopped renewing would); upkeep
    # checks every 5 s.
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 1}, lease_ttl=3600.0
    )
    sensor = Sensor(fleet_pki, "s1", address)
    lease = (await sensor.acquire("192.0.2.30")).lease
    pool = nodes["n1"].pool
    assert pool.lease_sensor(lease.id) == "sensor/s1"
    controller.leases.active[lease.id].expire_time = time.time() - 1
    await until(lambda: pool.lease_sensor(lease.id) is None)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.renew(lease.id)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in (e.value.details() or "")


async def test_drain_stops_new_leases_but_keeps_running_ones(
    start_controller, start_pool_node, fleet_pki
) -> None:
    _controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 3, "n2": 2}
    )
    sensor = Sensor(fleet_pki, "s1", address)
    running = await sensor.acquire("192.0.2.40")
    assert running.lease.pool_node == "n1"
    admin = fleet_pb2_grpc.FleetServiceStub(
        secure_channel(address, fleet_pki.files(Role.ADMIN, "alice"))
    )
    drained = await admin.DrainPoolNode(fleet_pb2.DrainPoolNodeRequest(name="n1"))
    assert drained.pool_node.draining
    await until(lambda: nodes["n1"].draining)  # the node hears it with its next heartbeat
    assert (await sensor.acquire("192.0.2.41")).lease.pool_node == "n2"
    # Affinity never overrides a drain.
    assert (await sensor.acquire("192.0.2.40")).lease.pool_node == "n2"
    assert (await sensor.renew(running.lease.id)).state == lease_pb2.LEASE_STATE_ACTIVE
    await admin.ResumePoolNode(fleet_pb2.ResumePoolNodeRequest(name="n1"))
    assert (await sensor.acquire("192.0.2.42")).lease.pool_node == "n1"


async def test_controller_restart_keeps_registry_and_leases(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 2, "n2": 2}
    )
    sensor = Sensor(fleet_pki, "s1", address)
    lease = (await sensor.acquire("192.0.2.60")).lease
    await Sensor(fleet_pki, "s2", address).acquire("192.0.2.61")
    port = int(address.rpartition(":")[2])
    await controller.stop(grace=0)

    restarted, address2 = await start_controller(listen=f"127.0.0.1:{port}")
    assert address2 == address
    assert set(restarted.registry.nodes) == {"n1", "n2"}
    assert set(restarted.registry.sensors) == {"s1", "s2"}
    assert lease.id in restarted.leases.active
    # Nodes reconnect by themselves and keep heartbeating.
    await until(
        lambda: all(n.link is not None and n.link.connected.is_set() for n in nodes.values())
    )
    await until(
        lambda: (
            restarted.registry.nodes["n1"].last_heartbeat_time is not None
            and restarted.registry.nodes["n1"].counts.leased
            + restarted.registry.nodes["n2"].counts.leased
            == 2
        )
    )
    assert (await sensor.renew(lease.id)).state == lease_pb2.LEASE_STATE_ACTIVE
    admin = fleet_pb2_grpc.FleetServiceStub(
        secure_channel(address, fleet_pki.files(Role.ADMIN, "alice"))
    )
    leases = await admin.ListLeases(fleet_pb2.ListLeasesRequest(state=lease_pb2.LEASE_STATE_ACTIVE))
    assert len(leases.leases) == 2
    # A sensor's new request keeps affinity with the lease made before the restart.
    assert (await sensor.acquire("192.0.2.60")).lease.guest == lease.guest


async def test_only_a_dead_node_can_be_removed_and_it_stays_removed(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 1, "n2": 1}
    )
    admin = fleet_pb2_grpc.FleetServiceStub(
        secure_channel(address, fleet_pki.files(Role.ADMIN, "alice"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await admin.RemovePoolNode(fleet_pb2.RemovePoolNodeRequest(name="n1"))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "n1 is alive: stop it first" in (e.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await admin.RemovePoolNode(fleet_pb2.RemovePoolNodeRequest(name="n9"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    await nodes["n1"].stop(grace=0)
    await until(lambda: controller.registry.nodes["n1"].state.name == "DEAD")
    removed = await admin.RemovePoolNode(fleet_pb2.RemovePoolNodeRequest(name="n1"))
    assert (removed.pool_node.name, removed.pool_node.state) == (
        "n1",
        fleet_pb2.POOL_NODE_STATE_DEAD,
    )
    listed = await admin.ListPoolNodes(fleet_pb2.ListPoolNodesRequest())
    assert [n.name for n in listed.pool_nodes] == ["n2"]

    # Forgotten for good: a restarted controller does not load it again.
    port = int(address.rpartition(":")[2])
    await controller.stop(grace=0)
    restarted, _ = await start_controller(listen=f"127.0.0.1:{port}")
    assert set(restarted.registry.nodes) == {"n2"}


async def test_expiry_and_release_do_not_wait_for_the_disk(
    start_controller, start_pool_node, fleet_pki
) -> None:
    # A long TTL: only leases this test makes overdue expire; upkeep checks every 5 s.
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 4}, lease_ttl=3600.0
    )
    sensor = Sensor(fleet_pki, "s1", address)
    ids = [(await sensor.acquire(f"192.0.2.{70 + i}", f"s{i}")).lease.id for i in range(4)]
    manager = controller.leases
    overdue, renewed, released, kept = (manager.active[i] for i in ids)
    pool = nodes["n1"].pool
    async with store_held(controller):
        # With the disk busy, leases still end at once and their nodes hear of it.
        overdue.expire_time = time.time() - 1
        await until(lambda: pool.lease_sensor(overdue.id) is None, timeout=30)
        assert (await sensor.renew(renewed.id)).state == lease_pb2.LEASE_STATE_ACTIVE
        assert (await sensor.release(released.id)).state == lease_pb2.LEASE_STATE_RELEASED
        await until(lambda: pool.lease_sensor(released.id) is None)
    await controller.store.flush()
    for lease, state in (
        (overdue, LeaseState.EXPIRED),
        (renewed, LeaseState.ACTIVE),
        (released, LeaseState.RELEASED),
        (kept, LeaseState.ACTIVE),
    ):
        stored = await controller.store.get_lease(lease.id)
        assert stored is not None and stored.state is state
    assert pool.lease_sensor(renewed.id) == pool.lease_sensor(kept.id) == "sensor/s1"


async def test_list_leases_refuses_an_unknown_state_naming_the_field(
    start_controller, fleet_pki
) -> None:
    _, address = await start_controller()
    admin = fleet_pb2_grpc.FleetServiceStub(
        secure_channel(address, fleet_pki.files(Role.ADMIN, "alice"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await admin.ListLeases(fleet_pb2.ListLeasesRequest(state=99))  # type: ignore[arg-type]
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "state 99" in (e.value.details() or "")
