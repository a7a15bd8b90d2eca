"""Lease placement and fleet liveness: a real controller and real pool-node gRPC servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from controller.models import LeaseState
from controller.server import Controller
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import common_pb2, fleet_pb2, fleet_pb2_grpc, lease_pb2, lease_pb2_grpc
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
        self, src_ip: str, session: str = "s", **labels: str
    ) -> lease_pb2.AcquireLeaseResponse:
        return await self.stub.AcquireLease(
            lease_pb2.AcquireLeaseRequest(
                src_ip=src_ip, protocol=common_pb2.PROTOCOL_SSH, session=session, labels=labels
            ),
            timeout=10,
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
    **kw: object,
) -> tuple[Controller, str, dict[str, PoolNode]]:
    """A controller and pool nodes (name -> guests), all registered and heartbeating."""
    controller, address = await start_controller(**kw)
    nodes = {name: await start_pool_node(name, address, guests=n) for name, n in sizes.items()}
    await until(
        lambda: all(
            n in controller.registry.nodes
            and controller.registry.nodes[n].counts.pristine == sizes[n]
            for n in sizes
        )
    )
    return controller, address, nodes


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
    assert first.credentials.username == "root" and first.credentials.password


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


async def test_expiry_spares_leases_renewed_or_released_while_it_runs(
    start_controller, start_pool_node, fleet_pki, caplog: pytest.LogCaptureFixture
) -> None:
    # A long TTL: only leases this test makes overdue expire; upkeep checks every 5 s.
    controller, address, nodes = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 4}, lease_ttl=3600.0
    )
    sensor = Sensor(fleet_pki, "s1", address)
    ids = [(await sensor.acquire(f"192.0.2.{70 + i}", f"s{i}")).lease.id for i in range(4)]
    manager = controller.leases
    first, renewed, released, last = (manager.active[i] for i in ids)
    caplog.set_level(logging.ERROR, logger="controller.server")
    async with store_held(controller):
        for lease in (first, renewed, released, last):
            lease.expire_time = time.time() - 1
        # The next upkeep pass takes all four as overdue and now waits to save the first.
        await until(lambda: first.state is LeaseState.EXPIRED, timeout=30)
        # Meanwhile the sensor renews one and releases another.
        renewing = asyncio.ensure_future(manager.renew("sensor/s1", renewed.id))
        releasing = asyncio.ensure_future(
            manager.release("sensor/s1", released.id, "session closed")
        )
        await until(
            lambda: renewed.expire_time > time.time() and released.state is LeaseState.RELEASED
        )
    async with asyncio.timeout(30):
        assert (await renewing).state is LeaseState.ACTIVE
        await releasing
    await until(lambda: last.state is LeaseState.EXPIRED, timeout=30)

    assert renewed.state is LeaseState.ACTIVE and renewed.id in manager.active
    assert (released.state, released.end_reason) == (LeaseState.RELEASED, "session closed")
    for lease in (first, renewed, released, last):
        stored = await controller.store.get_lease(lease.id)
        assert stored is not None and stored.state is lease.state
    pool = nodes["n1"].pool
    await until(lambda: pool.lease_sensor(last.id) is None)
    assert pool.lease_sensor(renewed.id) == "sensor/s1"
    assert not [r for r in caplog.records if "upkeep" in r.getMessage()]


async def test_reconcile_spares_leases_released_while_it_runs(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(start_controller, start_pool_node, {"n1": 3})
    sensor = Sensor(fleet_pki, "s1", address)
    ids = [(await sensor.acquire(f"192.0.2.{80 + i}", f"s{i}")).lease.id for i in range(3)]
    manager = controller.leases
    lost, released, also_lost = (manager.active[i] for i in ids)
    for lease in (lost, released, also_lost):
        lease.create_time -= 3600  # well past the grace for leases a heartbeat may miss
    async with store_held(controller):
        # A heartbeat from n1 without these leases (it lost their guests): failing the
        # first waits on the disk...
        reconciling = asyncio.ensure_future(manager.reconcile("n1", {}))
        await until(lambda: lost.state is LeaseState.FAILED)
        # ...while the sensor releases the second.
        releasing = asyncio.ensure_future(
            manager.release("sensor/s1", released.id, "session closed")
        )
        await until(lambda: released.state is LeaseState.RELEASED)
    async with asyncio.timeout(30):
        # Raising here would abort the node's heartbeat stream.
        assert await reconciling == []
        await releasing
    assert (released.state, released.end_reason) == (LeaseState.RELEASED, "session closed")
    assert also_lost.state is LeaseState.FAILED
    assert not manager.active


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
