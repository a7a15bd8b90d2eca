"""Connection attempts the pool network's filter drops, read from netfilter's NFLOG.

The node's rules (:mod:`poolnode.egress.netfilter`) copy the first packet of each new
guest flow that nothing of ours answers (TCP under ``drop``, UDP other than DNS and
DHCP under every policy, and every IPv6 TCP or UDP packet, seen on the bridge before
libvirt's filter drops it) to an NFLOG group; the guest nwfilter then drops it as before.
This module binds that group on a netlink socket (``NETLINK_NETFILTER``, the protocol
of ``libnetfilter_log``), reads the packets' IPv4 or IPv6 headers (and, for IPv6, the
sender's MAC: a guest's IPv6 source address is its own choice) and hands each attempt on
once: a SYN or datagram sent again (a dropped flow is never confirmed, so each resend is
"new" again) within ``REPEAT_WINDOW`` seconds counts as the same attempt.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_HWADDR = 8
NFULA_PAYLOAD = 9
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
NLA_TYPE_MASK = 0x3FFF
NLMSG = struct.Struct("=IHHII")
NLA = struct.Struct("=HH")
PAYLOAD_BYTES = 256
"""Bytes of a UDP datagram's payload kept (a TFTP request's file name, say)."""
COPY_BYTES = 128 + 8 + PAYLOAD_BYTES
"""Bytes of each packet copied: the IP header (IPv4 options, or IPv6's 40 bytes and up to
88 of extension headers), UDP's, payload."""
REPEAT_WINDOW = 30.0
REMEMBERED = 4096
TRANSPORTS = {6: "tcp", 17: "udp"}
ICMPV6 = 58
SOLICITATION = 135
"""ICMPv6 neighbour solicitation."""
IPV6_EXTENSIONS = (0, 43, 60)
"""Hop-by-hop, routing and destination options: skipped to reach TCP or UDP."""


@dataclass(frozen=True)
class Attempt:
    """A guest's try to reach something: one flow's first packet."""

    src_ip: str
    dst_ip: str
    dst_port: int
    transport: str
    src_port: int
    payload: bytes = b""
    """The start of a UDP datagram's payload (at most PAYLOAD_BYTES; TCP: empty)."""
    mac: str = ""
    """The sender's MAC address, for IPv6 ("" for IPv4: its source address names the guest)."""


def parse_packet(packet: bytes, mac: str = "") -> Attempt | None:
    """The attempt an IPv4 or IPv6 TCP/UDP packet starts (None for anything else);
    ``mac`` (the frame's sender) is kept for IPv6."""
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return _ipv6(packet, mac)
    if len(packet) < 20 or packet[0] >> 4 != 4:
        return None
    header = (packet[0] & 0x0F) * 4
    src, dst = (str(ipaddress.IPv4Address(packet[i : i + 4])) for i in (12, 16))
    return _transport(packet, header, packet[9], src, dst, "")


def _ipv6(packet: bytes, mac: str) -> Attempt | None:
    """An IPv6 packet's attempt, past the extension headers that may precede TCP/UDP.

    A neighbour solicitation is one too (transport ``icmpv6``, the address asked for as
    destination): with no IPv6 router on the pool network, anything a guest sends to an
    on-link address starts with one, and libvirt's filter drops it, so the TCP or UDP
    behind it never leaves the guest. Duplicate address detection's (from ``::``) is the
    guest's own housekeeping, not an attempt.
    """
    protocol, header = packet[6], 40
    while protocol in IPV6_EXTENSIONS and len(packet) >= header + 2:
        protocol, header = packet[header], header + (packet[header + 1] + 1) * 8
    src, dst = (str(ipaddress.IPv6Address(packet[i : i + 16])) for i in (8, 24))
    if protocol == ICMPV6 and len(packet) >= header + 24 and packet[header] == SOLICITATION:
        if src == "::":
            return None
        target = str(ipaddress.IPv6Address(packet[header + 8 : header + 24]))
        return Attempt(src, target, 0, "icmpv6", 0, b"", mac)
    return _transport(packet, header, protocol, src, dst, mac)


def _transport(
    packet: bytes, header: int, protocol: int, src: str, dst: str, mac: str
) -> Attempt | None:
    """The attempt of a TCP or UDP header at ``header`` (None for other protocols)."""
    transport = TRANSPORTS.get(protocol)
    if transport is None or len(packet) < header + 4:
        return None
    src_port, dst_port = struct.unpack_from("!HH", packet, header)
    payload = packet[header + 8 : header + 8 + PAYLOAD_BYTES] if transport == "udp" else b""
    return Attempt(src, dst, dst_port, transport, src_port, payload, mac)


