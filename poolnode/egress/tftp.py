"""TFTP (RFC 1350, octet mode, 512-byte blocks) as both ends under ``fetch``.

The client fetches a guest's ``tftp://HOST/FILE`` from HOST through the operator's
egress (a socket bound to ``egress_fetch_tftp_source``); the sender serves the result
to the guest. Options (RFC 2347: ``blksize``, ``tsize``) are ignored, which the RFC
lets a server do: clients then fall back to 512-byte blocks. Both ends are bounded in
bytes (hence blocks), in retransmissions and by the caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

RRQ, WRQ, DATA, ACK, ERROR = 1, 2, 3, 4, 5
BLOCK = 512
RETRIES = 5
"""Sends of one packet before the transfer is given up."""
WAIT = 1.0
"""Seconds to wait for an answer before sending again."""
NOT_FOUND, ACCESS_VIOLATION, DISK_FULL = 1, 2, 3


class TftpFailed(Exception):
    """A transfer that did not complete; the message says why."""


def request(opcode: int, filename: str) -> bytes:
    """A read or write request in octet mode."""
    return struct.pack("!H", opcode) + filename.encode("latin-1") + b"\0octet\0"


def data(block: int, chunk: bytes) -> bytes:
    return struct.pack("!HH", DATA, block & 0xFFFF) + chunk


def ack(block: int) -> bytes:
    return struct.pack("!HH", ACK, block & 0xFFFF)


def error(code: int, message: str) -> bytes:
    return struct.pack("!HH", ERROR, code) + message.encode("ascii", "replace") + b"\0"


def parse(packet: bytes) -> tuple[int, int, bytes]:
    """(opcode, block or error code, rest); opcode 0 for what is not TFTP."""
    if len(packet) < 4:
        return 0, 0, b""
    opcode, number = struct.unpack_from("!HH", packet)
    return opcode, number, packet[4:]


class _Inbox(asyncio.DatagramProtocol):
    """Datagrams of one client socket, with their senders."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue(64)

    def datagram_received(self, packet: bytes, addr: tuple[str | object, ...]) -> None:
        with contextlib.suppress(asyncio.QueueFull):  # a flood: the extra is lost, as on a wire
            self.queue.put_nowait((packet, (str(addr[0]), int(str(addr[1])))))


async def fetch(server: tuple[str, int], filename: str, *, source: str, max_bytes: int) -> bytes:
    """The file ``filename`` from the TFTP server at ``server``, read from a socket bound
    to ``source`` ("" any); raises TftpFailed (or OSError) saying why not. The caller
    bounds the time."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    anywhere = "::" if family == socket.AF_INET6 else "0.0.0.0"
    transport, inbox = await loop.create_datagram_endpoint(
        _Inbox, local_addr=(source or anywhere, 0), family=family
    )
    try:
        body = bytearray()
        peer: tuple[str, int] | None = None  # the server's transfer port (its TID), once known
        expected = 1
        last = request(RRQ, filename)
        transport.sendto(last, server)
        while True:
            raw, sender = await _answer(inbox, transport, last, peer or server)
            if sender[0] != server[0] or (peer is not None and sender != peer):
                continue  # not our server's: ignore (RFC 1350 says answer ERROR 5; no need)
            opcode, number, rest = parse(raw)
            if opcode == ERROR:
                message = rest.split(b"\0", 1)[0].decode("ascii", "replace")
                raise TftpFailed(f"server error {number}: {message}")
            if opcode != DATA:
                raise TftpFailed(f"unexpected TFTP opcode {opcode}")
            peer = sender
            if number != expected & 0xFFFF:
                transport.sendto(ack(expected - 1), peer)  # a duplicate: acknowledge again
                continue
            body += rest
            if len(body) > max_bytes:
                transport.sendto(error(DISK_FULL, "too large"), peer)
                raise TftpFailed(f"over {max_bytes} bytes")
            last = ack(expected)
            transport.sendto(last, peer)
            if len(rest) < BLOCK:
                return bytes(body)
            expected += 1
    finally:
        transport.close()


async def _answer(
    inbox: _Inbox, transport: asyncio.DatagramTransport, last: bytes, to: tuple[str, int]
) -> tuple[bytes, tuple[str, int]]:
    """The next datagram, sending ``last`` to ``to`` again while none comes."""
    for _ in range(RETRIES):
        try:
            return await asyncio.wait_for(inbox.queue.get(), WAIT)
        except TimeoutError:
            transport.sendto(last, to)
    raise TftpFailed(f"no answer after {RETRIES} tries")
