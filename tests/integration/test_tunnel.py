"""TunnelService: sensors reach leased guests through the pool node only, as themselves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from honeyfleet.pki.identity import Role
from honeyfleet.tls import Peer, TlsFiles, secure_channel
from honeyfleet.v1 import common_pb2, poolnode_pb2, poolnode_pb2_grpc
from tests.conftest import FleetPki, until
from tests.integration.test_leases import Sensor

BANNER = b"Debian GNU/Linux 12\r\n"
READ_TIMEOUT = 30.0  # for the pool node to answer a tunnel frame, or relay to EOF


async def echo_guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A guest's Telnet port that greets, echoes until EOF, then says goodbye and closes."""
    writer.write(BANNER)
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"bye\n")
        await writer.drain()
    writer.close()


class Tunnel:
    """A sensor-side tunnel call with an outbox."""

    def __init__(self, files: TlsFiles, address: str) -> None:
        self.channel = secure_channel(address, files, Peer(Role.POOLNODE))
        self.outbox: asyncio.Queue[poolnode_pb2.TunnelRequest | None] = asyncio.Queue()
        self.call = poolnode_pb2_grpc.TunnelServiceStub(self.channel).Tunnel(self._requests())

    async def _requests(self) -> AsyncIterator[poolnode_pb2.TunnelRequest]:
        while (item := await self.outbox.get()) is not None:
            yield item

    async def open(
        self,
        lease_id: str,
        port: int = common_pb2.GUEST_PORT_TELNET,
        timeout: float = READ_TIMEOUT,
    ) -> poolnode_pb2.TunnelResponse:
        """Ask for ``port`` of the lease's guest; the first answer, within ``timeout`` s."""
        await self.outbox.put(
            poolnode_pb2.TunnelRequest(open=poolnode_pb2.TunnelOpen(lease_id=lease_id, port=port))
        )
        async with asyncio.timeout(timeout):
            return await self.call.read()

    async def send(self, data: bytes) -> None:
        await self.outbox.put(poolnode_pb2.TunnelRequest(data=data))

    async def eof(self) -> None:
        await self.outbox.put(poolnode_pb2.TunnelRequest(eof=poolnode_pb2.TunnelEof()))

    async def receive_until_eof(self, timeout: float = READ_TIMEOUT) -> bytes:
        """Everything the guest sends until its EOF, all within ``timeout`` s."""
        data = b""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.call.read()
                if frame is grpc.aio.EOF or frame.WhichOneof("frame") == "eof":
                    return data
                data += frame.data


async def leased(
    start_controller, start_pool_node, fleet_pki: FleetPki, sensor: str = "s1"
) -> tuple[str, str]:
    """A controller, a pool node of echo guests, a lease for ``sensor``: (lease, node address)."""
    controller, address = await start_controller()
    node = await start_pool_node("n1", address, guests=2, telnet=echo_guest)
    await until(
        lambda: (
            "n1" in controller.registry.nodes
            and controller.registry.nodes["n1"].counts.pristine == 2
        )
    )
    response = await Sensor(fleet_pki, sensor, address).acquire("203.0.113.5")
    assert response.lease.pool_node_address == node.address
    return response.lease.id, node.address


async def test_tunnel_relays_both_ways_with_half_close(
    start_controller, start_pool_node, fleet_pki: FleetPki
) -> None:
    lease_id, node = await leased(start_controller, start_pool_node, fleet_pki)
    tunnel = Tunnel(fleet_pki.files(Role.SENSOR, "s1"), node)
    opened = await tunnel.open(lease_id)
    assert opened.WhichOneof("frame") == "opened"
    payload = bytes(range(256)) * 1024  # more than one frame each way
    await tunnel.send(payload)
    await tunnel.eof()  # half-close: the guest still answers after our EOF
    data = await tunnel.receive_until_eof()
    assert data == BANNER + payload + b"bye\n"


async def test_another_sensors_lease_is_refused(
    start_controller, start_pool_node, fleet_pki: FleetPki
) -> None:
    lease_id, node = await leased(start_controller, start_pool_node, fleet_pki)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await Tunnel(fleet_pki.files(Role.SENSOR, "s2"), node).open(lease_id)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_unknown_lease_and_bad_first_frame_are_refused(
    start_controller, start_pool_node, fleet_pki: FleetPki
) -> None:
    _, node = await leased(start_controller, start_pool_node, fleet_pki)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await Tunnel(fleet_pki.files(Role.SENSOR, "s1"), node).open("no-such-lease")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    tunnel = Tunnel(fleet_pki.files(Role.SENSOR, "s1"), node)
    await tunnel.send(b"hello")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async with asyncio.timeout(READ_TIMEOUT):
            await tunnel.call.read()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_only_sensors_may_tunnel(
    start_controller, start_pool_node, fleet_pki: FleetPki
) -> None:
    lease_id, node = await leased(start_controller, start_pool_node, fleet_pki)
    for role, name in ((Role.ADMIN, "alice"), (Role.POOLNODE, "n2")):
        tunnel = Tunnel(fleet_pki.files(role, name), node)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await tunnel.open(lease_id)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_releasing_the_lease_cuts_its_tunnel(
    start_controller, start_pool_node, fleet_pki: FleetPki
) -> None:
    controller, address = await start_controller()
    node = await start_pool_node("n1", address, guests=1, telnet=echo_guest)
    await until(
        lambda: (
            "n1" in controller.registry.nodes
            and controller.registry.nodes["n1"].counts.pristine == 1
        )
    )
    sensor = Sensor(fleet_pki, "s1", address)
    lease = (await sensor.acquire("203.0.113.9")).lease
    tunnel = Tunnel(fleet_pki.files(Role.SENSOR, "s1"), node.address)
    await tunnel.open(lease.id)
    await tunnel.send(b"ping")
    async with asyncio.timeout(READ_TIMEOUT):
        await sensor.release(lease.id)
    data = await tunnel.receive_until_eof(timeout=10)
    assert data.startswith(BANNER)
    assert node.pool.metrics.tunnels._value.get() == 0