def packets(data: bytes) -> list[tuple[bytes, str]]:
    """The packets (NFULA_PAYLOAD) in a datagram of NFLOG netlink messages, each with its
    sender's MAC address (NFULA_HWADDR; "" when the kernel gave none)."""
    found = []
    offset = 0
    while offset + NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = NLMSG.unpack_from(data, offset)
        if length < NLMSG.size:
            break
        if kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            attr = offset + NLMSG.size + 4  # after the nfgenmsg
            end = offset + length
            packet, mac = None, ""
            while attr + NLA.size <= end:
                size, kind_ = NLA.unpack_from(data, attr)
                if size < NLA.size:
                    break
                value = data[attr + NLA.size : attr + size]
                if kind_ & NLA_TYPE_MASK == NFULA_PAYLOAD:
                    packet = value
                elif kind_ & NLA_TYPE_MASK == NFULA_HWADDR and len(value) >= 4:
                    mac = _mac(value)
                attr += (size + 3) & ~3
            if packet is not None:
                found.append((packet, mac))
        offset += (length + 3) & ~3
    return found


def _mac(hwaddr: bytes) -> str:
    """A MAC address from an NFULA_HWADDR (length, padding, address)."""
    (length,) = struct.unpack_from("!H", hwaddr)
    return ":".join(f"{b:02x}" for b in hwaddr[4 : 4 + min(length, 8)])


def config_message(group: int, *attrs: tuple[int, bytes]) -> bytes:
    """An NFULNL_MSG_CONFIG request for ``group`` carrying ``attrs``."""
    body = struct.pack("!BBH", socket.AF_INET, 0, group)
    for kind, value in attrs:
        size = NLA.size + len(value)
        body += NLA.pack(size, kind) + value + b"\0" * (-size % 4)
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    return NLMSG.pack(NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, 0, 0) + body


def open_socket() -> socket.socket:
    """A netlink socket for NFLOG, in the caller's network namespace."""
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


class PacketLog:
    """Reads one NFLOG group and calls ``on_attempt`` once per attempt."""

    def __init__(
        self,
        group: int,
        on_attempt: Callable[[Attempt], None],
        *,
        make_socket: Callable[[], socket.socket] = open_socket,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.group = group
        self._on_attempt = on_attempt
        self._make_socket = make_socket
        self._clock = clock
        self._seen: OrderedDict[Attempt, float] = OrderedDict()
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Bind the group (fails with OSError if another process holds it) and read."""
        sock = self._make_socket()
        try:
            sock.bind((0, 0))
            bind = (NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
            _request(sock, config_message(self.group, bind))
            mode = struct.pack("!IBB", COPY_BYTES, NFULNL_COPY_PACKET, 0)
            _request(sock, config_message(self.group, (NFULA_CFG_MODE, mode)))
            # Each packet at once: the kernel's default batches up to 100 packets or a
            # second, and the TFTP server waits for a request's copy to learn its address.
            threshold = (NFULA_CFG_QTHRESH, struct.pack("!I", 1))
            _request(sock, config_message(self.group, threshold))
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def stop(self) -> None:
        """Stop reading and unbind the group."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        asyncio.get_running_loop().remove_reader(sock.fileno())
        sock.close()  # the kernel unbinds a closed socket's group

    def _readable(self) -> None:
        """Read what the kernel sent, one attempt at a time."""
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:  # ENOBUFS: the kernel dropped some; go on with the rest
                log.warning("NFLOG group %d: %s", self.group, e)
                return
            for packet, mac in packets(data):
                attempt = parse_packet(packet, mac)
                if attempt is not None and self._first(attempt):
                    self._on_attempt(attempt)

    def _first(self, attempt: Attempt) -> bool:
        """Whether ``attempt`` is new (not a resend within the repeat window)."""
        now = self._clock()
        while self._seen and (
            len(self._seen) > REMEMBERED or next(iter(self._seen.values())) < now - REPEAT_WINDOW
        ):
            self._seen.popitem(last=False)
        if attempt in self._seen:
            return False
        self._seen[attempt] = now
        return True


def _request(sock: socket.socket, message: bytes) -> None:
    """Send a config request and check the kernel's acknowledgement."""
    sock.send(message)
    reply = sock.recv(4096)
    _length, kind, _flags, _seq, _pid = NLMSG.unpack_from(reply)
    if kind == NLMSG_ERROR:
        (error,) = struct.unpack_from("=i", reply, NLMSG.size)
        if error:
            raise OSError(-error, f"NFLOG group config: {os.strerror(-error)}")
