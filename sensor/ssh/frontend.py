"""The SSH frontend: listening sockets, admission, and refusal events."""

from __future__ import annotations

import asyncio

from sensor.refusals import RefusalReporter
from sensor.ssh.connection import AttackerConnection, Shared
from sensor.ssh.pump import AttackerSide


class SshFrontend:
    """Accepts attackers on every ``ssh_listen`` address."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        self._servers: list[asyncio.Server] = []
        self._refusals = RefusalReporter(
            shared.events,
            sensor=shared.sensor,
            protocol="ssh",
            interval=shared.config.refusal_event_interval,
        )

    async def start(self) -> list[int]:
        """Listen; returns the bound ports (useful with port 0)."""
        loop = asyncio.get_running_loop()
        ports = []
        for listen in self._shared.config.ssh_listen:
            host, _, port = listen.rpartition(":")
            server = await loop.create_server(
                lambda: AttackerSide(self._accept), host.strip("[]"), int(port)
            )
            self._servers.append(server)
            ports.append(server.sockets[0].getsockname()[1])
        return ports

    async def stop(self) -> None:
        """Stop listening, close every connection and wait for their last events."""
        for server in self._servers:
            server.close()
        admission = self._shared.admission
        for connection in list(admission.connections):
            connection.close("sensor shutting down")
        await admission.drain()
        for server in self._servers:
            await server.wait_closed()

    def _accept(
        self, side: AttackerSide, transport: asyncio.Transport
    ) -> AttackerConnection | None:
        """Admit a new TCP connection, or refuse it (and say so, at a bounded rate)."""
        shared = self._shared
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        reason = shared.admission.admit(peer[0], spool_near_full=shared.events.spool.near_full)
        if reason is None:
            return AttackerConnection(shared, side, peer[:2], local[:2])
        self._refusals.refused(peer[0], reason)
        return None
