"""The guest behind one session: its lease (within the budget), its pool node and what runs there.

A lease is asked for only once the attacker's login deserves a guest, renewed while the
session lasts and released when it ends. The protocol adapter reaches the guest through
the lease's pool node (SSH: session streams on the node's own login into the guest;
Telnet: a byte tunnel, :meth:`GuestLink.open_tunnel`) and hands over what must be closed
and watched. Telnet leases carry the guest's credentials for the Telnet client, which
alone sees them: they are never logged, recorded or put into an event.

The link's moments are Cowrie's proxy events: ``cowrie.proxy.backend_connected`` when
the guest's pool node is reached, ``cowrie.proxy.backend_disconnected`` and
``cowrie.proxy.client_disconnect`` (naming the guest, as Cowrie's pool mode names its
VM) when it closes. The backend is the pool node's tunnel address: the guest's own is
never exposed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from honeyfleet.errors import HoneyfleetError
from honeyfleet.v1 import common_pb2
from sensor.events import SessionEvents
from sensor.leases import GuestLease, LeaseClient, LeaseFailed
from sensor.session.budget import LeaseBudget
from sensor.tunnel import Tunnel, TunnelConnector


class GuestFailed(HoneyfleetError):
    """The guest's login could not be opened (the adapter's client said why)."""


class GuestLink:
    """Lease, tunnel and guest client of one session; :meth:`drop` gives them all back."""

    __slots__ = (
        "_backend",
        "_budget",
        "_budgeted",
        "_closers",
        "_dropped",
        "_events",
        "_leases",
        "_on_lost",
        "_protocol",
        "_src_ip",
        "_tasks",
        "_tunnels",
        "lease",
        "tunnel",
    )

    def __init__(
        self,
        *,
        leases: LeaseClient,
        tunnels: TunnelConnector,
        budget: LeaseBudget,
        events: SessionEvents,
        src_ip: str,
        protocol: common_pb2.Protocol.ValueType,
        on_lost: Callable[[str], None],
    ) -> None:
        self._leases = leases
        self._tunnels = tunnels
        self._budget = budget
        self._events = events
        self._src_ip = src_ip
        self._protocol = protocol
        self._on_lost = on_lost
        self.lease: GuestLease | None = None
        self.tunnel: Tunnel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], None]] = []
        self._budgeted = False
        self._dropped = False
        # Cowrie's backend fields, once the tunnel is open.
        self._backend: dict[str, Any] | None = None

    async def acquire(self) -> GuestLease:
        """Lease a guest within the budget and keep renewing it; LeaseFailed if none."""
        if refusal := self._budget.take(self._src_ip):
            raise LeaseFailed(refusal)
        self._budgeted = True
        try:
            lease = await self._leases.acquire(
                self._src_ip, self._events.session, self._protocol, settled=self._give_budget
            )
        except asyncio.CancelledError:
            # The request outlives us until the controller answers (the lease client
            # releases a lease that arrives later); it counts in the budget until then,
            # or an attacker who hangs up while leasing could have any number pending.
            raise
        except BaseException:
            self._give_budget()
            raise
        self.lease = lease
        self._events.context.update(lease.context)
        self._closers.append(self._leases.keep(lease, self._lease_lost).cancel)
        return lease

    @property
    def tunnels(self) -> TunnelConnector:
        """How the pool nodes are reached."""
        return self._tunnels

    async def reach_node(self) -> None:
        """Check the lease's pool node (SSH sessions open on it later, one per channel)."""
        assert self.lease is not None
        await self._tunnels.check(self.lease)
        self._connected()

    async def open_tunnel(self, wait: float, port: common_pb2.GuestPort.ValueType) -> Tunnel:
        """A tunnel to the leased guest's ``port``."""
        assert self.lease is not None
        self.tunnel = await self._tunnels.open(self.lease, wait, port=port)
        self._connected()
        return self.tunnel

    def _connected(self) -> None:
        """The guest's pool node answered: Cowrie's backend_connected."""
        assert self.lease is not None
        host, _, number = self.lease.pool_node_address.rpartition(":")
        self._backend = {
            "backend_ip": host.strip("[]"),
            "backend_port": int(number) if number.isdigit() else 0,
        }
        self._events.emit(
            "cowrie.proxy.backend_connected",
            "Connected to honeypot backend {backend_ip}:{backend_port}",
            **self._backend,
        )

    def hold(
        self, task: asyncio.Task[None] | None, close: Callable[[], None] | None = None
    ) -> None:
        """A task of the guest's client (cancelled at drop) and how to close the client."""
        if task is not None:
            self._tasks.append(task)
        if close is not None:
            self._closers.append(close)

    def lost(self, reason: str, *, report: bool) -> None:
        """The guest (or the tunnel, or a session stream) went away under the session: end it.

        A broken tunnel is always an event; a guest that just closed only when ``report``
        (for Telnet that is an ordinary logout).
        """
        if self._dropped:
            return
        tunnel_error = self.tunnel.error if self.tunnel is not None else None
        reason = tunnel_error or reason
        if tunnel_error is not None or report:
            self._events.emit(
                "honeyfleet.guest.lost", "Guest connection lost: {reason}", reason=reason
            )
        self._on_lost(reason)

    async def drop(self, reason: str) -> None:
        """Close the guest's client and the tunnel, and release the lease (idempotent)."""
        self._dropped = True
        tunnel, self.tunnel = self.tunnel, None
        lease, self.lease = self.lease, None
        backend, self._backend = self._backend, None
        if backend is not None and lease is not None:
            self._events.emit(
                "cowrie.proxy.backend_disconnected",
                "Disconnected from honeypot backend {backend_ip}:{backend_port}",
                **backend,
            )
            self._events.emit(
                "cowrie.proxy.client_disconnect",
                "Lost connection with the pool backend: id {vm_id}",
                vm_id=lease.guest,
            )
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        closers, self._closers = self._closers, []
        for close in closers:
            close()
        try:
            if tunnel is not None:
                await tunnel.close()
        finally:
            if lease is not None:
                # Shielded: a session cancelled while releasing still gives the guest
                # back (the release is bounded by its own timeout).
                try:
                    await asyncio.shield(self._leases.release(lease, reason))
                finally:
                    self._give_budget()

    def _give_budget(self) -> None:
        """The lease counted in the budget is over (once)."""
        if self._budgeted:
            self._budgeted = False
            self._budget.give(self._src_ip)

    def _lease_lost(self, reason: str) -> None:
        """The controller ended the lease under the session."""
        self._events.emit("honeyfleet.lease.lost", "Lease ended: {reason}", reason=reason)
        self._on_lost(f"lease lost: {reason}")
