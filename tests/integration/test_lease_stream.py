"""Lease calls on the sensor's one stream (LeaseService.Leases), against a real controller."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from honeyfleet.pki.identity import Role
from honeyfleet.tls import secure_channel
from honeyfleet.v1 import common_pb2, lease_pb2, lease_pb2_grpc
from sensor.leases import LeaseClient, LeaseFailed
from sensor.leasestream import LeaseStream
from tests.conftest import until
from tests.integration.leasing import fleet_with_nodes, store_held


def raw_stream(channel: grpc.aio.Channel) -> tuple[asyncio.Queue[lease_pb2.LeasesRequest], Any]:
    """A Leases stream the test writes message by message (the queue), and its call."""
    outbox: asyncio.Queue[lease_pb2.LeasesRequest] = asyncio.Queue()

    async def requests() -> AsyncIterator[lease_pb2.LeasesRequest]:
        while True:
            yield await outbox.get()

    return outbox, lease_pb2_grpc.LeaseServiceStub(channel).Leases(requests())


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
        # Released without an answer of their own, all in one message.
        await asyncio.gather(*(client.release(lease, "session closed") for lease in leases))
        await until(lambda: not controller.leases.active)
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
        await until(lambda: not controller.leases.active)
    finally:
        client.close()
        await channel.close(None)


async def test_a_new_channel_takes_new_calls_and_the_old_stream_answers_its_own(
    start_controller, start_pool_node, fleet_pki
) -> None:
    # As after a certificate renewal: a request waiting for a guest on the old channel
    # still gets its lease; new calls go over the new channel.
    controller, address, _ = await fleet_with_nodes(
        start_controller,
        start_pool_node,
        {"n1": 1},
        node_options={"unused_timeout": 0.3},  # the released guest is soon pristine again
        lease_wait=20.0,
    )
    files = fleet_pki.files(Role.SENSOR, "s1")
    old, new = secure_channel(address, files), secure_channel(address, files)
    client = LeaseClient(old, timeout=30.0, labels={})
    try:
        held = await client.acquire("192.0.2.1", "a", common_pb2.PROTOCOL_SSH)
        waiting = asyncio.ensure_future(client.acquire("192.0.2.2", "b", common_pb2.PROTOCOL_SSH))
        await until(lambda: len(controller.registry.waiters) == 1)
        client.use(new)
        await client.release(held, "session closed")
        granted = await waiting
        assert set(controller.leases.active) == {granted.id}
        await client.release(granted, "session closed")
        await until(lambda: not controller.leases.active)
    finally:
        client.close()
        await old.close(None)
        await new.close(None)


async def test_calls_beyond_the_streams_bound_are_refused_at_once(
    start_controller, fleet_pki
) -> None:
    controller, address = await start_controller(max_concurrent_streams=3)
    channel = secure_channel(address, fleet_pki.files(Role.SENSOR, "s1"))
    outbox, call = raw_stream(channel)
    try:
        # Releases of leases the controller must look up on disk, which is busy: the
        # first three wait there, the other two are refused without waiting.
        async with store_held(controller):
            for i in range(1, 6):
                outbox.put_nowait(
                    lease_pb2.LeasesRequest(
                        id=i, release=lease_pb2.ReleaseLeaseRequest(lease_id=f"gone-{i}")
                    )
                )
            refused = [await call.read(), await call.read()]
            assert {a.id for a in refused} == {4, 5}
            for answer in refused:
                assert answer.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                assert answer.error.retry_after.ToMilliseconds() > 0
        answered = [await call.read() for _ in range(3)]
        assert {a.id for a in answered} == {1, 2, 3}
        assert all(a.error.code == grpc.StatusCode.NOT_FOUND.value[0] for a in answered)
        shed = controller.events.metrics_registry.get_sample_value(
            "honeyfleet_leases_shed_total", {"reason": "stream_calls"}
        )
        assert shed == 2
    finally:
        call.cancel()
        await channel.close(None)


def no_fallback(request: lease_pb2.ReleaseLeaseRequest, seconds: float) -> None:
    """The controller has the stream: releases never need calls of their own."""
    raise AssertionError(f"release {request.lease_id} fell back to a call")


async def test_releases_need_no_answer_and_later_answers_confirm_them(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(start_controller, start_pool_node, {"n1": 3})
    channel = secure_channel(address, fleet_pki.files(Role.SENSOR, "s1"))
    client = LeaseClient(channel, timeout=20.0, labels={})
    outbox, call = raw_stream(channel)
    try:
        leases = [
            await client.acquire(f"192.0.2.{i}", f"s{i}", common_pb2.PROTOCOL_SSH) for i in range(3)
        ]
        # Two releases in a message of their own (and one of a lease nobody holds), then
        # one riding along with a call: only the call is answered, and it confirms all.
        outbox.put_nowait(
            lease_pb2.LeasesRequest(
                id=7,
                releases=[
                    lease_pb2.ReleaseLeaseRequest(lease_id=leases[0].id, reason="done"),
                    lease_pb2.ReleaseLeaseRequest(lease_id="nobody-holds-it"),
                    lease_pb2.ReleaseLeaseRequest(lease_id=leases[1].id, reason="done"),
                ],
            )
        )
        outbox.put_nowait(
            lease_pb2.LeasesRequest(
                id=8,
                renew=lease_pb2.RenewLeaseRequest(lease_id=leases[1].id),
                releases=[lease_pb2.ReleaseLeaseRequest(lease_id=leases[2].id)],
            )
        )
        answer = await call.read()
        assert answer.id == 8
        assert answer.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert answer.releases_through == 8
        assert not controller.leases.active
        ended = {i: await controller.leases.get(lease.id) for i, lease in enumerate(leases)}
        assert ended[0] is not None and ended[0].end_reason == "done"
        assert ended[2] is not None and ended[2].end_reason == "session ended"
    finally:
        call.cancel()
        client.close()
        await channel.close(None)


async def test_drain_returns_once_the_controller_confirmed_the_releases(
    start_controller, start_pool_node, fleet_pki
) -> None:
    controller, address, _ = await fleet_with_nodes(start_controller, start_pool_node, {"n1": 1})
    channel = secure_channel(address, fleet_pki.files(Role.SENSOR, "s1"))
    client = LeaseClient(channel, timeout=20.0, labels={})
    try:
        lease = await client.acquire("192.0.2.1", "a", common_pb2.PROTOCOL_SSH)
        await client.release(lease, "session closed")
        await client.drain()  # as on shutdown, before the stream is closed
        assert not controller.leases.active
    finally:
        client.close()
        await channel.close(None)


class BreakingLeases(lease_pb2_grpc.LeaseServiceServicer):
    """Breaks the first Leases stream at its first message, before taking anything;
    records the releases later streams carry."""

    def __init__(self) -> None:
        self.streams = 0
        self.released: list[str] = []

    async def Leases(
        self, request_iterator: AsyncIterator[lease_pb2.LeasesRequest], context: Any
    ) -> AsyncIterator[lease_pb2.LeasesResponse]:
        self.streams += 1
        async for request in request_iterator:
            if self.streams == 1:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            self.released.extend(release.lease_id for release in request.releases)
        yield lease_pb2.LeasesResponse()


async def test_a_release_a_broken_stream_did_not_confirm_is_sent_again() -> None:
    server = grpc.aio.server()
    leases = BreakingLeases()
    lease_pb2_grpc.add_LeaseServiceServicer_to_server(leases, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = LeaseStream(lease_pb2_grpc.LeaseServiceStub(channel), unimplemented=no_fallback)
    try:
        stream.release(lease_pb2.ReleaseLeaseRequest(lease_id="lease-1"), 60.0)
        await until(lambda: leases.released == ["lease-1"])
        assert leases.streams == 2
    finally:
        stream.close()
        await channel.close(None)
        await server.stop(None)


class FailingLeases(lease_pb2_grpc.LeaseServiceServicer):
    """Ends every Leases stream with INTERNAL at its first request."""

    async def Leases(
        self, request_iterator: AsyncIterator[lease_pb2.LeasesRequest], context: Any
    ) -> AsyncIterator[lease_pb2.LeasesResponse]:
        async for _ in request_iterator:
            await context.abort(grpc.StatusCode.INTERNAL, "broken")
        yield lease_pb2.LeasesResponse()


async def test_a_broken_stream_fails_its_calls_and_leaves_no_task_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = grpc.aio.server()
    lease_pb2_grpc.add_LeaseServiceServicer_to_server(FailingLeases(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = LeaseStream(lease_pb2_grpc.LeaseServiceStub(channel), unimplemented=no_fallback)
    caplog.set_level(logging.ERROR, logger="asyncio")
    try:
        for _ in range(3):  # each call on a new stream, as the last one broke
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stream.call("renew", lease_pb2.RenewLeaseRequest(lease_id="x"), 5.0)
            assert e.value.code() == grpc.StatusCode.INTERNAL
            await asyncio.sleep(0.1)
            gc.collect()
        # gRPC's task sending a broken stream's requests ended with it, not destroyed pending.
        assert not [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    finally:
        stream.close()
        await channel.close(None)
        await server.stop(None)
