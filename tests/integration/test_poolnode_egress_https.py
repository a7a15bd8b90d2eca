"""HTTPS through the sinkhole on loopback: the guest (the test, trusting the node's
interception CA as a guest image does) meets a leaf for the name it asked; under fetch
the node fetches the https URL through the operator's proxy (CONNECT) from the test's
"internet", an HTTPS server with a CA of its own that the node trusts through
``egress_fetch_ca_bundle``."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from honeyfleet.pki.certs import generate_key, private_key_pem
from poolnode.egress.intercept import CACHED, Leaves, load_or_make_ca
from tests.conftest import until
from tests.integration import test_poolnode_egress as loopback
from tests.integration.test_poolnode_egress import GUEST, PAYLOAD, Fleet, MakeEgress
from tests.prereq import require_tool

pytestmark = pytest.mark.timeout(30)
make_egress = loopback.make_egress
HOST = "files.example.org"


def certificate(
    subject: str,
    issuer: x509.Name | None,
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    """A CA certificate (self-signed when ``issuer`` is None) or a leaf for ``subject``."""
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


class Internet:
    """An HTTPS origin for HOST (its own CA) and an HTTP proxy that tunnels CONNECT to it."""

    def __init__(self, folder: Path, files: dict[str, bytes | str]) -> None:
        """``files`` maps paths to contents, or to a URL they redirect to."""
        self.files = files
        self.connects: list[bytes] = []
        ca_key, key = generate_key(), generate_key()
        ca = certificate("test internet CA", None, ca_key, ca_key, ca=True)
        leaf = certificate(HOST, ca.subject, key, ca_key, ca=False)
        self.ca_bundle = folder / "internet-ca.pem"
        self.ca_bundle.write_bytes(ca.public_bytes(Encoding.PEM))
        chain = folder / "origin.pem"
        chain.write_bytes(leaf.public_bytes(Encoding.PEM) + private_key_pem(key))
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(chain)
        self._servers: list[asyncio.Server] = []

    async def _origin(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await loopback.answer(self.files, reader, writer)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.connects.append(head)
        if not head.startswith(f"CONNECT {HOST}:443 ".encode()):
            writer.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(GUEST, self.origin_port)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(_relay(reader, up_writer), _relay(up_reader, writer))

    async def __aenter__(self) -> str:
        origin = await asyncio.start_server(self._origin, GUEST, 0, ssl=self._tls)
        proxy = await asyncio.start_server(self._proxy, GUEST, 0)
        self._servers = [origin, proxy]
        self.origin_port = origin.sockets[0].getsockname()[1]
        return f"{GUEST}:{proxy.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        for server in self._servers:
            server.close()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def guest_https(fleet: Fleet, request: bytes, *, trusting: bool = True) -> bytes:
    """A guest's HTTPS connection to HOST (redirected to the sinkhole): all it answers."""
    context = ssl.create_default_context()
    if trusting:  # as a guest image with the node's CA in its trust store
        context = ssl.create_default_context(cafile=str(fleet.egress.config.egress_ca[0]))
    reader, writer = await asyncio.open_connection(
        GUEST, fleet.egress.config.egress_sinkhole_port, ssl=context, server_hostname=HOST
    )
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


GET = f"GET /x.sh HTTP/1.1\r\nHost: {HOST}\r\nUser-Agent: curl/7.88\r\n\r\n".encode()


@pytest.fixture
async def internet(tmp_path: Path) -> AsyncIterator[tuple[Internet, str]]:
    world = Internet(tmp_path, {"/x.sh": PAYLOAD, "/moved": "https://cnc.example.net/x.sh"})
    async with world as proxy:
        yield world, proxy


async def test_fetch_gets_an_https_download_through_connect_and_serves_it_over_tls(
    make_egress: MakeEgress, internet: tuple[Internet, str]
) -> None:
    world, proxy = internet
    fleet = await make_egress(
        egress_policy="fetch",
        egress_fetch_proxy=proxy,
        egress_fetch_ca_bundle=str(world.ca_bundle),
    )
    answer = await guest_https(fleet, GET)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == PAYLOAD
    assert world.connects[0].startswith(f"CONNECT {HOST}:443 HTTP/1.1\r\n".encode())

    await until(lambda: len(fleet.of("cowrie.session.file_download")) == 1)
    (connect,) = fleet.of("honeyfleet.egress.connect")
    url = f"https://{HOST}/x.sh"
    assert (connect["kind"], connect["url"], connect["sni"], connect["host"]) == (
        "https",
        url,
        HOST,
        HOST,
    )
    assert connect["user_agent"] == "curl/7.88"
    (download,) = fleet.of("cowrie.session.file_download")
    shasum = hashlib.sha256(PAYLOAD).hexdigest()
    assert (download["url"], download["shasum"]) == (url, shasum)
    assert Path(download["outfile"]).read_bytes() == PAYLOAD


