"""Egress containment on real sockets (loopback): what a guest's DNS queries and
connections get under each policy, the events they make, and the bounds.

The guest here is the test itself on 127.0.0.1, talking to the node's servers directly
(the redirect rules are exercised with real guests in tests/e2e/test_vm_pool.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from honeyfleet.config import parse_section
from honeyfleet.errors import ConfigError
from honeyfleet.eventlog import EventLog, SpoolMetrics
from honeyfleet.events import Event
from honeyfleet.outbox import Outbox, OutboxMetrics
from honeyfleet.spool import Spool
from honeyfleet.tls import TlsFiles
from poolnode.config import PoolNodeConfig
from poolnode.egress import Egress
from poolnode.events import NodeEvents
from poolnode.guest import LeaseHold
from poolnode.metrics import PoolMetrics
from tests.conftest import free_port, until
from tests.unit.test_egress_parts import query

pytestmark = pytest.mark.timeout(30)

GUEST = "127.0.0.1"
PAYLOAD = b"#!/bin/sh\necho pwned\n" * 100


class Fleet:
    """An egress under test, the events it made, and the session they belong to."""

    def __init__(self, egress: Egress, seen: list[Event], metrics: PoolMetrics) -> None:
        self.egress = egress
        self.seen = seen
        self.metrics = metrics

    def sample(self, name: str, **labels: str) -> float | None:
        """A metric of the egress's pool metrics."""
        return self.metrics.registry.get_sample_value(name, labels)

    def of(self, eventid: str) -> list[Event]:
        """Events with ``eventid`` made so far (durable ones: the spool's mirror)."""
        return [e for e in self.seen if e["eventid"] == eventid]


MakeEgress = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def make_egress(tmp_path: Path) -> AsyncIterator[MakeEgress]:
    """Start an Egress with the given settings (on loopback unless they say otherwise);
    the guest (127.0.0.1 unless ``guest_ip``) is g1, leased to session s1."""
    started: list[tuple[Egress, EventLog]] = []

    async def make(
        *,
        redirect: bool = False,
        guest_ip: str = GUEST,
        address_of_mac: Callable[[str], str | None] = lambda _: None,
        **settings: Any,
    ) -> Fleet:
        table = {
            "backend_pass": "x",
            "state_dir": str(tmp_path / "state"),
            "network_address": "127.0.0.1/8",
            "egress_dns_port": free_port(),
            "egress_sinkhole_port": free_port(),
            **settings,
        }
        config = parse_section(PoolNodeConfig, "poolnode", table, base_dir=tmp_path, env={})
        seen: list[Event] = []
        spool = Spool(
            tmp_path / f"spool{len(started)}.sqlite3",
            max_bytes=10_000_000,
            near_full=0.9,
            mirror=seen.extend,
        )
        log = EventLog(spool, SpoolMetrics("t", CollectorRegistry()), instance_uuid="node")
        events = NodeEvents(log, pool_node="pool-1")
        events.leased("g1", LeaseHold("L1", "sensor/edge1", "198.51.100.7", 0.0, "s1", "ssh"))
        metrics = PoolMetrics()
        egress = Egress(
            config,
            {guest_ip: "g1"}.get,
            redirect=redirect,
            metrics=metrics,
            address_of_mac=address_of_mac,
        )
        egress.events = events
        await egress.start()
        started.append((egress, log))
        return Fleet(egress, seen, metrics)

    yield make
    for egress, log in started:
        await egress.stop()
        await log.flush()
        await log.close()


