"""The SSH login into a leased guest, on the guest link's tunnel.

The guest's credentials come with the lease and go only into asyncssh's client.
"""

from __future__ import annotations

import asyncio

import asyncssh

from honeyfleet.v1 import common_pb2
from sensor.session.guest import GuestFailed, GuestLink


async def log_into_guest(link: GuestLink, wait: float) -> asyncssh.SSHClientConnection:
    """Open the tunnel and log into the guest; the link closes and watches the login.

    Raises GuestFailed (asyncssh's errors), TunnelFailed or OSError; the caller bounds
    the time.
    """
    lease = link.lease
    assert lease is not None
    tunnel = await link.open_tunnel(wait, common_pb2.GUEST_PORT_SSH)
    try:
        conn = await asyncssh.run_client(
            tunnel.sock,
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
    except asyncssh.Error as e:
        raise GuestFailed(str(e) or type(e).__name__) from None
    link.hold(asyncio.create_task(_watch(link, conn)), conn.close)
    return conn


async def _watch(link: GuestLink, conn: asyncssh.SSHClientConnection) -> None:
    """A guest (or tunnel) that goes away ends the session, saying so."""
    await conn.wait_closed()
    link.lost("the guest closed the connection", report=True)
