"""Issued certificates work for mutual TLS: OpenSSL (ssl module) and gRPC/BoringSSL.

Real handshakes on 127.0.0.1 port 0; this is what the rest of the fleet relies on.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from honeyfleet.pki import (
    CertificateAuthority,
    Identity,
    IssuedFiles,
    Role,
    csr_for,
    generate_key,
    identity_from_certificate,
    init_ca,
    private_key_pem,
    write_private,
)

SERVER_DNS = "controller.lab.example"


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    """A fresh CA for fleet 'lab'."""
    return init_ca(tmp_path / "pki", "lab")


@pytest.fixture
def server_files(ca: CertificateAuthority, tmp_path: Path) -> IssuedFiles:
    """The controller's key and certificate, with a DNS and an IP SAN."""
    return ca.issue(
        Role.CONTROLLER, "ctl", dns=[SERVER_DNS], ips=["127.0.0.1"], out_dir=tmp_path / "ctl"
    )


def _server_ctx(files: IssuedFiles) -> ssl.SSLContext:
    """A server context that requires a client certificate from the fleet CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(files.cert_path, files.key_path)
    ctx.load_verify_locations(files.ca_path)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def _client_ctx(files: IssuedFiles, ca_path: Path) -> ssl.SSLContext:
    """A client context presenting ``files`` and trusting ``ca_path``, strict RFC 5280 checks."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(files.cert_path, files.key_path)
    ctx.load_verify_locations(ca_path)
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, hostname: str) -> str:
    """Connect once; the server answers with the SPIFFE id it read from the client cert."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Reply with the peer identity, then close."""
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            ident = identity_from_certificate(x509.load_der_x509_certificate(der))
            writer.write(ident.uri.encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=hostname),
            timeout=10,
        )
        try:
            return (await asyncio.wait_for(reader.readline(), timeout=10)).decode().strip()
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("hostname", [SERVER_DNS, "127.0.0.1"])
async def test_mutual_tls_with_openssl(
    ca: CertificateAuthority, server_files: IssuedFiles, tmp_path: Path, hostname: str
) -> None:
    """Both sides verify the chain and the host name / IP; the server sees the client's id."""
    client = ca.issue(Role.SENSOR, "s1", out_dir=tmp_path / "s1")
    got = await _handshake(_server_ctx(server_files), _client_ctx(client, client.ca_path), hostname)
    assert got == "spiffe://lab/sensor/s1"


async def test_enrolled_key_from_csr_works(
    ca: CertificateAuthority, server_files: IssuedFiles, tmp_path: Path
) -> None:
    """The join flow: key made locally, CSR signed by the CA, then usable for mTLS."""
    key = generate_key()
    ident = Identity("lab", Role.POOLNODE, "pn1")
    cert_pem = ca.sign_csr(csr_for(key, ident), ident)
    d = tmp_path / "pn1"
    d.mkdir()
    write_private(d / "pn1.key", private_key_pem(key))
    write_private(d / "pn1.pem", cert_pem)
    write_private(d / "ca.pem", ca.cert_pem)
    files = IssuedFiles(ident, 0, d / "pn1.key", d / "pn1.pem", d / "ca.pem")
    got = await _handshake(_server_ctx(server_files), _client_ctx(files, files.ca_path), SERVER_DNS)
    assert got == ident.uri


async def test_foreign_client_rejected(server_files: IssuedFiles, tmp_path: Path) -> None:
    """A client certificate from another CA, even for the same fleet name, is refused."""
    rogue_ca = init_ca(tmp_path / "rogue", "lab")
    rogue = rogue_ca.issue(Role.ADMIN, "mallory", out_dir=tmp_path / "mallory")
    # The rogue client trusts the real CA so only the server-side check is tested.
    client_ctx = _client_ctx(rogue, server_files.ca_path)
    try:
        got = await _handshake(_server_ctx(server_files), client_ctx, SERVER_DNS)
    except (ssl.SSLError, ConnectionError):
        return  # refused during the handshake
    # With TLS 1.3 the client may learn of the rejection only as EOF on its first read.
    assert got == "", "server accepted a client certificate from a foreign CA"


async def test_wrong_hostname_rejected(
    ca: CertificateAuthority, server_files: IssuedFiles, tmp_path: Path
) -> None:
    """The client checks the server's DNS SAN."""
    client = ca.issue(Role.SENSOR, "s1", out_dir=tmp_path / "s1")
    with pytest.raises(ssl.SSLCertVerificationError):
        await _handshake(
            _server_ctx(server_files), _client_ctx(client, client.ca_path), "other.example"
        )


async def _grpc_health(server_files: IssuedFiles, client: IssuedFiles) -> int:
    """Run a gRPC health check over mTLS; return the serving status."""
    server = aio.server()
    # The grpc_health stubs lack the documented `health.aio` alias.
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [(server_files.key_path.read_bytes(), server_files.cert_path.read_bytes())],
        root_certificates=server_files.ca_path.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        channel_creds = grpc.ssl_channel_credentials(
            root_certificates=client.ca_path.read_bytes(),
            private_key=client.key_path.read_bytes(),
            certificate_chain=client.cert_path.read_bytes(),
        )
        async with aio.secure_channel(
            f"127.0.0.1:{port}",
            channel_creds,
            options=[("grpc.ssl_target_name_override", SERVER_DNS)],
        ) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            return int(reply.status)
    finally:
        await server.stop(None)


async def test_grpc_mutual_tls(
    ca: CertificateAuthority, server_files: IssuedFiles, tmp_path: Path
) -> None:
    """gRPC (BoringSSL) accepts our P-256 chain in both directions."""
    client = ca.issue(Role.ADMIN, "alice", out_dir=tmp_path / "alice")
    assert await _grpc_health(server_files, client) == health_pb2.HealthCheckResponse.SERVING


async def test_grpc_rejects_foreign_client(server_files: IssuedFiles, tmp_path: Path) -> None:
    """gRPC refuses a client certificate from another CA."""
    rogue = init_ca(tmp_path / "rogue", "lab").issue(Role.ADMIN, "m", out_dir=tmp_path / "m")
    (tmp_path / "m" / "ca.pem").write_bytes(server_files.ca_path.read_bytes())
    with pytest.raises(aio.AioRpcError) as info:
        await _grpc_health(server_files, rogue)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
