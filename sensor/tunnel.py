"""The client side of TunnelService: SSH session streams, and a guest's port as a socket.

:meth:`TunnelConnector.open_session` opens a ``Session`` stream: one SSH session channel
the pool node runs on its warm login into the guest (the sensor's end is
:mod:`sensor.ssh.guest`). :meth:`TunnelConnector.open` opens a byte tunnel (Telnet): the
pool node relays bytes over a gRPC stream. asyncssh's client wants a socket, so each
tunnel is a socketpair: asyncssh runs on one end, two pumps move bytes between the other
end and the stream. Flow control is end to end: a pump awaits each gRPC write and each
socket drain, so neither side queues more than one chunk. Each direction half-closes
on its own (``eof`` frame one way, ``shutdown(SHUT_WR)`` the other).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import grpc

from honeyfleet.errors import FailedPrecondition, Unavailable
from honeyfleet.pki.errors import PkiError
from honeyfleet.pki.identity import Role, identity_from_certificate
from honeyfleet.tls import NO_RETRY_STATE, ChannelCache, Peer, TlsFiles, presented_certificate
from honeyfleet.v1 import common_pb2, poolnode_pb2, poolnode_pb2_grpc
from sensor.leases import GuestLease

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
TunnelCall = grpc.aio.StreamStreamCall[poolnode_pb2.TunnelRequest, poolnode_pb2.TunnelResponse]
SessionCall = grpc.aio.StreamStreamCall[poolnode_pb2.SessionRequest, poolnode_pb2.SessionResponse]


class TunnelFailed(Unavailable):
    """The pool node could not open (or lost) the tunnel to a guest."""


class SessionRefused(FailedPrecondition):
    """The guest refused a session channel (the pool node said why)."""


class Tunnel:
    """An open tunnel: :attr:`sock` is the guest's port, :attr:`error` why it broke."""

    def __init__(
        self, sock: socket.socket, call: TunnelCall, pumps: list[asyncio.Task[None]]
    ) -> None:
        self.sock = sock
        self.error: str | None = None
        self._call = call
        self._pumps = pumps

    async def close(self) -> None:
        """Tear the tunnel down (both pumps, the stream)."""
        self._call.cancel()
        for pump in self._pumps:
            pump.cancel()
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump


