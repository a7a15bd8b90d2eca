"""Every client checks who answers: role, and name where it knows it.

Impostors are real servers holding real certificates of the fleet CA, just of the wrong
member: a controller process started with a sensor's (or a pool node's) certificate, and
a pool node answering at an address a lease gives for another node.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.nodeclient import NodeClients
from honeyfleet.errors import RPCError
from honeyfleet.pki import RevocationList, Role
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import certificate_pb2, certificate_pb2_grpc, poolnode_pb2
from sensor.leases import GuestLease
from sensor.tunnel import TunnelConnector, TunnelFailed
from tests.conftest import (
    ControllerFactory,
    FleetPki,
    free_port,
    start_static_pool_node,
    until,
)
from tests.integration.test_tunnel import Tunnel

BIN = Path(sys.executable).parent
RPC_TIMEOUT = 10.0


async def impostor(start_controller: ControllerFactory, stolen: TlsFiles, tmp_path: Path) -> str:
    """A real controller process serving with someone else's certificate; its address."""
    _, address = await start_controller(
        state_dir=tmp_path / "impostor",
        tls_ca=stolen.ca,
        tls_cert=stolen.cert,
        tls_key=stolen.key,
        enroll_listen="",
    )
    return address


async def health(address: str, files: TlsFiles) -> grpc.StatusCode:
    """A health check the way fleet clients dial the controller; its status code."""
    async with secure_channel(address, files) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=RPC_TIMEOUT
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def status_cli(address: str, admin: TlsFiles) -> tuple[int, str]:
    """``honeyfleet status`` as an operator runs it; exit code and stderr."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "honeyfleet"),
        "status",
        "--controller",
        address,
        "--ca",
        str(admin.ca),
        "--cert",
        str(admin.cert),
        "--key",
        str(admin.key),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize(("role", "name"), [(Role.SENSOR, "mole"), (Role.POOLNODE, "rogue")])
async def test_a_controller_with_a_member_certificate_is_refused_by_every_client(
    start_controller, fleet_pki: FleetPki, tmp_path: Path, role: Role, name: str
) -> None:
    _, genuine = await start_controller()
    posing = await impostor(start_controller, fleet_pki.files(role, name), tmp_path)
    admin = fleet_pki.files(Role.ADMIN, "alice")
    # The genuine controller answers every client: the checks refuse only impostors.
    code, err = await status_cli(genuine, admin)
    assert code == 0, err
    code, err = await status_cli(posing, admin)
    assert code != 0
    assert "UNAVAILABLE" in err
    # Pool nodes and sensors dial the controller with the same channel.
    for files in (
        fleet_pki.files(Role.POOLNODE, "n1"),
        fleet_pki.files(Role.SENSOR, "s1"),
        admin,
    ):
        assert await health(genuine, files) == grpc.StatusCode.OK
        assert await health(posing, files) == grpc.StatusCode.UNAVAILABLE


def lease_for(node: str, address: str) -> GuestLease:
    return GuestLease(
        id="no-such-lease",
        pool_node=node,
        pool_node_address=address,
        guest="g",
        ttl=60.0,
        username="u",
        password="p",
    )


async def test_sensors_reach_only_the_pool_node_their_lease_names(
    start_controller, start_pool_node, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    _, address = await start_controller()
    node = await start_pool_node("n2", address, guests=1)
    sensor_posing = await impostor(start_controller, fleet_pki.files(Role.SENSOR, "mole"), tmp_path)
    connector = TunnelConnector(fleet_pki.files(Role.SENSOR, "s1"))
    try:
        # n2 itself answers (and refuses the unknown lease): the handshake passed.
        with pytest.raises(TunnelFailed) as genuine:
            await connector.open(lease_for("n2", node.address), wait=RPC_TIMEOUT)
        assert "UNAVAILABLE" not in str(genuine.value)
        # n2 at the address a lease gives for n1, or a sensor there: no handshake.
        for lease in (lease_for("n1", node.address), lease_for("n1", sensor_posing)):
            with pytest.raises(TunnelFailed, match="UNAVAILABLE"):
                await connector.open(lease, wait=RPC_TIMEOUT)
    finally:
        await connector.close()


async def test_the_controller_reaches_only_the_pool_node_it_names(
    start_controller, start_pool_node, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    _, address = await start_controller()
    node = await start_pool_node("n3", address, guests=1)
    sensor_posing = await impostor(start_controller, fleet_pki.files(Role.SENSOR, "mole"), tmp_path)
    clients = NodeClients(fleet_pki.files(Role.CONTROLLER, "ctl"), timeout=RPC_TIMEOUT)
    try:
        # n3 itself answers (whatever it makes of an empty request): the handshake passed.
        try:
            await clients.allocate("n3", node.address, poolnode_pb2.AllocateGuestRequest())
        except RPCError as answered:
            assert answered.code != grpc.StatusCode.UNAVAILABLE
        # n3 at the address registered for n4 (a node reporting another's address, or
        # whoever took it over), or a sensor there: no handshake.
        for name, posing in (("n4", node.address), ("n3", sensor_posing)):
            with pytest.raises(RPCError) as refused:
                await clients.allocate(name, posing, poolnode_pb2.AllocateGuestRequest())
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await clients.close()


async def test_a_revoked_pool_node_is_refused_by_sensors(
    start_controller, start_pool_node, fleet_pki: FleetPki
) -> None:
    _, address = await start_controller()
    node = await start_pool_node("n4", address, guests=1)
    sensor = fleet_pki.files(Role.SENSOR, "s1")
    connector = TunnelConnector(sensor)
    lease = lease_for("n4", node.address)
    try:
        with pytest.raises(TunnelFailed) as before:
            await connector.open(lease, wait=RPC_TIMEOUT)
        assert "revoked" not in str(before.value)  # the node answered: unknown lease
        node_serial = serial_of(fleet_pki.files(Role.POOLNODE, "n4"))
        RevocationList(fleet_pki.ca.revoked_path).revoke(node_serial, "stolen")
        # What sensors fetch from the controller (it rereads revoked.json every second).
        for _ in range(100):
            revoked = await revoked_serials(address, sensor)
            if node_serial in revoked:
                break
            await asyncio.sleep(0.1)
        connector.update_revoked(revoked)
        with pytest.raises(TunnelFailed, match="revoked"):
            await connector.open(lease, wait=RPC_TIMEOUT)
    finally:
        await connector.close()


async def test_sensors_follow_the_controllers_revocation_list(
    make_fleet, fleet_pki: FleetPki
) -> None:
    fleet = await make_fleet(revocation_interval=0.2)
    gone = serial_of(fleet_pki.files(Role.POOLNODE, "decommissioned"))
    RevocationList(fleet_pki.ca.revoked_path).revoke(gone, "decommissioned")
    tunnels = fleet.sensor.tunnels
    assert tunnels is not None
    await until(lambda: gone in tunnels.revoked)


def serial_of(files: TlsFiles) -> int:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


async def revoked_serials(address: str, files: TlsFiles) -> frozenset[int]:
    async with secure_channel(address, files) as channel:
        reply = await certificate_pb2_grpc.CertificateServiceStub(channel).ListRevoked(
            certificate_pb2.ListRevokedRequest(), timeout=RPC_TIMEOUT
        )
    return frozenset(int(s, 16) for s in reply.serials)


async def test_a_restarted_pool_node_refuses_revoked_callers_before_reaching_the_controller(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, address = await start_controller()
    thief = fleet_pki.files(Role.SENSOR, "thief")
    state = tmp_path / "keeper"
    node = await start_static_pool_node(fleet_pki, "keeper", address, ("127.0.0.1:9",), state)
    try:
        RevocationList(fleet_pki.ca.revoked_path).revoke(serial_of(thief), "stolen")
        # The node learns the list with a heartbeat reply (the controller rereads it each
        # second) and keeps it in its state directory.
        saved = state / "revoked-serials"
        await until(lambda: saved.exists() and f"{serial_of(thief):x}" in saved.read_text())
    finally:
        await node.stop(grace=0)
    await controller.stop(grace=0)
    # Started again with no controller to ask: the saved list is in force from the start.
    node = await start_static_pool_node(
        fleet_pki, "keeper", f"127.0.0.1:{free_port()}", ("127.0.0.1:9",), state
    )
    try:
        tunnel = Tunnel(thief, node.address)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tunnel.open("any-lease")
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        await tunnel.channel.close()
    finally:
        await node.stop(grace=0)
