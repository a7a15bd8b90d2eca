"""The controller under more demand than it has guests or time for: it sheds early and
visibly, answers before the caller's deadline, and never kills a node for its own stall."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from controller.models import LeaseState
from honeyfleet.errors import RETRY_AFTER_TRAILER
from honeyfleet.intake import timeout_metadata
from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import common_pb2, lease_pb2
from sensor.leases import LeaseClient, LeaseFailed
from tests.conftest import until
from tests.integration.leasing import Sensor, fleet_with_nodes, store_held


async def test_acquires_beyond_the_waiting_queue_are_shed_with_a_retry_hint(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 1}, lease_wait=30.0, max_waiting_acquires=1
    )
    sensor = Sensor(fleet_pki, "s1", address)
    await sensor.acquire("192.0.2.1", "a")
    waiting = asyncio.ensure_future(sensor.acquire("192.0.2.2", "b", timeout=60))
    await until(lambda: len(controller.registry.waiters) == 1)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.acquire("192.0.2.3", "c")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_waiting_acquires" in (e.value.details() or "")
    hint = dict(e.value.trailing_metadata() or ())
    assert int(hint[RETRY_AFTER_TRAILER]) > 0
    metrics = controller.events.metrics_registry
    assert metrics.get_sample_value("honeyfleet_leases_shed_total", {"reason": "queue_full"}) == 1
    assert metrics.get_sample_value("honeyfleet_leases_waiting") == 1
    waiting.cancel()


async def test_a_saturated_controller_sheds_new_acquires_at_once(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 2}, max_acquires_in_flight=1
    )
    sensor = Sensor(fleet_pki, "s1", address)
    # The first request is being placed (its record waits for a busy disk)...
    async with store_held(controller):
        first = asyncio.ensure_future(sensor.acquire("192.0.2.1", "a"))
        await until(lambda: bool(controller.leases.active))
        # ...so a second is refused at once rather than queued behind it.
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await sensor.acquire("192.0.2.2", "b")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_acquires_in_flight" in (e.value.details() or "")
    assert int(dict(e.value.trailing_metadata() or ())[RETRY_AFTER_TRAILER]) > 0
    assert (await first).lease.pool_node == "n1"
    shed = controller.events.metrics_registry.get_sample_value(
        "honeyfleet_leases_shed_total", {"reason": "in_flight"}
    )
    assert shed == 1
    assert (await sensor.acquire("192.0.2.2", "b")).lease.pool_node == "n1"


async def test_a_controller_far_behind_sheds_new_acquires(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 2}, shed_loop_lag=0.5
    )
    sensor = Sensor(fleet_pki, "s1", address)
    # The event loop stops for a while, as a swamped controller's would: the request
    # read right after is shed, not placed behind the backlog.
    time.sleep(1.5)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.acquire("192.0.2.1", "a")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "shed_loop_lag" in (e.value.details() or "")
    assert int(dict(e.value.trailing_metadata() or ())[RETRY_AFTER_TRAILER]) > 0
    shed = controller.events.metrics_registry.get_sample_value(
        "honeyfleet_leases_shed_total", {"reason": "loop_lag"}
    )
    assert shed == 1
    # Caught up, it places requests again.
    await until(lambda: controller.loop_lag.seconds < 0.5)
    assert (await sensor.acquire("192.0.2.1", "a")).lease.pool_node == "n1"


async def test_one_sensor_cannot_hold_more_than_its_quota(
    start_controller, start_pool_node, fleet_pki
) -> None:
    _, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 3}, max_leases_per_sensor=2
    )
    greedy = Sensor(fleet_pki, "greedy", address)
    for i in range(2):
        await greedy.acquire(f"192.0.2.{i}", f"g{i}")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await greedy.acquire("192.0.2.9", "g9")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_leases_per_sensor" in (e.value.details() or "")
    # The last guest is still there for everyone else.
    other = await Sensor(fleet_pki, "other", address).acquire("192.0.2.9", "o")
    assert other.lease.sensor == "sensor/other"


async def test_the_caller_hears_the_answer_before_its_own_deadline(
    start_controller, start_pool_node, fleet_pki
) -> None:
    # The controller would wait far longer than the sensor: it must answer within the
    # sensor's deadline, not let it time out.
    _, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 1}, lease_wait=30.0
    )
    sensor = Sensor(fleet_pki, "s1", address)
    await sensor.acquire("192.0.2.1", "a")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.acquire("192.0.2.2", "b", timeout=2)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_stalled_controller_does_not_kill_heartbeating_nodes(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 1, "n2": 1}, lease_ttl=3600.0
    )
    sensor = Sensor(fleet_pki, "s1", address)
    lease = (await sensor.acquire("192.0.2.1", "a")).lease
    allowance = controller.config.heartbeat_interval * controller.config.missed_heartbeats
    # The whole event loop stops for several missed-heartbeat allowances, as a
    # controller swamped by work would. Its nodes did nothing wrong.
    time.sleep(allowance * 4)
    # Liveness checks run several times after the stall, heartbeats flow again.
    beats = {n: node.last_heartbeat_time for n, node in controller.registry.nodes.items()}
    await until(
        lambda: all(
            (node.last_heartbeat_time or 0) > (beats[n] or 0) + allowance
            for n, node in controller.registry.nodes.items()
        )
    )
    assert all(n.state.name == "ALIVE" for n in controller.registry.nodes.values())
    assert controller.leases.active[lease.id].state is LeaseState.ACTIVE


async def test_a_request_that_waited_in_grpcs_intake_is_shed_on_arrival(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 2}, shed_loop_lag=5.0
    )
    sensor = Sensor(fleet_pki, "s1", address)
    request = lease_pb2.AcquireLeaseRequest(
        src_ip="192.0.2.1", protocol=common_pb2.PROTOCOL_SSH, session="a"
    )
    beats = {n: node.last_heartbeat_time for n, node in controller.registry.nodes.items()}
    # Sent with 60 s, read with 10 s left: it waited ~50 s in gRPC's queues, as calls do
    # behind a swamped grpc.aio loop. It is refused at once, before any lease work.
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await sensor.stub.AcquireLease(request, timeout=10, metadata=timeout_metadata(60))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "before it could be read" in (e.value.details() or "")
    assert int(dict(e.value.trailing_metadata() or ())[RETRY_AFTER_TRAILER]) > 0
    metrics = controller.events.metrics_registry
    assert metrics.get_sample_value("honeyfleet_leases_shed_total", {"reason": "queued"}) == 1
    assert not controller.leases.active
    # A request read as soon as it was sent is placed; the node kept heartbeating.
    reply = await sensor.stub.AcquireLease(request, timeout=10, metadata=timeout_metadata(10))
    assert reply.lease.pool_node == "n1"
    node = controller.registry.nodes["n1"]
    await until(lambda: (node.last_heartbeat_time or 0) > (beats["n1"] or 0))
    assert node.state.name == "ALIVE"


async def test_a_shed_sensor_holds_its_requests_off_for_the_hinted_time(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(
        start_controller, start_pool_node, {"n1": 3}, max_leases_per_sensor=1
    )
    channel = secure_channel(address, fleet_pki.files(Role.SENSOR, "s1"))
    client = LeaseClient(channel, timeout=20.0, labels={})
    try:
        await client.acquire("192.0.2.1", "a", common_pb2.PROTOCOL_SSH)
        with pytest.raises(LeaseFailed, match="RESOURCE_EXHAUSTED"):
            await client.acquire("192.0.2.2", "b", common_pb2.PROTOCOL_SSH)
        # Within the hint the sensor does not even ask: the controller sees no more load.
        with pytest.raises(LeaseFailed, match="shedding"):
            await client.acquire("192.0.2.3", "c", common_pb2.PROTOCOL_SSH)
        shed = controller.events.metrics_registry.get_sample_value(
            "honeyfleet_leases_shed_total", {"reason": "sensor_quota"}
        )
        assert shed == 1
    finally:
        await channel.close(None)
