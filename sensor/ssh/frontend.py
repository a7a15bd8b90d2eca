"""The SSH frontend: each admitted connection becomes an :class:`AttackerConnection`."""

from __future__ import annotations

import asyncio
import logging

import asyncssh

from sensor.session.frontend import Frontend
from sensor.ssh.connection import AttackerConnection, Shared
from sensor.ssh.pump import AttackerSide


class SshFrontend(Frontend):
    """Accepts attackers on every ``ssh_listen`` address."""

    def __init__(self, shared: Shared) -> None:
        services = shared.services
        config = services.config
        # What sshd writes before it closes a connection past MaxStartups.
        refusal = config.persona.max_startups_refusal
        super().__init__(services, "ssh", config.ssh_listen, refusal_text=refusal)
        self._shared = shared

    async def start(self) -> list[int]:
        """Listen; returns the bound ports (useful with port 0)."""
        # asyncssh logs at INFO, unbounded, what clients name (usernames, a forward's
        # originator of up to a packet, commands), for every request; the sessions'
        # events keep all of it with bounded fields. asyncssh logs nothing above INFO.
        asyncssh.set_log_level(logging.WARNING)
        return await super().start()

    def connection_protocol(self) -> asyncio.Protocol:
        """The byte pump's attacker side."""
        return AttackerSide(self._accept)

    def _accept(
        self, side: AttackerSide, transport: asyncio.Transport
    ) -> AttackerConnection | None:
        """Admit a new TCP connection, or refuse it as OpenSSH does."""
        admitted = self.admit(transport)
        if admitted is None:
            return None
        return AttackerConnection(self._shared, side, *admitted)
