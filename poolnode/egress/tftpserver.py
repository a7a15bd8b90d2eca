"""Guests' TFTP under ``fetch``: each read request fetched through the egress and served.

The node's nat rule redirects guests' UDP to port 69 (any address) to this server on
the pool network's address. A redirect hides where the request was going (conntrack
answers SO_ORIGINAL_DST for TCP only), but the request was copied to NFLOG on its way
in (:mod:`poolnode.egress.nflog`): :class:`Origins` keeps those destinations by the
guest's address and port, and a request waits for its own a moment. Answers leave from
the redirected port, so conntrack gives them the address and port the guest asked
(the server's TID is 69 then, which clients learn like any other).

A read request is reported (``honeyfleet.egress.connect``, kind ``tftp``, with its
``url``), fetched by the sinkhole's fetcher (``tftp://HOST/FILE``, through the
operator's egress), reported as a download or its failure, and sent to the guest; a
write request is reported and refused. Transfers at once are bounded, all guests
together and per guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from typing import Any, cast

from poolnode.egress import tftp
from poolnode.egress.dnsserver import RecentNames
from poolnode.egress.report import CONNECT
from poolnode.egress.sinkhole import Sinkhole
from poolnode.egress.sniff import escaped, tftp_request

log = logging.getLogger(__name__)

TFTP_PORT = 69
ORIGIN_WAIT = 1.0
"""Seconds a request waits for its NFLOG copy to say where it was going."""
REMEMBERED = 1024
MAX_TRANSFERS = 64
PER_GUEST = 4


class Origins:
    """Where guests' redirected TFTP requests were going, by (guest address, port)."""

    def __init__(self) -> None:
        self._known: OrderedDict[tuple[str, int], str] = OrderedDict()
        self._changed = asyncio.Event()

    def seen(self, guest_ip: str, guest_port: int, dst_ip: str) -> None:
        """A request from ``guest_ip:guest_port`` to ``dst_ip`` (read from NFLOG)."""
        self._known[(guest_ip, guest_port)] = dst_ip
        self._known.move_to_end((guest_ip, guest_port))
        while len(self._known) > REMEMBERED:
            self._known.popitem(last=False)
        self._changed.set()
        self._changed = asyncio.Event()

    async def of(self, guest_ip: str, guest_port: int, wait: float = ORIGIN_WAIT) -> str | None:
        """The destination of that guest port's request, waiting up to ``wait`` seconds."""
        key = (guest_ip, guest_port)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while key not in self._known:
                    await self._changed.wait()
        return self._known.get(key)


class TftpServer(asyncio.DatagramProtocol):
    """The node's TFTP listener for guests (an asyncio datagram protocol)."""

    def __init__(
        self, sinkhole: Sinkhole, origins: Origins, *, address: str, names: RecentNames
    ) -> None:
        """``address`` is the node's on the pool network (what DNS answers give)."""
        self._sinkhole = sinkhole
        self._origins = origins
        self._address = address
        self._names = names
        self._transport: asyncio.DatagramTransport | None = None
        self._transfers: dict[tuple[str, int], asyncio.Queue[bytes]] = {}
        self._per_guest: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, packet: bytes, addr: tuple[str | Any, int]) -> None:
        key = (str(addr[0]), int(addr[1]))
        inbox = self._transfers.get(key)
        if inbox is not None:
            with contextlib.suppress(asyncio.QueueFull):
                inbox.put_nowait(packet)
            return
        if len(self._transfers) >= MAX_TRANSFERS or self._per_guest[key[0]] >= PER_GUEST:
            return  # the guest's client will try again
        self._transfers[key] = asyncio.Queue(16)
        self._per_guest[key[0]] += 1
        task = asyncio.create_task(self._serve(key, packet))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """End the transfers in progress (the transport is closed by the caller)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, key: tuple[str, int], first: bytes) -> None:
        guest_ip, port = key
        try:
            await self._request(guest_ip, port, first)
        except (tftp.TftpFailed, OSError) as e:
            log.debug("guest %s TFTP: %s", guest_ip, e)
        finally:
            del self._transfers[key]
            self._per_guest[guest_ip] -= 1
            if not self._per_guest[guest_ip]:
                del self._per_guest[guest_ip]

    async def _request(self, guest_ip: str, port: int, first: bytes) -> None:
        """Report one request, and fetch and send what it reads."""
        dst_ip = await self._origins.of(guest_ip, port) or self._address
        asked = tftp_request(first)
        fields: dict[str, Any]
        if asked is None:
            fields = {"kind": "data", "data": escaped(first)}
        else:
            looked_up = self._names.last(guest_ip) if dst_ip == self._address else None
            host = looked_up or (f"[{dst_ip}]" if ":" in dst_ip else dst_ip)
            url = f"tftp://{host}/{asked['filename'].lstrip('/')}"
            fields = {"kind": "tftp", "method": asked["method"], "url": url}
        self._sinkhole.reporter.report(
            guest_ip,
            CONNECT,
            "honeyfleet.egress.connect",
            "Guest connection to {dst_ip}:{dst_port} ({kind})",
            dst_ip=dst_ip,
            dst_port=TFTP_PORT,
            transport="udp",
            **fields,
        )
        if asked is None:
            return
        if asked["method"] != "read":
            self._send(guest_ip, port, tftp.error(tftp.ACCESS_VIOLATION, "Access violation"))
            return
        download = await self._sinkhole.download(guest_ip, fields["url"], None)
        if download is None:
            self._send(guest_ip, port, tftp.error(tftp.NOT_FOUND, "File not found"))
            return
        with self._sinkhole.holding(download):
            await self._send_file(guest_ip, port, download.body)
            await self._sinkhole.keep(guest_ip, download)

    async def _send_file(self, guest_ip: str, port: int, body: bytes) -> None:
        """Send ``body`` block by block, each until acknowledged (bounded retries)."""
        inbox = self._transfers[(guest_ip, port)]
        block = 1
        while True:
            chunk = body[(block - 1) * tftp.BLOCK : block * tftp.BLOCK]
            packet = tftp.data(block, chunk)
            for _ in range(tftp.RETRIES):
                self._send(guest_ip, port, packet)
                if await _acknowledged(inbox, block):
                    break
            else:
                raise tftp.TftpFailed(f"block {block} not acknowledged")
            if len(chunk) < tftp.BLOCK:
                return
            block += 1

    def _send(self, guest_ip: str, port: int, packet: bytes) -> None:
        if self._transport is not None:
            self._transport.sendto(packet, (guest_ip, port))


async def _acknowledged(inbox: asyncio.Queue[bytes], block: int) -> bool:
    """Whether ACK ``block`` came within tftp.WAIT (other packets are skipped); raises
    TftpFailed if the guest sent an ERROR."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(tftp.WAIT):
            while True:
                opcode, number, _ = tftp.parse(await inbox.get())
                if opcode == tftp.ERROR:
                    raise tftp.TftpFailed(f"the guest ended the transfer (error {number})")
                if opcode == tftp.ACK and number == block & 0xFFFF:
                    return True
    return False