class TunnelConnector:
    """Opens tunnels through pool nodes, one mTLS channel per node."""

    def __init__(self, tls: TlsFiles) -> None:
        # One Session stream per held SSH channel: no per-call retry state (honeyfleet.tls).
        self.channels = ChannelCache(tls, NO_RETRY_STATE)
        self._tls = tls
        self._revoked: frozenset[int] = frozenset()
        # The serial each pool node presented when its channel was made.
        self._serials: dict[tuple[str, str], int] = {}

    @property
    def revoked(self) -> frozenset[int]:
        """The revoked serials this connector refuses."""
        return self._revoked

    def update_revoked(self, serials: frozenset[int]) -> None:
        """Refuse pool nodes whose certificate is in ``serials`` from the next tunnel on.

        A change makes every node be looked at again, on new channels (tunnels already
        open stay up: the controller fails a revoked node's leases).
        """
        if serials == self._revoked:
            return
        self._revoked = serials
        self._serials.clear()
        self.channels.retire()

    async def check(self, lease: GuestLease) -> None:
        """Look at the certificate of the lease's pool node before its first stream."""
        address, node = lease.pool_node_address, lease.pool_node
        key = (address, node)
        if key not in self._serials:
            try:
                cert = await asyncio.to_thread(presented_certificate, address, self._tls, 10.0)
                identity = identity_from_certificate(cert)
            except (OSError, ValueError, PkiError) as e:
                raise TunnelFailed(f"pool node {address}: UNAVAILABLE: {e}") from None
            if identity.role != Role.POOLNODE or identity.name != node:
                raise TunnelFailed(
                    f"pool node {address}: UNAVAILABLE: presents {identity}, not poolnode/{node}"
                )
            self._serials[key] = cert.serial_number
        if self._serials[key] in self._revoked:
            raise TunnelFailed(
                f"pool node {node} at {address}: certificate {self._serials[key]:x} is revoked"
            )

    async def open(
        self,
        lease: GuestLease,
        wait: float,
        port: common_pb2.GuestPort.ValueType = common_pb2.GUEST_PORT_SSH,
    ) -> Tunnel:
        """A tunnel to a guest port of the lease (SSH unless told), opened within ``wait``."""
        address = lease.pool_node_address
        await self.check(lease)
        # Only the pool node the lease names may answer at that address.
        channel = self.channels.get(address, Peer(Role.POOLNODE, lease.pool_node))
        call: TunnelCall = poolnode_pb2_grpc.TunnelServiceStub(channel).Tunnel(None)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # cancellation of a session that closes just as the tunnel opens.
            async with asyncio.timeout(wait):
                opened = await _open(call, lease, port)
        except TimeoutError:
            call.cancel()
            raise TunnelFailed(
                f"pool node {address} did not open a tunnel in {wait:.0f}s"
            ) from None
        except grpc.aio.AioRpcError as e:
            raise TunnelFailed(
                f"pool node {address}: {e.code().name}: {e.details() or ''}"
            ) from None
        except asyncio.CancelledError:
            call.cancel()  # the session ended while the tunnel was opening
            raise
        if not opened:
            call.cancel()
            raise TunnelFailed(f"pool node {address} answered without opening the tunnel")
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours, limit=CHUNK)
        pumps: list[asyncio.Task[None]] = []
        tunnel = Tunnel(theirs, call, pumps)
        pumps.append(asyncio.create_task(_upstream(reader, call)))
        pumps.append(asyncio.create_task(_downstream(call, writer, tunnel)))
        return tunnel

    async def open_session(
        self, lease: GuestLease, wait: float, request: poolnode_pb2.SessionOpen
    ) -> tuple[SessionCall, int]:
        """A Session stream on the lease's guest, opened within ``wait``; returns the call
        and the bytes of input the node takes before it grants more.

        Raises SessionRefused when the guest refuses the channel, TunnelFailed otherwise.
        """
        address = lease.pool_node_address
        await self.check(lease)
        channel = self.channels.get(address, Peer(Role.POOLNODE, lease.pool_node))
        call: SessionCall = poolnode_pb2_grpc.TunnelServiceStub(channel).Session(None)
        try:
            async with asyncio.timeout(wait):
                await call.write(poolnode_pb2.SessionRequest(open=request))
                first = await call.read()
        except TimeoutError:
            call.cancel()
            raise TunnelFailed(
                f"pool node {address} did not open a session in {wait:.0f}s"
            ) from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise SessionRefused(e.details() or "the guest refused the channel") from None
            raise TunnelFailed(
                f"pool node {address}: {e.code().name}: {e.details() or ''}"
            ) from None
        except asyncio.CancelledError:
            call.cancel()  # the attacker's channel closed while the session opened
            raise
        if not isinstance(first, poolnode_pb2.SessionResponse) or not first.HasField("opened"):
            call.cancel()
            raise TunnelFailed(f"pool node {address} answered without opening the session")
        return call, first.opened.window

    async def close(self) -> None:
        """Close every channel."""
        await self.channels.close()


async def _open(call: TunnelCall, lease: GuestLease, port: common_pb2.GuestPort.ValueType) -> bool:
    """Send the open frame; whether the first answer is ``opened``."""
    await call.write(
        poolnode_pb2.TunnelRequest(open=poolnode_pb2.TunnelOpen(lease_id=lease.id, port=port))
    )
    first = await call.read()
    return isinstance(first, poolnode_pb2.TunnelResponse) and first.WhichOneof("frame") == "opened"


async def _upstream(reader: asyncio.StreamReader, call: TunnelCall) -> None:
    """Socket -> stream, then an eof frame (half-close).

    A stream that has already ended (the pool node went away) just ends this pump:
    the downstream pump is the one that reads the status and says why.
    """
    try:
        while data := await reader.read(CHUNK):
            await call.write(poolnode_pb2.TunnelRequest(data=data))
        await call.write(poolnode_pb2.TunnelRequest(eof=poolnode_pb2.TunnelEof()))
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return


async def _downstream(call: TunnelCall, writer: asyncio.StreamWriter, tunnel: Tunnel) -> None:
    """Stream -> socket; an eof frame half-closes, a broken stream closes and says why."""
    try:
        while isinstance(frame := await call.read(), poolnode_pb2.TunnelResponse):
            if frame.WhichOneof("frame") == "data":
                writer.write(frame.data)
                await writer.drain()
            elif frame.WhichOneof("frame") == "eof" and writer.can_write_eof():
                writer.write_eof()
    except grpc.aio.AioRpcError as e:
        tunnel.error = f"tunnel broke: {e.code().name}: {e.details() or ''}"
        log.warning("%s", tunnel.error)
    except OSError as e:
        tunnel.error = f"tunnel socket: {e}"
    finally:
        writer.close()
