"""Certificates renew themselves before they expire, without interrupting anything.

The processes start with certificates already past their renewal point (issued "five days
ago" for seven days), so they renew on their own at once; renewals are also forced while an
SSH session runs through sensor, tunnel and pool node.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from honeyfleet.pki import Identity, RevocationList, Role, csr_for, generate_key, private_key_pem
from honeyfleet.pki.certs import build_leaf_certificate
from honeyfleet.pki.identity import identity_from_certificate
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import certificate_pb2, certificate_pb2_grpc
from tests.conftest import FleetPki, start_static_pool_node, until
from tests.integration.ssh_fleet import connect, ssh

RPC_TIMEOUT = 10.0


def overdue(pki: FleetPki, role: Role, name: str, out: Path, **sans: list[str]) -> TlsFiles:
    """Files of a 7-day certificate issued 5 days ago: valid, but due for renewal."""
    out.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    cert = build_leaf_certificate(
        ca_cert=pki.ca.cert,
        ca_key=pki.ca.key,
        identity=Identity(pki.ca.fleet, role, name),
        public_key=key.public_key(),
        validity_days=7,
        now=datetime.now(UTC) - timedelta(days=5),
        **sans,
    )
    files = TlsFiles(ca=out / "ca.pem", cert=out / "cert.pem", key=out / "key.pem")
    files.key.write_bytes(private_key_pem(key))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + pki.ca.chain_pem)
    files.ca.write_bytes(pki.ca.cert_pem)
    return files


def serial(files: TlsFiles) -> int:
    return x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number


def lifetime(files: TlsFiles) -> timedelta:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    return cert.not_valid_after_utc - cert.not_valid_before_utc


async def test_sensor_renews_itself_and_sessions_carry_on(
    make_fleet, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    files = overdue(fleet_pki, Role.SENSOR, "sensor-1", tmp_path / "tls")
    first = serial(files)
    fleet = await make_fleet(tls_ca=files.ca, tls_cert=files.cert, tls_key=files.key)
    await until(lambda: serial(files) != first)
    assert lifetime(files) == timedelta(days=7, minutes=5)  # cert_validity_days + backdating
    assert files.identity() == Identity("testfleet", Role.SENSOR, "sensor-1")

    async with await connect(fleet) as conn:
        process = await conn.create_process(term_type="xterm")
        process.stdin.write("echo before\n")
        await process.stdout.readuntil("before\r\n")
        # Renewed twice more with the session open: sensor, then pool node.
        assert fleet.sensor.renewer is not None and fleet.node.renewer is not None
        await fleet.sensor.renewer.renew()
        await fleet.node.renewer.renew()
        process.stdin.write("echo after\n")
        await process.stdout.readuntil("after\r\n")
        process.stdin.write("exit\n")
        await process.wait_closed()
    # A new session leases and tunnels with the new certificates.
    code, out, err = await ssh(fleet, "echo", "fresh")
    assert (code, out) == (0, b"fresh\n"), err
    # Renewing does not revoke: the old certificate just runs out.
    revoked = RevocationList(fleet_pki.ca.revoked_path)
    assert first not in revoked.serials()


async def test_pool_node_renews_itself_and_stays_registered(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, address = await start_controller(cert_validity_days=3)
    files = overdue(fleet_pki, Role.POOLNODE, "renewing", tmp_path / "tls", ips=["127.0.0.1"])
    first = serial(files)
    node = await start_static_pool_node(
        fleet_pki,
        "renewing",
        address,
        ("127.0.0.1:9",),
        tmp_path / "node",
        tls_ca=files.ca,
        tls_cert=files.cert,
        tls_key=files.key,
    )
    try:
        await until(lambda: serial(files) != first)
        assert lifetime(files) == timedelta(days=3, minutes=5)
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        await until(lambda: "renewing" in controller.registry.nodes)
    finally:
        await node.stop(grace=0)


async def test_renewal_keeps_the_callers_identity_and_refuses_the_revoked(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    _, address = await start_controller()
    files = overdue(fleet_pki, Role.SENSOR, "asks-for-more", tmp_path / "tls")
    # The CSR asks to be the controller: only its key is used.
    csr = csr_for(generate_key(), Identity("testfleet", Role.CONTROLLER, "ctl"))

    async def renew() -> x509.Certificate:
        async with secure_channel(address, files) as channel:
            response = await certificate_pb2_grpc.CertificateServiceStub(channel).Renew(
                certificate_pb2.RenewRequest(csr_pem=csr.decode()), timeout=RPC_TIMEOUT
            )
        return x509.load_pem_x509_certificate(response.certificate_pem.encode())

    cert = await renew()
    assert identity_from_certificate(cert) == Identity("testfleet", Role.SENSOR, "asks-for-more")
    RevocationList(fleet_pki.ca.revoked_path).revoke(serial(files), "test")

    async def refused() -> bool:
        try:
            await renew()
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    for _ in range(100):
        if await refused():
            return
        await asyncio.sleep(0.1)
    pytest.fail("a revoked certificate could still renew itself")
