"""The Telnet frontend: each admitted connection becomes a :class:`TelnetSession`."""

from __future__ import annotations

import asyncio
import logging

from sensor.session.core import Services
from sensor.session.frontend import Frontend
from sensor.telnet.server import TelnetdProtocol
from sensor.telnet.session import TelnetSession


class TelnetFrontend(Frontend):
    """Accepts attackers on every ``telnet_listen`` address."""

    def __init__(self, services: Services) -> None:
        # A telnetd behind tcpd says nothing when it refuses: the connection just closes (FIN).
        super().__init__(services, "telnet", services.config.telnet_listen, refusal_text=b"")

    async def start(self) -> list[int]:
        """Listen; returns the bound ports (useful with port 0)."""
        # telnetlib3 logs every connection at INFO and attacker-made protocol errors with
        # tracebacks at WARNING; the sessions' own events and log lines cover both.
        logging.getLogger("telnetlib3").setLevel(logging.ERROR)
        return await super().start()

    def connection_protocol(self) -> asyncio.Protocol:
        """telnetlib3's server protocol, negotiating like a Linux telnetd."""
        return TelnetdProtocol(self._accept, self._services.config.write_buffer_high)

    def _accept(
        self, protocol: TelnetdProtocol, transport: asyncio.Transport
    ) -> TelnetSession | None:
        """Admit a new TCP connection, or refuse it with a plain close."""
        admitted = self.admit(transport)
        if admitted is None:
            return None
        return TelnetSession(self._services, transport, *admitted)
