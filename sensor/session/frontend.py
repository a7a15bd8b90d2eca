"""What the SSH and Telnet frontends share: listening sockets, admission and refusals.

A frontend listens on its protocol's addresses; each accepted TCP connection is admitted
to the protocol's pool (:mod:`sensor.session.admission`) before a byte is read, or
refused as the protocol's real daemon refuses (:mod:`sensor.session.refusals`). The
subclass says only which asyncio protocol a connection gets and what an admitted one
becomes.
"""

from __future__ import annotations

import asyncio

from honeyfleet.events import plain_ip
from sensor.session.admission import Slot
from sensor.session.core import Services
from sensor.session.refusals import RefusalReporter

Admitted = tuple[Slot, tuple[str, int], tuple[str, int]]


class Frontend:
    """Listening sockets of one protocol and the door every connection comes through."""

    def __init__(
        self, services: Services, protocol: str, listen: tuple[str, ...], *, refusal_text: bytes
    ) -> None:
        self._services = services
        self._protocol = protocol
        self._listen = listen
        self._servers: list[asyncio.Server] = []
        self._refusals = RefusalReporter(
            services.events,
            sensor=services.sensor,
            protocol=protocol,
            interval=services.config.refusal_event_interval,
            text=refusal_text,
        )

    def connection_protocol(self) -> asyncio.Protocol:
        """The asyncio protocol of a new connection (it calls :meth:`admit` first)."""
        raise NotImplementedError

    async def start(self) -> list[int]:
        """Listen; returns the bound ports (useful with port 0)."""
        loop = asyncio.get_running_loop()
        ports = []
        for listen in self._listen:
            host, _, port = listen.rpartition(":")
            server = await loop.create_server(self.connection_protocol, host.strip("[]"), int(port))
            self._servers.append(server)
            ports.append(server.sockets[0].getsockname()[1])
        return ports

    def close(self) -> None:
        """Stop listening."""
        for server in self._servers:
            server.close()

    async def wait_closed(self) -> None:
        """Wait until the listening sockets are closed."""
        for server in self._servers:
            await server.wait_closed()

    def admit(self, transport: asyncio.Transport) -> Admitted | None:
        """A slot and the connection's ends, or None: refused (and said so, rarely)."""
        services = self._services
        peername = transport.get_extra_info("peername")
        peer = (plain_ip(peername[0]), peername[1])
        local = transport.get_extra_info("sockname")
        slot = services.admission.admit(
            self._protocol, peer[0], spool_near_full=services.events.spool.near_full
        )
        if isinstance(slot, str):
            self._refusals.refuse(transport, peer[0], slot)
            return None
        return slot, peer, local[:2]
