"""The pool node's warm SSH login into each guest.

Once a guest answers, the pool node logs into it with the backend credentials (which
never leave the node) and keeps that connection open for as long as the guest lives.
Sensors' SSH sessions become channels on it, so no session pays a key exchange and a
login with the guest. The connection is also the guest's health check: keepalives go
over it, and a guest whose login is lost is unhealthy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import asyncssh

log = logging.getLogger(__name__)

# Unanswered keepalives (one every keepalive_interval) before the login counts as lost.
KEEPALIVE_COUNT_MAX = 3


@dataclass(frozen=True)
class LoginSettings:
    """How the node logs into its guests."""

    user: str
    """The guests' login account (backend_user)."""
    password: str
    """Its password (backend_pass)."""
    keepalive_interval: float
    """Seconds between keepalives on an idle login (the health_interval)."""


class LoginRefused(Exception):
    """The guest answered but refused the backend credentials: waiting will not help."""


class WarmLogin(asyncssh.SSHClient):
    """One guest's logged-in connection; :attr:`lost` says why it ended (None while up)."""

    def __init__(self, guest: str, on_lost: Callable[[], None]) -> None:
        self.guest = guest
        self.lost: str | None = None
        self._on_lost = on_lost
        self._conn: asyncssh.SSHClientConnection | None = None

    @property
    def conn(self) -> asyncssh.SSHClientConnection:
        """The connection (only asked for once logged in)."""
        assert self._conn is not None
        return self._conn

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        """asyncssh's callback: keep the connection."""
        self._conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        """asyncssh's callback: the guest (or the node) ended the connection."""
        self.lost = str(exc) if exc is not None else "the guest closed the connection"
        log.info("guest %s: warm login lost: %s", self.guest, self.lost)
        self._on_lost()

    def close(self) -> None:
        """Log out (the guest is going away)."""
        if self._conn is not None:
            self._conn.close()


async def log_in(
    guest: str, host: str, port: int, settings: LoginSettings, on_lost: Callable[[], None]
) -> WarmLogin:
    """Log into the guest at ``host:port``; ``on_lost`` is called if the login ends.

    Raises LoginRefused when the credentials are refused, asyncssh.Error or OSError when
    the guest does not (yet) complete a login; the caller bounds the time.
    """
    login = WarmLogin(guest, on_lost)
    try:
        await asyncssh.connect(
            host,
            port,
            client_factory=lambda: login,
            # Nothing of the node's own SSH set-up (config, agent, keys) may leak in.
            config=None,
            agent_path=None,
            client_keys=None,
            # Guests are the node's own VMs on its isolated network (or the operator's
            # static hosts): there is no one else to tell their host keys from.
            known_hosts=None,
            username=settings.user,
            password=settings.password,
            preferred_auth="password,keyboard-interactive",
            keepalive_interval=settings.keepalive_interval,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
        )
    except asyncssh.PermissionDenied as e:
        raise LoginRefused(
            f"the guest refused {settings.user!r} with backend_pass ({e.reason}): "
            "check backend_user and backend_pass"
        ) from None
    return login