async def test_an_origin_the_egress_does_not_trust_is_a_failed_download(
    make_egress: MakeEgress, internet: tuple[Internet, str]
) -> None:
    _, proxy = internet
    fleet = await make_egress(egress_policy="fetch", egress_fetch_proxy=proxy)
    answer = await guest_https(fleet, GET)
    assert answer.startswith(b"HTTP/1.1 404 Not Found")
    await until(lambda: len(fleet.of("cowrie.session.file_download.failed")) == 1)
    (failed,) = fleet.of("cowrie.session.file_download.failed")
    assert failed["url"] == f"https://{HOST}/x.sh"
    assert "TLS with files.example.org: CERTIFICATE_VERIFY_FAILED" in failed["reason"]


async def test_an_https_redirect_is_checked_like_the_first_url(
    make_egress: MakeEgress, internet: tuple[Internet, str]
) -> None:
    world, proxy = internet
    fleet = await make_egress(
        egress_policy="fetch",
        egress_fetch_proxy=proxy,
        egress_fetch_ca_bundle=str(world.ca_bundle),
        egress_fetch_deny=["*.example.net"],
    )
    moved = GET.replace(b"/x.sh", b"/moved")
    assert (await guest_https(fleet, moved)).startswith(b"HTTP/1.1 404 Not Found")
    await until(lambda: len(fleet.of("cowrie.session.file_download.failed")) == 1)
    (failed,) = fleet.of("cowrie.session.file_download.failed")
    assert failed["reason"] == "cnc.example.net is on egress_fetch_deny"
    assert len(world.connects) == 1  # the redirect's target was never asked for


async def test_sinkhole_records_the_https_url_and_answers_a_dead_end(
    make_egress: MakeEgress,
) -> None:
    fleet = await make_egress()
    answer = await guest_https(fleet, GET)
    assert answer.startswith(b"HTTP/1.1 404 Not Found")
    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) == 1)
    (connect,) = fleet.of("honeyfleet.egress.connect")
    assert (connect["kind"], connect["url"], connect["host"], connect["method"]) == (
        "https",
        f"https://{HOST}/x.sh",
        HOST,
        "GET",
    )
    # The CA's key stays on the node: readable by its owner only.
    assert fleet.egress.config.egress_ca[1].stat().st_mode & 0o077 == 0


async def test_the_sinkhole_closes_after_answering_a_guest_that_stays(
    make_egress: MakeEgress,
) -> None:
    fleet = await make_egress()
    context = ssl.create_default_context(cafile=str(fleet.egress.config.egress_ca[0]))
    port = fleet.egress.config.egress_sinkhole_port

    def guest() -> tuple[bytes, bytes]:
        """A client that reads the answer to its end but never sends close_notify."""
        with socket.create_connection((GUEST, port), timeout=5) as raw:
            wire = raw.dup()  # the TCP connection itself, once TLS has said goodbye
            tls = context.wrap_socket(raw, server_hostname=HOST)
            tls.sendall(GET)
            answer = b""
            while chunk := tls.recv(4096):
                answer += chunk
            try:
                return answer, wire.recv(1)  # b"": the node closed; a timeout: it waits
            finally:
                wire.close()

    answer, after = await asyncio.to_thread(guest)
    assert answer.startswith(b"HTTP/1.1 404 Not Found")
    assert after == b""


async def test_a_guest_that_refuses_the_leaf_is_recorded_by_server_name(
    make_egress: MakeEgress,
) -> None:
    fleet = await make_egress()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await guest_https(fleet, GET, trusting=False)
    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) == 1)
    (connect,) = fleet.of("honeyfleet.egress.connect")
    assert (connect["kind"], connect["sni"]) == ("tls", HOST)
    assert "url" not in connect and connect["tls_error"]


async def test_busybox_wgets_own_tls_is_intercepted(
    make_egress: MakeEgress, tmp_path: Path
) -> None:
    require_tool("busybox", "busybox")
    fleet = await make_egress()
    port = fleet.egress.config.egress_sinkhole_port
    url = f"https://localhost:{port}/bins/x.sh"
    # No openssl on its PATH: busybox speaks TLS itself, as in the busybox guest image.
    proc = await asyncio.create_subprocess_exec(
        str(shutil.which("busybox")), "wget", "-O", str(tmp_path / "x.sh"), url,
        env={"PATH": str(tmp_path)},
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert b"404 Not Found" in err, err  # the dead end's answer, read inside TLS
    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) == 1)
    (connect,) = fleet.of("honeyfleet.egress.connect")
    assert (connect["kind"], connect["url"], connect["sni"]) == ("https", url, "localhost")


async def test_leaves_are_minted_once_per_name_and_bounded(tmp_path: Path) -> None:
    leaves = Leaves(*load_or_make_ca(tmp_path / "ca.pem", tmp_path / "ca.key"))
    first = await leaves.context("a.example")
    assert await leaves.context("a.example") is first
    await leaves.context("192.0.2.80")  # an address, when the guest sent no name
    assert leaves.minted == 2
    for n in range(CACHED):
        await leaves.context(f"n{n}.example")
    assert await leaves.context("a.example") is not first  # forgotten, minted again
    assert leaves.minted == CACHED + 3
