"""The Telnet frontend: listening sockets, admission, and refusal events."""

from __future__ import annotations

import asyncio
import logging

from sensor.refusals import RefusalReporter
from sensor.telnet.server import TelnetdProtocol
from sensor.telnet.session import TelnetSession, TelnetShared


class TelnetFrontend:
    """Accepts attackers on every ``telnet_listen`` address."""

    def __init__(self, shared: TelnetShared) -> None:
        self._shared = shared
        self._servers: list[asyncio.Server] = []
        self.sessions: set[TelnetSession] = set()
        self._refusals = RefusalReporter(
            shared.events,
            sensor=shared.sensor,
            protocol="telnet",
            interval=shared.config.refusal_event_interval,
        )

    async def start(self) -> list[int]:
        """Listen; returns the bound ports (useful with port 0)."""
        # telnetlib3 logs every connection at INFO and attacker-made protocol errors with
        # tracebacks at WARNING; the sessions' own events and log lines cover both.
        logging.getLogger("telnetlib3").setLevel(logging.ERROR)
        loop = asyncio.get_running_loop()
        config = self._shared.config
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

    async def stop(self) -> None:
        """Stop listening, close every session and wait for their last events."""
        for server in self._servers:
            server.close()
        for session in list(self.sessions):
            session.close("sensor shutting down")
        await self._shared.admission.drain()
        for server in self._servers:
            await server.wait_closed()

    def _accept(
        self, protocol: TelnetdProtocol, transport: asyncio.Transport
    ) -> TelnetSession | None:
        """Admit a new TCP connection, or refuse it (and say so, at a bounded rate)."""
        shared = self._shared
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        reason = shared.admission.admit(peer[0], spool_near_full=shared.events.spool.near_full)
        if reason is None:
            return TelnetSession(shared, transport, peer[:2], local[:2], self.sessions)
        self._refusals.refused(peer[0], reason)
        return None
