"""The node's DNS server for guests: every query is answered by policy and reported."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import cast

from poolnode.egress.dns import TYPE_A, BadQuery, Query, answer, parse_query
from poolnode.egress.report import DNS, Reporter

log = logging.getLogger(__name__)


class DnsServer(asyncio.DatagramProtocol):
    """Answers guests' queries with ``address`` (None: REFUSED) and reports each one."""

    def __init__(
        self, reporter: Reporter, address: str | None, names: RecentNames | None = None
    ) -> None:
        self._reporter = reporter
        self._address = address
        self._names = names
        self._transport: asyncio.DatagramTransport | None = None
        self.malformed = 0
        """Datagrams that were not queries (dropped without an answer)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the socket to answer on."""
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        """Answer one query, then report it."""
        try:
            query = parse_query(data)
        except BadQuery:
            self.malformed += 1
            return
        assert self._transport is not None
        self._transport.sendto(answer(query, self._address), addr)
        if self._names is not None and query.qtype == TYPE_A:
            self._names.looked_up(str(addr[0]), query.name)
        self._reporter.report(
            str(addr[0]),
            DNS,
            "honeyfleet.egress.dns",
            "DNS query for {query} ({qtype}) answered {answer}",
            query=query.name,
            qtype=query.type_name,
            answer=_said(query, self._address),
        )


def _said(query: Query, address: str | None) -> str:
    """What the answer to ``query`` said, for its event."""
    if address is None:
        return "REFUSED"
    return address if query.qtype == TYPE_A else "no records"


class RecentNames:
    """The name each guest looked up last: FTP and other protocols without a Host
    header name their server by it (every name resolves to the sinkhole's address)."""

    def __init__(self, *, fresh: float = 30.0, tracked: int = 4096) -> None:
        self._fresh = fresh
        self._tracked = tracked
        self._names: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def looked_up(self, guest_ip: str, name: str) -> None:
        """The guest at ``guest_ip`` asked for ``name``'s address."""
        self._names[guest_ip] = (name, time.monotonic())
        self._names.move_to_end(guest_ip)
        while len(self._names) > self._tracked:
            self._names.popitem(last=False)

    def last(self, guest_ip: str) -> str | None:
        """The name the guest looked up within the last ``fresh`` seconds, if any."""
        name, when = self._names.get(guest_ip, ("", 0.0))
        return name if name and time.monotonic() - when <= self._fresh else None


async def serve_dns(
    reporter: Reporter,
    host: str,
    port: int,
    address: str | None,
    names: RecentNames | None = None,
) -> asyncio.DatagramTransport:
    """Bind the DNS server on ``host:port``; close the returned transport to stop it."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: DnsServer(reporter, address, names), local_addr=(host, port)
    )
    return transport
