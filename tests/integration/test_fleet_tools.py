"""Operator tools against a real controller: enrolment, buf curl by reflection, status CLI."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import stat
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from honeyfleet.enroll import enroll
from honeyfleet.errors import HoneyfleetError, PermissionDenied
from honeyfleet.pki import CertificateAuthority, Role, create_token
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import sensor_pb2, sensor_pb2_grpc
from tests.conftest import FleetPki, require_tool
from tests.integration.test_leases import fleet_with_nodes

BIN = Path(sys.executable).parent


async def run(*argv: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run a command without blocking the event loop; returns (code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def expired_token(ca: CertificateAuthority, role: Role) -> str:
    """A join token of ``role`` from ``ca`` that expired an hour ago: a live one re-signed
    with its ``exp`` moved back (``create_token`` mints only live tokens)."""
    prefix, payload, _ = create_token(ca, role, ttl=timedelta(minutes=5), name="late").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["exp"] = int(time.time()) - 3600
    payload = _b64(json.dumps(claims).encode())
    mac = hmac.new(ca.token_key, f"{prefix}.{payload}".encode(), hashlib.sha256).digest()
    return f"{prefix}.{payload}.{_b64(mac)}"


def _b64(data: bytes) -> str:
    """Unpadded base64url, as tokens use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def tls_in(directory: Path) -> TlsFiles:
    return TlsFiles(ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")


async def test_join_with_token_then_use_certificate(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, address = await start_controller()
    target = f"127.0.0.1:{controller.ports.enroll}"
    token = create_token(fleet_pki.ca, Role.SENSOR, ttl=timedelta(minutes=5), name="edge-7")
    files = tls_in(tmp_path / "edge")
    identity = await enroll(target, token, Role.SENSOR, files)
    assert identity.uri == "spiffe://testfleet/sensor/edge-7"
    for path in (files.ca, files.cert, files.key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with secure_channel(address, files) as channel:
        reply = await sensor_pb2_grpc.SensorServiceStub(channel).RegisterSensor(
            sensor_pb2.RegisterSensorRequest(version="t", listen_addresses=["0.0.0.0:22/ssh"])
        )
    assert reply.sensor == "sensor/edge-7"
    assert controller.registry.sensors["edge-7"].listen_addresses == ["0.0.0.0:22/ssh"]

    with pytest.raises(HoneyfleetError, match="already used"):
        await enroll(target, token, Role.SENSOR, tls_in(tmp_path / "again"))


async def test_expired_token_is_refused(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, _ = await start_controller()
    token = expired_token(fleet_pki.ca, Role.POOLNODE)
    with pytest.raises(HoneyfleetError, match="expired"):
        await enroll(
            f"127.0.0.1:{controller.ports.enroll}",
            token,
            Role.POOLNODE,
            tls_in(tmp_path / "n"),
        )
    assert not (tmp_path / "n" / "key.pem").exists()


async def test_token_of_another_ca_never_reaches_the_controller(
    start_controller, other_pki: FleetPki, tmp_path: Path
) -> None:
    controller, _ = await start_controller()
    token = create_token(other_pki.ca, Role.SENSOR, ttl=timedelta(minutes=5), name="spy")
    with pytest.raises(PermissionDenied, match="does not present the fleet CA"):
        await enroll(
            f"127.0.0.1:{controller.ports.enroll}",
            token,
            Role.SENSOR,
            tls_in(tmp_path / "s"),
        )


async def test_token_for_another_role_is_refused_locally(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, _ = await start_controller()
    token = create_token(fleet_pki.ca, Role.POOLNODE, ttl=timedelta(minutes=5), name="s")
    with pytest.raises(PermissionDenied, match="poolnode join"):
        await enroll(
            f"127.0.0.1:{controller.ports.enroll}",
            token,
            Role.SENSOR,
            tls_in(tmp_path / "s"),
        )


async def test_join_and_token_through_the_cli(
    start_controller, fleet_pki: FleetPki, tmp_path: Path
) -> None:
    controller, _ = await start_controller()
    code, token, err = await run(
        str(BIN / "honeyfleet"),
        "pki",
        "token",
        "create",
        "--dir",
        str(fleet_pki.ca.directory),
        "--role",
        "poolnode",
        "--ttl",
        "10m",
        "--name",
        "rack2",
        "--ip",
        "127.0.0.1",
    )
    assert code == 0, err
    token_file = tmp_path / "token"
    token_file.write_text(token)
    code, out, err = await run(
        str(BIN / "honeyfleet"),
        "poolnode",
        "join",
        "--controller",
        f"127.0.0.1:{controller.ports.enroll}",
        "--token-file",
        str(token_file),
        "--out",
        str(tmp_path / "tls"),
    )
    assert code == 0, err
    assert "warning" not in err
    assert "spiffe://testfleet/poolnode/rack2" in out
    assert tls_in(tmp_path / "tls").identity().name == "rack2"


async def test_buf_curl_lists_services_and_pool_nodes(
    start_controller, start_pool_node, fleet_pki: FleetPki
) -> None:
    buf = require_tool("buf", "buf-bin (pip, dev extra)")
    _, address, _ = await fleet_with_nodes(start_controller, start_pool_node, {"n1": 2, "n2": 1})
    admin = fleet_pki.files(Role.ADMIN, "alice")
    tls = [
        "--protocol",
        "grpc",
        "--cacert",
        str(admin.ca),
        "--cert",
        str(admin.cert),
        "--key",
        str(admin.key),
    ]
    code, out, err = await run(buf, "curl", *tls, "--list-services", f"https://{address}")
    assert code == 0, err
    services = set(out.split())
    assert {
        "honeyfleet.v1.FleetService",
        "honeyfleet.v1.LeaseService",
        "honeyfleet.v1.PoolNodeRegistryService",
        "grpc.health.v1.Health",
    } <= services
    code, out, err = await run(
        buf,
        "curl",
        *tls,
        "-d",
        '{"page_size": 10}',
        f"https://{address}/honeyfleet.v1.FleetService/ListPoolNodes",
    )
    assert code == 0, err
    nodes = json.loads(out)["poolNodes"]
    assert [(n["name"], n["capacity"], n["state"]) for n in nodes] == [
        ("n1", 2, "POOL_NODE_STATE_ALIVE"),
        ("n2", 1, "POOL_NODE_STATE_ALIVE"),
    ]
    # A sensor certificate gets nothing from the admin API.
    sensor = fleet_pki.files(Role.SENSOR, "s1")
    code, out, err = await run(
        buf,
        "curl",
        "--protocol",
        "grpc",
        "--cacert",
        str(sensor.ca),
        "--cert",
        str(sensor.cert),
        "--key",
        str(sensor.key),
        "-d",
        "{}",
        f"https://{address}/honeyfleet.v1.FleetService/ListPoolNodes",
    )
    assert code != 0
    assert "permission_denied" in (out + err).lower()


async def test_status_cli_prints_the_fleet(
    start_controller, start_pool_node, fleet_pki: FleetPki
) -> None:
    _, address, _ = await fleet_with_nodes(start_controller, start_pool_node, {"n1": 2})
    admin = fleet_pki.files(Role.ADMIN, "alice")
    flags = [
        "--controller",
        address,
        "--ca",
        str(admin.ca),
        "--cert",
        str(admin.cert),
        "--key",
        str(admin.key),
    ]
    code, out, err = await run(str(BIN / "honeyfleet"), "status", *flags, "--json")
    assert code == 0, err
    state = json.loads(out)
    assert [n["name"] for n in state["pool_nodes"]] == ["n1"]
    assert state["stats"]["capacity"] == 2
    code, out, err = await run(str(BIN / "honeyfleet"), "status", *flags)
    assert code == 0, err
    assert "Pool nodes" in out and "n1" in out and "0/2/0/0" in out
    code, out, err = await run(str(BIN / "honeyfleet"), "node", "drain", "n1", *flags)
    assert code == 0, err
    code, out, err = await run(str(BIN / "honeyfleet"), "status", *flags)
    assert "draining" in out
    # A live node cannot be removed; the message says what to do.
    code, out, err = await run(str(BIN / "honeyfleet"), "node", "remove", "n1", *flags)
    assert code == 2 and "Traceback" not in err and "n1 is alive: stop it first" in err
    # A wrong controller address is a clear error, not a traceback.
    code, out, err = await run(
        str(BIN / "honeyfleet"), "status", *flags[2:], "--controller", "127.0.0.1:1"
    )
    assert code == 2 and "Traceback" not in err and "UNAVAILABLE" in err


async def test_health_is_served(start_controller, fleet_pki: FleetPki) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, address = await start_controller()
    async with secure_channel(address, fleet_pki.files(Role.SENSOR, "s1")) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="honeyfleet.v1.LeaseService")
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_config_check_reports_every_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from honeyfleet.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('[controller]\nlisten = "nowhere"\nlease_ttl = -1\ncolour = "blue"\n[sensors]\n')
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    for key in ("controller.listen", "controller.lease_ttl", "controller.colour", "sensors"):
        assert key in err
    good = tmp_path / "good.toml"
    good.write_text('[controller]\nlisten = "0.0.0.0:7300"\n[admin]\ncontroller = "ctl:7300"\n')
    assert main(["config", "check", str(good)]) == 0


def test_config_check_wants_the_sensors_lease_timeout_above_the_controllers_wait(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from honeyfleet.cli import main

    both = tmp_path / "both.toml"
    both.write_text("[controller]\n[sensor]\n")
    assert main(["config", "check", str(both)]) == 0  # the defaults fit together
    both.write_text("[controller]\nlease_wait = 30.0\n[sensor]\nlease_timeout = 30.0\n")
    assert main(["config", "check", str(both)]) == 2
    assert "controller.lease_wait: must be below sensor.lease_timeout" in capsys.readouterr().err
