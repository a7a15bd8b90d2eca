"""Egress containment's pure parts: DNS answers by policy, naming a connection's first
bytes, and the per-guest event bounds."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest

from poolnode.egress.bounds import EventBounds
from poolnode.egress.dns import BadQuery, answer, parse_query
from poolnode.egress.sniff import complete, sniff


def query(name: str, qtype: int = 1, ident: int = 0x1234) -> bytes:
    """A stub resolver's query (RD set), as busybox nslookup sends it."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return (
        struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0)
        + labels
        + b"\0"
        + struct.pack("!HH", qtype, 1)
    )


def test_a_question_is_answered_with_the_sinkhole() -> None:
    q = parse_query(query("Evil.Example.com"))
    assert (q.name, q.type_name) == ("evil.example.com", "A")
    reply = answer(q, "10.77.0.1")
    ident, flags, qd, an, _, _ = struct.unpack_from("!HHHHHH", reply)
    assert (ident, flags & 0x8000, flags & 0x0100, flags & 0xF, qd, an) == (
        0x1234,
        0x8000,
        0x100,
        0,
        1,
        1,
    )
    assert reply.endswith(bytes([10, 77, 0, 1]))
    assert reply[12 : 12 + len(q.question)] == q.question


def test_other_types_get_no_records_and_drop_refuses() -> None:
    aaaa = parse_query(query("evil.example.com", qtype=28))
    assert aaaa.type_name == "AAAA"
    reply = answer(aaaa, "10.77.0.1")
    assert struct.unpack_from("!H", reply, 6)[0] == 0  # no answers
    assert struct.unpack_from("!H", reply, 2)[0] & 0xF == 0  # NOERROR
    refused = answer(parse_query(query("evil.example.com")), None)
    assert struct.unpack_from("!H", refused, 2)[0] & 0xF == 5
    assert struct.unpack_from("!H", refused, 6)[0] == 0


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x34",
        query("a.b")[:-2],  # no class
        struct.pack("!HHHHHH", 1, 0x8000, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01",  # a reply
        struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",  # pointer
        struct.pack("!HHHHHH", 1, 0x0100, 1, 0, 0, 0) + b"\x05ab",  # runs past the end
    ],
)
def test_what_is_not_a_query_is_refused(data: bytes) -> None:
    with pytest.raises(BadQuery):
        parse_query(data)


def test_http_request_gives_its_url_host_and_agent() -> None:
    data = b"GET /x.sh HTTP/1.1\r\nHost: files.example:8080\r\nUser-Agent: Wget\r\n\r\n"
    assert complete(data) and not complete(data[:-2])
    seen = sniff(data, "10.77.0.1", 8080)
    assert seen.kind == "http"
    assert seen.fields == {
        "method": "GET",
        "url": "http://files.example:8080/x.sh",
        "host": "files.example:8080",
        "user_agent": "Wget",
    }
    # No Host header: the address and port the guest connected to.
    bare = sniff(b"GET /a HTTP/1.0\r\n\r\n", "192.0.2.9", 81).fields
    assert bare["url"] == "http://192.0.2.9:81/a"


