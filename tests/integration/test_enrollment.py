"""Enrolment cannot mint someone else: takeover attempts against a real controller.

The joiner is played both by ``honeyfleet.enroll`` (the honest client) and by raw
EnrollRequests (a hostile client that skips the client-side checks).
"""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from controller.server import Controller
from honeyfleet.enroll import enroll
from honeyfleet.errors import HoneyfleetError
from honeyfleet.pki import Identity, Role, create_token, csr_for, generate_key
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import enrollment_pb2, enrollment_pb2_grpc, sensor_pb2, sensor_pb2_grpc
from tests.conftest import FleetPki

BIN = Path(sys.executable).parent
RPC_TIMEOUT = 10.0


def tls_in(directory: Path) -> TlsFiles:
    return TlsFiles(ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")


def token(pki: FleetPki, role: Role, name: str, **kw: object) -> str:
    return create_token(pki.ca, role, ttl=timedelta(minutes=5), name=name, **kw)  # type: ignore[arg-type]


async def raw_enroll(
    controller: Controller, pki: FleetPki, tok: str, name: str, **fields: list[str]
) -> enrollment_pb2.EnrollResponse:
    """An EnrollRequest as a hostile joiner would send it, with no client-side checks."""
    csr = csr_for(generate_key(), Identity("testfleet", Role.SENSOR, name or "x"))
    request = enrollment_pb2.EnrollRequest(token=tok, csr_pem=csr.decode(), name=name, **fields)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.cert_pem)
    assert controller.ports is not None
    target = f"127.0.0.1:{controller.ports.enroll}"
    async with grpc.aio.secure_channel(target, credentials) as channel:
        stub = enrollment_pb2_grpc.EnrollmentServiceStub(channel)
        response: enrollment_pb2.EnrollResponse = await stub.Enroll(request, timeout=RPC_TIMEOUT)
        return response


def enroll_target(controller: Controller) -> str:
    assert controller.ports is not None
    return f"127.0.0.1:{controller.ports.enroll}"


async def register(address: str, files: TlsFiles) -> str:
    """RegisterSensor with ``files``; the controller's name for the caller."""
    async with secure_channel(address, files) as channel:
        reply = await sensor_pb2_grpc.SensorServiceStub(channel).RegisterSensor(
            sensor_pb2.RegisterSensorRequest(version="t"), timeout=RPC_TIMEOUT
        )
    return reply.sensor


async def test_existing_name_is_refused_without_reenrol(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, _ = await start_controller()
    await enroll(
        enroll_target(controller),
        token(fleet_pki, Role.SENSOR, "taken"),
        Role.SENSOR,
        tls_in(tmp_path / "a"),
    )
    with pytest.raises(HoneyfleetError, match=r"ALREADY_EXISTS.*--reenrol"):
        await enroll(
            enroll_target(controller),
            token(fleet_pki, Role.SENSOR, "taken"),
            Role.SENSOR,
            tls_in(tmp_path / "b"),
        )
    assert not (tmp_path / "b" / "cert.pem").exists()


async def test_reenrol_replaces_and_revokes_the_old_certificate(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, address = await start_controller()
    old, new = tls_in(tmp_path / "old"), tls_in(tmp_path / "new")
    await enroll(
        enroll_target(controller), token(fleet_pki, Role.SENSOR, "moved"), Role.SENSOR, old
    )
    assert await register(address, old) == "sensor/moved"
    reenrol = token(fleet_pki, Role.SENSOR, "moved", reenrol=True)
    await enroll(enroll_target(controller), reenrol, Role.SENSOR, new)
    assert await register(address, new) == "sensor/moved"

    async def old_refused() -> bool:
        try:
            await register(address, old)
        except grpc.aio.AioRpcError as e:
            return e.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    for _ in range(100):
        if await old_refused():
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the replaced certificate is still accepted")
    # The re-enrol token is single-use like any other.
    with pytest.raises(grpc.aio.AioRpcError, match="already used") as info:
        await raw_enroll(controller, fleet_pki, reenrol, "moved")
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_foreign_name_is_refused(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, _ = await start_controller()
    tok = token(fleet_pki, Role.SENSOR, "mine")
    # The honest client refuses before sending anything...
    with pytest.raises(HoneyfleetError, match="not 'ctl'"):
        await enroll(
            enroll_target(controller), tok, Role.SENSOR, tls_in(tmp_path / "a"), name="ctl"
        )
    # ... and the controller refuses a hostile one.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_enroll(controller, fleet_pki, tok, "someone-else")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # The refused attempts did not burn the token: it still enrols its own name.
    response = await raw_enroll(controller, fleet_pki, tok, "")
    assert response.identity == "spiffe://testfleet/sensor/mine"


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("rack-a", {"dns_names": ["*.example.net"]}),
        ("rack-b", {"dns_names": ["ctl.example.net"]}),
        ("rack-c", {"ip_addresses": ["10.0.0.5"]}),
        ("rack-d", {"dns_names": ["controller.testfleet.hf.invalid"]}),
    ],
)
async def test_addresses_beyond_the_token_are_refused(
    start_controller, fleet_pki: FleetPki, name: str, fields: dict[str, list[str]]
) -> None:
    controller, _ = await start_controller()
    tok = token(fleet_pki, Role.POOLNODE, name, ips=["127.0.0.1"])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_enroll(controller, fleet_pki, tok, name, **fields)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Asking for exactly what the token names works, and the certificate carries just that.
    response = await raw_enroll(controller, fleet_pki, tok, name, ip_addresses=["127.0.0.1"])
    cert = x509.load_pem_x509_certificate(response.certificate_pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert not [n for n in san.get_values_for_type(x509.DNSName) if not n.endswith(".hf.invalid")]


async def test_certificates_are_short_lived(start_controller, fleet_pki: FleetPki) -> None:
    controller, _ = await start_controller(cert_validity_days=3)
    response = await raw_enroll(controller, fleet_pki, token(fleet_pki, Role.SENSOR, "brief"), "")
    cert = x509.load_pem_x509_certificate(response.certificate_pem.encode())
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(days=3, minutes=5)  # plus the clock-skew backdating


async def test_rate_limit_per_address(start_controller, fleet_pki: FleetPki) -> None:
    controller, _ = await start_controller(enroll_burst=3, enroll_per_minute=0.01)
    codes = []
    for _ in range(4):
        try:
            await raw_enroll(controller, fleet_pki, "hf2.bogus.bogus", "x")
        except grpc.aio.AioRpcError as e:
            codes.append(e.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 3 + [grpc.StatusCode.RESOURCE_EXHAUSTED]
    # Even a valid token is turned away until the address has waited.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw_enroll(controller, fleet_pki, token(fleet_pki, Role.SENSOR, "patient"), "")
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_join_reads_the_token_from_stdin(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, _ = await start_controller()
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "honeyfleet"),
        "sensor",
        "join",
        "--controller",
        enroll_target(controller),
        "--token-file",
        "-",
        "--out",
        str(tmp_path / "tls"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(token(fleet_pki, Role.SENSOR, "piped").encode() + b"\n"), 60
    )
    assert proc.returncode == 0, err.decode()
    assert "spiffe://testfleet/sensor/piped" in out.decode()
    assert b"warning" not in err
    assert tls_in(tmp_path / "tls").identity().name == "piped"
