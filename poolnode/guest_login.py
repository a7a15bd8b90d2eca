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

from poolnode.batching import BatchingTunnel

log = logging.getLogger(__name__)

# Unanswered keepalives (one every keepalive_interval) before the login counts as lost.
KEEPALIVE_COUNT_MAX = 3
# Session channels at once on one login: below OpenSSH's MaxSessions (10 by default).
SESSIONS_PER_LOGIN = 8
# Preferred before asyncssh's defaults ("^": the rest stay for guests without these).
CHEAPEST_CIPHERS = "^aes128-gcm@openssh.com,aes256-gcm@openssh.com"


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
    """One guest's logged-in connection; :attr:`lost` says why it ended (None while up).

    Sessions run as channels on it, at most SESSIONS_PER_LOGIN at once: OpenSSH's sshd
    allows MaxSessions (10 by default) per connection. Past that, :meth:`room` logs in
    once more; such an extra login goes when its last session does, and losing it
    ends only its own sessions (the guest's health is the first login's).
    """

    def __init__(
        self, guest: str, target: tuple[str, int, LoginSettings], on_lost: Callable[[], None]
    ) -> None:
        self.guest = guest
        self.lost: str | None = None
        self.sessions = 0
        self._target = target
        self._on_lost = on_lost
        self._conn: asyncssh.SSHClientConnection | None = None
        self._extra: list[WarmLogin] = []
        self._primary = True

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
        """Log out (the guest is going away), extra logins too."""
        for extra in self._extra:
            extra.close()
        if self._conn is not None:
            self._conn.close()

    async def room(self) -> WarmLogin:
        """A login into this guest with room for one more session (counted until
        :meth:`release`): this one, an extra one, or a new extra one."""
        self._extra = [extra for extra in self._extra if extra.lost is None]
        login = next(
            (
                candidate
                for candidate in (self, *self._extra)
                if candidate.lost is None and candidate.sessions < SESSIONS_PER_LOGIN
            ),
            None,
        )
        if login is None:
            host, port, settings = self._target
            login = await log_in(self.guest, host, port, settings, lambda: None)
            login._primary = False
            self._extra.append(login)
            log.info("guest %s: %d sessions: one more login", self.guest, self.sessions)
        login.sessions += 1
        return login

    def release(self) -> None:
        """A session on this login ended; an extra login with none left logs out."""
        self.sessions -= 1
        if not self._primary and not self.sessions:
            self.close()


async def log_in(
    guest: str, host: str, port: int, settings: LoginSettings, on_lost: Callable[[], None]
) -> WarmLogin:
    """Log into the guest at ``host:port``; ``on_lost`` is called if the login ends.

    Raises LoginRefused when the credentials are refused, asyncssh.Error or OSError when
    the guest does not (yet) complete a login; the caller bounds the time.
    """
    login = WarmLogin(guest, (host, port, settings), on_lost)
    try:
        await asyncssh.connect(
            host,
            port,
            client_factory=lambda: login,
            # A plain TCP connection, but asyncssh's packets go out a turn's worth at
            # a time (poolnode.batching).
            tunnel=BatchingTunnel(),
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
            # Every session's bytes pass this link: AES-GCM costs asyncssh about 40% less
            # CPU than its default ChaCha20-Poly1305 (any other cipher still follows).
            encryption_algs=CHEAPEST_CIPHERS,
        )
    except asyncssh.PermissionDenied as e:
        raise LoginRefused(
            f"the guest refused {settings.user!r} with backend_pass ({e.reason}): "
            "check backend_user and backend_pass"
        ) from None
    return login