async def ask(fleet: Fleet, name: str, qtype: int = 1) -> bytes:
    """Send one DNS query to the node's server, as a guest's resolver would."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        await loop.sock_connect(s, (GUEST, fleet.egress.config.egress_dns_port))
        await loop.sock_sendall(s, query(name, qtype))
        return await asyncio.wait_for(loop.sock_recv(s, 512), 5)


async def connect(fleet: Fleet, request: bytes) -> bytes:
    """A guest's TCP connection to the sinkhole: send ``request``, read all it answers."""
    reader, writer = await asyncio.open_connection(GUEST, fleet.egress.config.egress_sinkhole_port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_sinkhole_answers_dns_with_itself_and_reports_each_query(
    make_egress: MakeEgress,
) -> None:
    fleet = await make_egress()
    reply = await ask(fleet, "cnc.Example.org")
    assert reply.endswith(socket.inet_aton("127.0.0.1"))
    await ask(fleet, "cnc.example.org", qtype=28)
    await until(lambda: len(fleet.of("honeyfleet.egress.dns")) == 2)
    a, aaaa = fleet.of("honeyfleet.egress.dns")
    assert (a["query"], a["qtype"], a["answer"]) == ("cnc.example.org", "A", "127.0.0.1")
    assert (aaaa["qtype"], aaaa["answer"]) == ("AAAA", "no records")
    # On the attacker's session of the guest that asked.
    assert (a["session"], a["src_ip"], a["guest"], a["lease"]) == ("s1", "198.51.100.7", "g1", "L1")
    assert a["guest_ip"] == GUEST
    assert a["message"] == "DNS query for cnc.example.org (A) answered 127.0.0.1"


async def test_drop_refuses_dns_reports_it_and_accepts_no_tcp(make_egress: MakeEgress) -> None:
    fleet = await make_egress(egress_policy="drop")
    reply = await ask(fleet, "cnc.example.org")
    assert struct.unpack_from("!H", reply, 2)[0] & 0xF == 5  # REFUSED
    await until(lambda: len(fleet.of("honeyfleet.egress.dns")) == 1)
    assert fleet.of("honeyfleet.egress.dns")[0]["answer"] == "REFUSED"
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(GUEST, fleet.egress.config.egress_sinkhole_port)


async def test_sinkhole_records_an_http_request_and_answers_a_dead_end(
    make_egress: MakeEgress,
) -> None:
    fleet = await make_egress()
    answer = await connect(
        fleet, b"GET /bins/x86 HTTP/1.1\r\nHost: cnc.example.org\r\nUser-Agent: Wget/1.21\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) == 1)
    event = fleet.of("honeyfleet.egress.connect")[0]
    assert event["url"] == "http://cnc.example.org/bins/x86"
    assert (event["method"], event["user_agent"], event["kind"]) == ("GET", "Wget/1.21", "http")
    assert (event["dst_ip"], event["dst_port"], event["transport"]) == (
        GUEST,
        fleet.egress.config.egress_sinkhole_port,
        "tcp",
    )
    assert event["session"] == "s1"
    assert not fleet.of("cowrie.session.file_download")
    assert not (fleet.egress.config.state_dir / "downloads").exists()


async def test_sinkhole_records_tls_server_name_and_first_bytes(make_egress: MakeEgress) -> None:
    fleet = await make_egress(egress_read_timeout=0.5)
    context = ssl.create_default_context()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection(
            GUEST,
            fleet.egress.config.egress_sinkhole_port,
            ssl=context,
            server_hostname="update.example.net",
        )
    await connect(fleet, b"\x00\x01PING\n")
    # A client that waits for the server to speak first: recorded after read_timeout.
    await connect(fleet, b"")
    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) == 3)
    tls, data, silent = fleet.of("honeyfleet.egress.connect")
    assert (tls["kind"], tls["sni"]) == ("tls", "update.example.net")
    assert (data["kind"], data["data"]) == ("data", "\\x00\\x01PING\\n")
    assert silent["kind"] == "none"


