"""The SSH frontend: listening sockets, admission to the SSH pool, and refusals."""

from __future__ import annotations

import asyncio

from honeyfleet.events import plain_ip
from sensor.session.refusals import RefusalReporter
from sensor.ssh.connection import AttackerConnection, Shared
from sensor.ssh.pump import AttackerSide

# What OpenSSH 9.2's sshd writes before it closes a connection past MaxStartups.
REFUSAL_TEXT = b"Exceeded MaxStartups\r\n"


class SshFrontend:
    """Accepts attackers on every ``ssh_listen`` address."""

    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        services = shared.services
        self._servers: list[asyncio.Server] = []
        self._refusals = RefusalReporter(
            services.events,
            sensor=services.sensor,
            protocol="ssh",
            interval=services.config.refusal_event_interval,
            text=REFUSAL_TEXT,
        )

    async def start(self) -> list[int]:
        """Listen; returns the bound ports (useful with port 0)."""
        loop = asyncio.get_running_loop()
        ports = []
        for listen in self._shared.services.config.ssh_listen:
            host, _, port = listen.rpartition(":")
            server = await loop.create_server(
                lambda: AttackerSide(self._accept), host.strip("[]"), int(port)
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
        self, side: AttackerSide, transport: asyncio.Transport
    ) -> AttackerConnection | None:
        """Admit a new TCP connection, or refuse it as OpenSSH does (and say so, rarely)."""
        services = self._shared.services
        peer = transport.get_extra_info("peername")
        peer = (plain_ip(peer[0]), peer[1])
        local = transport.get_extra_info("sockname")
        slot = services.admission.admit(
            "ssh", peer[0], spool_near_full=services.events.spool.near_full
        )
        if isinstance(slot, str):
            self._refusals.refuse(transport, peer[0], slot)
            return None
        return AttackerConnection(self._shared, side, slot, peer, local[:2])
