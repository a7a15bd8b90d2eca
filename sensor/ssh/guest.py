"""The guest behind one attacker connection: its lease, its tunnel and the SSH login into it.

A lease is asked for only after the attacker logged in, renewed while the session lasts
and released when it ends. The guest's credentials come with the lease and go only into
asyncssh's client: they are never logged, recorded or put into an event.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncssh

from honeyfleet.v1 import common_pb2
from sensor.config import SensorConfig
from sensor.events import SessionEvents
from sensor.leases import GuestLease, LeaseClient
from sensor.tunnel import Tunnel, TunnelConnector


class GuestLink:
    """Lease, tunnel and guest login of one session; :meth:`drop` gives them all back."""

    def __init__(
        self,
        *,
        config: SensorConfig,
        leases: LeaseClient,
        tunnels: TunnelConnector,
        events: SessionEvents,
        src_ip: str,
        on_lost: Callable[[str], None],
    ) -> None:
        self._config = config
        self._leases = leases
        self._tunnels = tunnels
        self._events = events
        self._src_ip = src_ip
        self._on_lost = on_lost
        self.lease: GuestLease | None = None
        self.tunnel: Tunnel | None = None
        self.conn: asyncssh.SSHClientConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._dropped = False

    async def acquire(self) -> GuestLease:
        """Lease a guest and keep renewing it; LeaseFailed if there is none."""
        lease = await self._leases.acquire(
            self._src_ip, self._events.session, common_pb2.PROTOCOL_SSH
        )
        self.lease = lease
        self._events.context.update(lease.context)
        self._tasks.append(asyncio.create_task(self._leases.keep(lease, self._lease_lost)))
        return lease

    async def login(self) -> asyncssh.SSHClientConnection:
        """Open the tunnel and log into the guest within guest_login_timeout.

        Raises TunnelFailed, asyncssh.Error, OSError or TimeoutError.
        """
        assert self.lease is not None
        lease = self.lease
        wait = self._config.guest_login_timeout
        async with asyncio.timeout(wait):
            self.tunnel = await self._tunnels.open(lease, wait)
            self.conn = await asyncssh.run_client(
                self.tunnel.sock,
                config=None,
                # Over a socketpair there is no peer address to name the host by.
                host=lease.guest,
                username=lease.username,
                password=lease.password,
                known_hosts=None,
                client_keys=None,
                agent_path=None,
                preferred_auth="password,keyboard-interactive",
            )
        self._tasks.append(asyncio.create_task(self._watch(self.conn)))
        return self.conn

    async def drop(self, reason: str) -> None:
        """Close the guest login and the tunnel, and release the lease (idempotent)."""
        self._dropped = True
        conn, self.conn = self.conn, None
        tunnel, self.tunnel = self.tunnel, None
        lease, self.lease = self.lease, None
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if conn is not None:
            conn.close()
        try:
            if tunnel is not None:
                await tunnel.close()
        finally:
            if lease is not None:
                await self._leases.release(lease, reason)

    async def _watch(self, conn: asyncssh.SSHClientConnection) -> None:
        """A guest (or tunnel) that goes away ends the session, saying so."""
        await conn.wait_closed()
        if self._dropped:
            return
        tunnel_error = self.tunnel.error if self.tunnel is not None else None
        reason = tunnel_error or "the guest closed the connection"
        self._events.emit("honeyfleet.guest.lost", "Guest connection lost: {reason}", reason=reason)
        self._on_lost(reason)

    def _lease_lost(self, reason: str) -> None:
        """The controller ended the lease under the session."""
        self._events.emit("honeyfleet.lease.lost", "Lease ended: {reason}", reason=reason)
        self._on_lost(f"lease lost: {reason}")
