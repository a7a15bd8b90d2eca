"""The node's DNS server for guests: every query is answered by policy and reported."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

from poolnode.egress.dns import TYPE_A, BadQuery, Query, answer, parse_query
from poolnode.egress.report import DNS, Reporter

log = logging.getLogger(__name__)


class DnsServer(asyncio.DatagramProtocol):
    """Answers guests' queries with ``address`` (None: REFUSED) and reports each one."""

    def __init__(self, reporter: Reporter, address: str | None) -> None:
        self._reporter = reporter
        self._address = address
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


async def serve_dns(
    reporter: Reporter, host: str, port: int, address: str | None
) -> asyncio.DatagramTransport:
    """Bind the DNS server on ``host:port``; close the returned transport to stop it."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: DnsServer(reporter, address), local_addr=(host, port)
    )
    return transport
