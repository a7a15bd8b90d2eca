"""mTLS and per-RPC authorization against a real server with a recording servicer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from honeyfleet.authz import Authorizer, current_caller
from honeyfleet.grpcserver import add_health_and_reflection, bind, new_server
from honeyfleet.pki import RevocationList
from honeyfleet.pki.certs import load_certificate
from honeyfleet.pki.identity import Role
from honeyfleet.tls import TlsFiles, secure_channel, server_credentials
from honeyfleet.v1 import fleet_pb2, fleet_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import FleetPki

RPC_TIMEOUT = 5  # for a local server to answer a call, or a stream message


class RecordingFleet(fleet_pb2_grpc.FleetServiceServicer):
    """Records every call that reached the handler."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def GetFleetStats(self, request, context):
        self.calls.append(str(current_caller()))
        return fleet_pb2.GetFleetStatsResponse(sensors=7)


class RecordingRegistry(registry_pb2_grpc.PoolNodeRegistryServiceServicer):
    """A heartbeat stream that echoes until cut; records who opened it."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.cut = asyncio.Event()

    async def Heartbeat(self, request_iterator, context):
        self.opened.append(str(current_caller()))
        try:
            async for _ in request_iterator:
                yield registry_pb2.HeartbeatResponse()
        except asyncio.CancelledError:
            self.cut.set()
            raise


@pytest.fixture
async def server(
    fleet_pki: FleetPki,
) -> AsyncIterator[tuple[str, RecordingFleet, RecordingRegistry, Authorizer]]:
    """A server requiring fleet certificates: FleetService for admins, registry for nodes."""
    authorizer = Authorizer(
        "testfleet",
        {
            "honeyfleet.v1.FleetService": frozenset({Role.ADMIN}),
            "honeyfleet.v1.PoolNodeRegistryService": frozenset({Role.POOLNODE}),
        },
    )
    srv = new_server(authorizer)
    fleet, registry = RecordingFleet(), RecordingRegistry()
    fleet_pb2_grpc.add_FleetServiceServicer_to_server(fleet, srv)
    registry_pb2_grpc.add_PoolNodeRegistryServiceServicer_to_server(registry, srv)
    add_health_and_reflection(srv, [])
    port = bind(srv, "127.0.0.1:0", server_credentials(fleet_pki.files(Role.CONTROLLER, "ctl")))
    await srv.start()
    yield f"127.0.0.1:{port}", fleet, registry, authorizer
    await srv.stop(0)


async def stats(target: str, files: TlsFiles | None, ca: bytes | None = None) -> int:
    """Call GetFleetStats with the given identity (None: no client certificate)."""
    if files is None:
        assert ca is not None
        channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca))
    else:
        channel = secure_channel(target, files)
    async with channel:
        response = await fleet_pb2_grpc.FleetServiceStub(channel).GetFleetStats(
            fleet_pb2.GetFleetStatsRequest(), timeout=RPC_TIMEOUT
        )
        return response.sensors


async def test_admin_is_allowed(server, fleet_pki: FleetPki) -> None:
    target, fleet, _, _ = server
    assert await stats(target, fleet_pki.files(Role.ADMIN, "alice")) == 7
    assert fleet.calls == ["admin/alice"]


async def test_no_client_certificate_is_refused(server, fleet_pki: FleetPki) -> None:
    target, fleet, _, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stats(target, None, ca=fleet_pki.ca.cert_pem)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fleet.calls == []


async def test_certificate_of_another_ca_is_refused(
    server, other_pki: FleetPki, fleet_pki: FleetPki
) -> None:
    target, fleet, _, _ = server
    foreign = other_pki.files(Role.ADMIN, "mallory")
    # Trust our CA for the server, but present a certificate from the other CA.
    files = TlsFiles(ca=fleet_pki.files(Role.ADMIN, "alice").ca, cert=foreign.cert, key=foreign.key)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stats(target, files)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fleet.calls == []


async def test_expired_certificate_is_refused(server, fleet_pki: FleetPki) -> None:
    target, fleet, _, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stats(target, fleet_pki.expired(Role.ADMIN, "old"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert fleet.calls == []


@pytest.mark.parametrize("role", [Role.SENSOR, Role.POOLNODE, Role.CONTROLLER])
async def test_other_roles_may_not_call_admin_methods(
    server, fleet_pki: FleetPki, role: Role
) -> None:
    target, fleet, _, _ = server
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stats(target, fleet_pki.files(role, "x1"))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "may not call" in (e.value.details() or "")
    assert fleet.calls == []


async def test_sensor_may_not_call_pool_node_methods(server, fleet_pki: FleetPki) -> None:
    target, _, registry, _ = server
    async with secure_channel(target, fleet_pki.files(Role.SENSOR, "s1")) as channel:
        call = registry_pb2_grpc.PoolNodeRegistryServiceStub(channel).Heartbeat(
            iter([registry_pb2.HeartbeatRequest()]), timeout=RPC_TIMEOUT
        )
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert registry.opened == []


async def test_unknown_method_is_unimplemented(server, fleet_pki: FleetPki) -> None:
    target, _, _, _ = server
    async with secure_channel(target, fleet_pki.files(Role.ADMIN, "alice")) as channel:
        method = channel.unary_unary("/honeyfleet.v1.FleetService/NoSuchMethod")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await method(b"", timeout=RPC_TIMEOUT)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_revoked_serial_is_refused_and_its_stream_cut(server, fleet_pki: FleetPki) -> None:
    target, fleet, registry, authorizer = server
    node = fleet_pki.files(Role.POOLNODE, "revokee")
    admin = fleet_pki.files(Role.ADMIN, "revoked-admin")
    serial = load_certificate(node.cert).serial_number
    admin_serial = load_certificate(admin.cert).serial_number
    revocations = RevocationList(fleet_pki.ca.revoked_path)

    async with secure_channel(target, node) as channel:
        outbox: asyncio.Queue[registry_pb2.HeartbeatRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[registry_pb2.HeartbeatRequest]:
            while (item := await outbox.get()) is not None:
                yield item

        call = registry_pb2_grpc.PoolNodeRegistryServiceStub(channel).Heartbeat(requests())
        await outbox.put(registry_pb2.HeartbeatRequest())
        async with asyncio.timeout(RPC_TIMEOUT):
            await call.read()  # the stream is open and served
        assert registry.opened == ["poolnode/revokee"]

        revocations.revoke(serial, "test")
        revocations.revoke(admin_serial, "test")
        authorizer.update_revoked(revocations.serials())
        await asyncio.wait_for(registry.cut.wait(), RPC_TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async with asyncio.timeout(RPC_TIMEOUT):
                await call.read()
                await call.read()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (e.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stats(target, admin)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fleet.calls == []


async def test_renewed_server_certificate_is_used_without_restart(
    fleet_pki: FleetPki, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    from honeyfleet.enroll import presented_chain

    live = TlsFiles(ca=tmp_path / "ca.pem", cert=tmp_path / "cert.pem", key=tmp_path / "key.pem")
    first, second = (
        fleet_pki.files(Role.CONTROLLER, "ctl"),
        fleet_pki.files(Role.CONTROLLER, "ctl-new"),
    )
    for src, dst in ((first.ca, live.ca), (first.cert, live.cert), (first.key, live.key)):
        shutil.copy(src, dst)
    srv = new_server(
        Authorizer("testfleet", {"honeyfleet.v1.FleetService": frozenset({Role.ADMIN})})
    )
    fleet_pb2_grpc.add_FleetServiceServicer_to_server(RecordingFleet(), srv)
    target = f"127.0.0.1:{bind(srv, '127.0.0.1:0', server_credentials(live))}"
    await srv.start()
    try:

        async def served_name() -> str:
            (leaf, *_) = await asyncio.to_thread(presented_chain, target)
            return leaf.subject.rfc4514_string()

        assert await served_name() == "CN=ctl"
        # A half-done renewal (new certificate, old key) is not taken up...
        shutil.copy(second.cert, live.cert)
        assert await served_name() == "CN=ctl"
        assert await stats(target, fleet_pki.files(Role.ADMIN, "alice")) == 7
        assert await served_name() == "CN=ctl"
        # Said once for the broken files, not once per handshake.
        assert caplog.text.count("not reloading TLS files") == 1
        # ...the finished one is, for new connections.
        shutil.copy(second.key, live.key)
        assert await served_name() == "CN=ctl-new"
        assert await stats(target, fleet_pki.files(Role.ADMIN, "alice")) == 7
    finally:
        await srv.stop(0)
