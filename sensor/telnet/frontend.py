"""The Telnet frontend: listening sockets, admission to the Telnet pool, and refusals."""

from __future__ import annotations

import asyncio
import logging

from honeyfleet.events import plain_ip
from sensor.session.core import Services
from sensor.session.refusals import RefusalReporter
from sensor.telnet.server import TelnetdProtocol
from sensor.telnet.session import TelnetSession


class TelnetFrontend:
    """Accepts attackers on every ``telnet_listen`` address."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._servers: list[asyncio.Server] = []
        self._refusals = RefusalReporter(
            services.events,
            sensor=services.sensor,
            protocol="telnet",
            interval=services.config.refusal_event_interval,
            # A telnetd behind tcpd says nothing: the connection just closes (FIN).
            text=b"",
        )

    async def start(self) -> list[int]:
        """Listen; returns the bound ports (useful with port 0)."""
        # telnetlib3 logs every connection at INFO and attacker-made protocol errors with
        # tracebacks at WARNING; the sessions' own events and log lines cover both.
        logging.getLogger("telnetlib3").setLevel(logging.ERROR)
        loop = asyncio.get_running_loop()
        config = self._services.config
        ports = []
        for listen in config.telnet_listen:
            host, _, port = listen.rpartition(":")
            server = await loop.create_server(
                lambda: TelnetdProtocol(self._accept, config.write_buffer_high),
                host.strip("[]"),
                int(port),
            )
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

    def _accept(
        self, protocol: TelnetdProtocol, transport: asyncio.Transport
    ) -> TelnetSession | None:
        """Admit a new TCP connection, or refuse it with a plain close (and say so, rarely)."""
        services = self._services
        peer = transport.get_extra_info("peername")
        peer = (plain_ip(peer[0]), peer[1])
        local = transport.get_extra_info("sockname")
        slot = services.admission.admit(
            "telnet", peer[0], spool_near_full=services.events.spool.near_full
        )
        if isinstance(slot, str):
            self._refusals.refuse(transport, peer[0], slot)
            return None
        return TelnetSession(services, transport, slot, peer, local[:2])