def client_hello(server_name: str) -> bytes:
    """A real ClientHello from Python's TLS stack."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_hello_gives_its_server_name() -> None:
    hello = client_hello("c2.example.net")
    assert complete(hello) and not complete(hello[:20])
    assert sniff(hello, "10.77.0.1", 443) == sniff(hello, "x", 1)
    assert sniff(hello, "10.77.0.1", 443).fields == {"sni": "c2.example.net"}
    assert sniff(hello, "10.77.0.1", 443).kind == "tls"


def test_other_bytes_are_shown_escaped_and_bounded() -> None:
    seen = sniff(b"\x00\xffSSH-2.0-x\r\n" + b"A" * 1000, "10.77.0.1", 22)
    assert seen.kind == "data"
    assert seen.fields["data"].startswith("\\x00\\xffSSH-2.0-x\\r\\n")
    assert len(seen.fields["data"]) < 300
    assert sniff(b"", "10.77.0.1", 22).kind == "none"


def test_bounds_allow_a_burst_then_the_rate_and_count_what_they_held_back() -> None:
    now = [0.0]
    bounds = EventBounds(per_minute=60, burst=2, clock=lambda: now[0])
    assert [bounds.take("10.0.0.5", "dns") for _ in range(4)] == [0, 0, None, None]
    # Another guest, and another kind of the same guest, have bounds of their own.
    assert bounds.take("10.0.0.6", "dns") == 0
    assert bounds.take("10.0.0.5", "connect") == 0
    now[0] = 1.0  # one event a second
    assert bounds.take("10.0.0.5", "dns") == 2  # says two were held back before it
    assert bounds.take("10.0.0.5", "dns") is None


def test_bounds_forget_the_least_recent_guest() -> None:
    bounds = EventBounds(per_minute=1, burst=1, clock=lambda: 0.0, tracked=2)
    assert bounds.take("a", "dns") == 0
    assert bounds.take("a", "dns") is None
    bounds.take("b", "dns")
    bounds.take("c", "dns")
    assert bounds.take("a", "dns") == 0  # forgotten, so a fresh burst


def test_guest_filter_lets_guests_reach_the_egress_servers_before_its_drops() -> None:
    import xml.etree.ElementTree as ET

    from poolnode.backends.libvirt_xml import render_nwfilter

    xml = render_nwfilter("hf-guest", None, (("udp", 10053), ("tcp", 10080)))
    root = ET.fromstring(xml)  # noqa: S314 - our own rendering
    rules = list(root.iter("rule"))
    added = [
        (
            r.get("action"),
            r.get("direction"),
            child.tag,
            child.get("dstipaddr"),
            child.get("dstportstart"),
        )
        for r in rules
        for child in r
        if child.get("dstportstart") in ("10053", "10080")
    ]
    assert added == [
        ("accept", "out", "udp", "$DNS_SERVER", "10053"),
        ("accept", "out", "tcp", "$DNS_SERVER", "10080"),
    ]
    actions = [r.get("action") for r in rules]
    assert actions[-2:] == ["drop", "drop"] and actions.count("drop") == 2


def nflog_datagram(*packets: bytes, mac: bytes = b"") -> bytes:
    """NFLOG netlink messages as the kernel sends them: a prefix attribute, the sender's
    MAC (NFULA_HWADDR) if given, then the packet (NFULA_PAYLOAD), each attribute padded
    to 4 bytes."""
    out = b""
    for packet in packets:
        attrs = b""
        hwaddr = ((8, struct.pack("!HH", len(mac), 0) + mac.ljust(8, b"\0")),) if mac else ()
        for kind, value in ((10, b"hf\0"), *hwaddr, (9, packet)):
            size = 4 + len(value)
            attrs += struct.pack("=HH", size, kind) + value + b"\0" * (-size % 4)
        body = struct.pack("!BBH", 2, 0, 7707) + attrs
        out += struct.pack("=IHHII", 16 + len(body), 0x0400, 0, 0, 0) + body
    return out


def ipv4(protocol: int, dst: str, dst_port: int, options: bytes = b"") -> bytes:
    """An IPv4 header (with ``options``) and the first bytes of a TCP/UDP header."""
    ihl = (20 + len(options)) // 4
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, 40, 0, 0, 64, protocol, 0,
        socket.inet_aton("10.77.0.23"), socket.inet_aton(dst),
    )  # fmt: skip
    return header + options + struct.pack("!HH", 40000, dst_port)


def test_nflog_packets_become_attempts() -> None:
    from poolnode.egress.nflog import Attempt, packets, parse_packet

    data = nflog_datagram(
        ipv4(6, "192.0.2.10", 443),
        ipv4(17, "192.0.2.11", 9999, options=b"\x01\x01\x01\x00"),  # 4 bytes of options
        ipv4(1, "192.0.2.12", 0),  # ICMP: not a flow of ours
    )
    found = [parse_packet(*p) for p in packets(data)]
    assert found == [
        Attempt("10.77.0.23", "192.0.2.10", 443, "tcp", 40000),
        Attempt("10.77.0.23", "192.0.2.11", 9999, "udp", 40000),
        None,
    ]
    assert packets(data[:10]) == []
    assert parse_packet(b"\x60" + bytes(39)) is None  # IPv6 with no next header


def ipv6(protocol: int, dst: str, dst_port: int, extension: bytes = b"") -> bytes:
    """An IPv6 header (then a hop-by-hop ``extension`` if given) and the first bytes of a
    TCP/UDP header, from the link-local address a guest's MAC 52:54:00:12:34:56 makes."""
    first = 0 if extension else protocol
    header = struct.pack("!IHBB", 0x60000000, 8 + len(extension), first, 64)
    header += socket.inet_pton(socket.AF_INET6, "fe80::5054:ff:fe12:3456")
    header += socket.inet_pton(socket.AF_INET6, dst)
    if extension:
        extension = bytes([protocol]) + extension[1:]
    return header + extension + struct.pack("!HH", 40000, dst_port) + b"\0\0\0\0hi"


