"""asyncssh's view of an attacker connection: the public ``SSHServer`` callbacks.

Every decision is delegated to the connection (:class:`Connection`, implemented by
:class:`sensor.ssh.connection.AttackerConnection`); this class only translates
asyncssh's callbacks into its calls.
"""

from __future__ import annotations

from typing import Protocol

import asyncssh

from sensor.events import SessionEvents
from sensor.ssh.channels import RefusedForward, RelaySession


class Connection(Protocol):
    """What asyncssh's callbacks are delegated to."""

    events: SessionEvents

    def ssh_started(self, conn: asyncssh.SSHServerConnection) -> None:
        """asyncssh's side started."""

    def close(self, reason: str) -> None:
        """End the connection."""

    async def login(self, username: str, password: str) -> bool:
        """Check a password (and join a guest)."""

    async def public_key(self, username: str, key: asyncssh.SSHKey) -> None:
        """Log an offered key (and refuse it)."""

    def session_channel(self) -> RelaySession | bool:
        """A session channel's relay, or False."""

    def direct_tcpip(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> RefusedForward | bool:
        """A direct-tcpip request's handler, or False."""


class AttackerServer(asyncssh.SSHServer):
    """asyncssh's callbacks for one connection, delegating to its :class:`Connection`;
    offering the persona's ``auth_methods``."""

    def __init__(self, connection: Connection, auth_methods: tuple[str, ...]) -> None:
        self._c = connection
        self._methods = auth_methods

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """asyncssh's side started: the connection can be told to disconnect from now on."""
        self._c.ssh_started(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncssh's side ended."""
        self._c.close(f"ssh: {exc}" if exc else "client logged out")

    def begin_auth(self, username: str) -> bool:
        """Every user must authenticate."""
        return True

    def password_auth_supported(self) -> bool:
        """Passwords are what we collect (if the persona offers them)."""
        return "password" in self._methods

    async def validate_password(self, username: str, password: str) -> bool:
        """Check against the userdb (and join a guest)."""
        return await self._c.login(username, password)

    def kbdint_auth_supported(self) -> bool:
        """Never (no persona offers it: Debian's sshd_config turns it off)."""
        return False

    def public_key_auth_supported(self) -> bool:
        """Offered so keys are logged; every key is refused."""
        return "publickey" in self._methods

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Log and refuse."""
        await self._c.public_key(username, key)
        return False

    def session_requested(self) -> RelaySession | bool:
        """A session channel, relayed to the guest."""
        return self._c.session_channel()

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> RefusedForward | bool:
        """direct-tcpip: logged, never forwarded."""
        return self._c.direct_tcpip(dest_host, dest_port, orig_host, orig_port)

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        """tcpip-forward: refused."""
        self._c.events.log.info("refused tcpip-forward %s:%d", listen_host[:64], listen_port)
        return False