async def test_a_guest_holds_at_most_max_connections(make_egress: MakeEgress) -> None:
    fleet = await make_egress(egress_max_connections=2, egress_read_timeout=20)
    port = fleet.egress.config.egress_sinkhole_port
    held = [await asyncio.open_connection(GUEST, port) for _ in range(2)]
    await until(lambda: fleet.egress.sinkhole.open_connections(GUEST) == 2)
    reader, writer = await asyncio.open_connection(GUEST, port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed at once
    writer.close()
    assert fleet.egress.sinkhole.refused == 1
    assert fleet.sample("honeyfleet_poolnode_egress_refused_connections_total") == 1
    for _, w in held:
        w.close()


async def test_dns_events_are_bounded_per_guest(make_egress: MakeEgress) -> None:
    fleet = await make_egress(egress_events_burst=3, egress_events_per_minute=0.01)
    for i in range(6):
        await ask(fleet, f"n{i}.example.org")  # every query is still answered
    await until(lambda: fleet.egress.reporter.suppressed == 3)
    assert fleet.sample("honeyfleet_poolnode_egress_events_total", kind="dns", outcome="sent") == 3
    assert (
        fleet.sample("honeyfleet_poolnode_egress_events_total", kind="dns", outcome="suppressed")
        == 3
    )
    await until(lambda: len(fleet.of("honeyfleet.egress.dns")) == 3)
    assert [e["query"] for e in fleet.of("honeyfleet.egress.dns")] == [
        "n0.example.org",
        "n1.example.org",
        "n2.example.org",
    ]


async def answer(
    files: dict[str, bytes | str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bytes:
    """Answer one HTTP request from ``files`` (by its target: contents, or a URL they
    redirect to; 404 otherwise), close, and return the request's head."""
    head = await reader.readuntil(b"\r\n\r\n")
    body = files.get(head.split(b" ")[1].decode())
    if body is None:
        writer.write(b"HTTP/1.0 404 Not Found\r\n\r\n")
    elif isinstance(body, str):
        writer.write(b"HTTP/1.0 302 Found\r\nLocation: %s\r\n\r\n" % body.encode())
    else:
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    writer.close()
    return head


class Proxy:
    """The test's "internet": an HTTP proxy on loopback serving files by URL."""

    def __init__(self, files: dict[str, bytes | str]) -> None:
        """``files`` maps URLs to contents, or to a URL they redirect to."""
        self.files = files
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.requests.append(await answer(self.files, reader, writer))

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()


async def test_fetch_serves_the_download_stores_it_and_reports_it(
    make_egress: MakeEgress, tmp_path: Path
) -> None:
    url = "http://files.example.org/x.sh"
    proxy = Proxy({url: PAYLOAD})
    outbox = Outbox(
        tmp_path / "outbox",
        "127.0.0.1:1",  # never reached: the test reads the queue
        TlsFiles(tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"),
        OutboxMetrics("t", CollectorRegistry()),
        max_bytes=10_000_000,
        max_files=10,
    )
    await outbox.open()
    async with proxy as address:
        fleet = await make_egress(egress_policy="fetch", egress_fetch_proxy=address)
        fleet.egress.sinkhole.artefacts = outbox
        answer = await connect(
            fleet, b"GET /x.sh HTTP/1.1\r\nHost: files.example.org\r\nUser-Agent: Wget\r\n\r\n"
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == PAYLOAD
    assert proxy.requests[0].startswith(b"GET http://files.example.org/x.sh HTTP/1.0\r\n")
    assert b"User-Agent: Wget\r\n" in proxy.requests[0]
    shasum = hashlib.sha256(PAYLOAD).hexdigest()
    stored = fleet.egress.config.state_dir / "downloads" / shasum
    assert stored.read_bytes() == PAYLOAD
    await until(lambda: len(fleet.of("cowrie.session.file_download")) == 1)
    download = fleet.of("cowrie.session.file_download")[0]
    assert (download["url"], download["shasum"], download["outfile"]) == (url, shasum, str(stored))
    assert (download["session"], download["size"]) == ("s1", len(PAYLOAD))
    # Queued for the controller's artefact store too, on the session.
    await until(lambda: outbox.backlog == 1)
    await outbox.close()


@pytest.mark.parametrize(
    ("settings", "path", "reason"),
    [
        (
            {"egress_fetch_deny": ["*.example.org"]},
            "/x.sh",
            "files.example.org is on egress_fetch_deny",
        ),
        ({"egress_fetch_allow": ["good.example"]}, "/x.sh", "not on egress_fetch_allow"),
        ({"egress_fetch_max_bytes": 100}, "/x.sh", "over 100"),
        ({}, "/missing", "HTTP status 404"),
    ],
)
async def test_fetch_failures_are_reported_and_the_guest_meets_a_dead_end(
    make_egress: MakeEgress, settings: dict[str, Any], path: str, reason: str
) -> None:
    proxy = Proxy({"http://files.example.org/x.sh": PAYLOAD})
    async with proxy as address:
        fleet = await make_egress(egress_policy="fetch", egress_fetch_proxy=address, **settings)
        answer = await connect(
            fleet, b"GET %s HTTP/1.1\r\nHost: files.example.org\r\n\r\n" % path.encode()
        )
    assert answer.startswith(b"HTTP/1.1 404 Not Found")
    await until(lambda: len(fleet.of("cowrie.session.file_download.failed")) == 1)
    failed = fleet.of("cowrie.session.file_download.failed")[0]
    assert failed["url"] == f"http://files.example.org{path}"
    assert reason in failed["reason"]
    assert not fleet.of("cowrie.session.file_download")
    if "allow" in reason or "deny" in reason:
        assert proxy.requests == []  # refused before anything was sent


async def test_fetch_gives_up_after_its_timeout(make_egress: MakeEgress) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fleet = await make_egress(
        egress_policy="fetch", egress_fetch_proxy=f"127.0.0.1:{port}", egress_fetch_timeout=0.5
    )
    answer = await connect(fleet, b"GET /x HTTP/1.1\r\nHost: slow.example\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 404")
    await until(lambda: len(fleet.of("cowrie.session.file_download.failed")) == 1)
    assert "within 0.5 s" in fleet.of("cowrie.session.file_download.failed")[0]["reason"]
    server.close()


async def test_a_port_already_taken_fails_start_naming_its_key(make_egress: MakeEgress) -> None:
    with socket.socket() as taken:
        taken.bind((GUEST, 0))
        taken.listen()
        port, dns = taken.getsockname()[1], free_port()
        with pytest.raises(ConfigError) as e:
            await make_egress(egress_dns_port=dns, egress_sinkhole_port=port)
    assert e.value.key == "egress_sinkhole_port"
    assert "another process" in str(e.value)
    # What had started (the DNS server) was closed again: its port is free.
    fleet = await make_egress(egress_dns_port=dns)
    assert (await ask(fleet, "a.example")).endswith(socket.inet_aton(GUEST))


async def test_fetch_follows_redirects_checking_each_target(make_egress: MakeEgress) -> None:
    proxy = Proxy(
        {
            "http://files.example.org/x.sh": "http://cdn.example.net/real/x.sh",
            "http://cdn.example.net/real/x.sh": PAYLOAD,
            "http://files.example.org/denied": "http://evil.gov/x",
            "http://files.example.org/loop": "/loop",
        }
    )
    async with proxy as address:
        fleet = await make_egress(
            egress_policy="fetch", egress_fetch_proxy=address, egress_fetch_deny=["*.gov"]
        )
        for path in (b"/x.sh", b"/denied", b"/loop"):
            await connect(fleet, b"GET %s HTTP/1.1\r\nHost: files.example.org\r\n\r\n" % path)
    await until(lambda: len(fleet.of("cowrie.session.file_download.failed")) == 2)
    (download,) = fleet.of("cowrie.session.file_download")
    assert download["url"] == "http://files.example.org/x.sh"
    assert download["final_url"] == "http://cdn.example.net/real/x.sh"
    assert download["shasum"] == hashlib.sha256(PAYLOAD).hexdigest()
    reasons = {e["url"]: e["reason"] for e in fleet.of("cowrie.session.file_download.failed")}
    assert reasons == {
        "http://files.example.org/denied": "evil.gov is on egress_fetch_deny",
        "http://files.example.org/loop": "more than 3 redirects",
    }
    assert not any(b"evil.gov" in r for r in proxy.requests)  # refused before asking