def test_nflog_ipv6_packets_become_attempts_with_their_senders_mac() -> None:
    from poolnode.egress.nflog import Attempt, packets, parse_packet

    hop_by_hop = bytes([0, 0, 5, 2, 0, 0, 1, 0])  # next header (set), length 0, options
    data = nflog_datagram(
        ipv6(6, "2001:db8::80", 443),
        ipv6(17, "2001:db8::53", 53, extension=hop_by_hop),
        ipv6(58, "ff02::2", 0),  # ICMPv6 (a router solicitation): not an attempt
        mac=bytes.fromhex("525400123456"),
    )
    found = [parse_packet(*p) for p in packets(data)]
    guest, mac = "fe80::5054:ff:fe12:3456", "52:54:00:12:34:56"
    assert found == [
        Attempt(guest, "2001:db8::80", 443, "tcp", 40000, b"", mac),
        Attempt(guest, "2001:db8::53", 53, "udp", 40000, b"hi", mac),
        None,
    ]


def test_fetch_redirects_tftp_to_the_nodes_tftp_server() -> None:
    from poolnode.egress.netfilter import redirects

    assert ["-p", "udp", "--dport", "69", "-j", "REDIRECT", "--to-ports", "10069"] in (
        redirects(10053, 10080, 10069)
    )
    assert not any("69" in rule for rule in redirects(10053, 10080))


def test_ipv6_is_logged_from_guests_taps_to_the_nflog_group() -> None:
    from poolnode.egress.netfilter import logged_ipv6

    ipv6, nflog = ["-i", "vnet+", "-p", "IPv6"], ["--nflog-group", "7707"]
    assert logged_ipv6(7707) == [
        [*ipv6, "--ip6-proto", "tcp", *nflog],
        [*ipv6, "--ip6-proto", "udp", *nflog],
        [*ipv6, "--ip6-proto", "ipv6-icmp", "--ip6-icmp-type", "neighbour-solicitation", *nflog],
    ]


def test_a_neighbour_solicitation_is_an_attempt_on_its_target_but_dad_is_not() -> None:
    from poolnode.egress.nflog import Attempt, parse_packet

    def solicitation(src: str, target: str) -> bytes:
        header = struct.pack("!IHBB", 0x60000000, 24, 58, 255)
        header += socket.inet_pton(socket.AF_INET6, src)
        header += socket.inet_pton(socket.AF_INET6, "ff02::1:ff00:99")
        return (
            header + bytes([135, 0, 0, 0, 0, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, target)
        )

    mac = "52:54:00:12:34:56"
    assert parse_packet(solicitation("fe80::5054:ff:fe12:3456", "fe80::99"), mac) == (
        Attempt("fe80::5054:ff:fe12:3456", "fe80::99", 0, "icmpv6", 0, b"", mac)
    )
    assert parse_packet(solicitation("::", "fe80::5054:ff:fe12:3456"), mac) is None


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\0\1bins/x86\0octet\0", {"method": "read", "filename": "bins/x86"}),
        (b"\0\2loot.tar\0NETASCII\0", {"method": "write", "filename": "loot.tar"}),
        (b"\0\3\0\1data", None),  # a DATA packet
        (b"\0\1x.sh\0bogus\0", None),
        (b"\0\1\0octet\0", None),  # no file name
        (b"hello", None),
    ],
)
def test_tftp_requests_are_recognised(payload: bytes, expected: dict[str, str] | None) -> None:
    from poolnode.egress.sniff import tftp_request

    assert tftp_request(payload) == expected
