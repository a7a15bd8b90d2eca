"""The client side of TunnelService: SSH sessions on one stream per pool node, and a
guest's port as a socket.

:meth:`TunnelConnector.open_session` opens an SSH session channel the pool node runs on
its warm login into the lease's guest (the sensor's end of one is
:mod:`sensor.ssh.guest`). Every session the sensor holds on a pool node goes on one
long-lived ``Sessions`` stream, :class:`SessionMux`: one gRPC call costs about 22 KB
held (gRPC's core, the HTTP/2 stream and grpc.aio's objects), which a call per session
would pay for each held shell. Frames name their session; each session has credit
windows of its own both ways, and the stream's writer takes one frame from each session
with something to send in turn, so no session holds up another. A session's errors end
that session; a stream that breaks ends all of its sessions, as a lost guest does.

:meth:`TunnelConnector.open` opens a byte tunnel (Telnet): the pool node relays bytes
over a gRPC stream. asyncssh's client wants a socket, so each tunnel is a socketpair:
asyncssh runs on one end, two pumps move bytes between the other end and the stream.
Flow control is end to end: a pump awaits each gRPC write and each socket drain, so
neither side queues more than one chunk. Each direction half-closes on its own
(``eof`` frame one way, ``shutdown(SHUT_WR)`` the other).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol

import grpc

from honeyfleet.errors import FailedPrecondition, Unavailable
from honeyfleet.grpcserver import FLOW_CONTROL_OPTIONS
from honeyfleet.pki.errors import PkiError
from honeyfleet.pki.identity import Role, identity_from_certificate
from honeyfleet.sessionwire import serialize
from honeyfleet.tls import NO_RETRY_STATE, ChannelCache, Peer, TlsFiles, presented_certificate
from honeyfleet.v1 import common_pb2, poolnode_pb2, poolnode_pb2_grpc
from sensor.leases import GuestLease

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
TunnelCall = grpc.aio.StreamStreamCall[poolnode_pb2.TunnelRequest, poolnode_pb2.TunnelResponse]
SessionsCall = grpc.aio.StreamStreamCall[
    poolnode_pb2.SessionsRequest | bytes, poolnode_pb2.SessionsResponse
]
SESSIONS_METHOD = "/honeyfleet.v1.TunnelService/Sessions"
# Sessions one stream carries at most (the pool node's bound: poolnode.sessions).
MAX_SESSIONS = 1000


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
        # Long-lived streams: no per-call retry state (honeyfleet.tls). The node's
        # output comes in frames of up to 256 KiB, and with BDP probing each one made
        # the sensor send an HTTP/2 PING the node had to read and answer (as on the
        # fleet's servers, honeyfleet.grpcserver): the window is fixed instead, at
        # 4 MB, which is what a session's output credit (sensor.ssh.guest.WINDOW)
        # allows in flight anyway.
        self.channels = ChannelCache(tls, NO_RETRY_STATE + FLOW_CONTROL_OPTIONS)
        # The stream new sessions go on, per pool node; and every stream still open.
        self._muxes: dict[tuple[str, str], SessionMux] = {}
        self._all_muxes: set[SessionMux] = set()
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

        A change makes every node be looked at again, on new channels and streams
        (tunnels and sessions already open stay up: the controller fails a revoked
        node's leases).
        """
        if serials == self._revoked:
            return
        self._revoked = serials
        self._serials.clear()
        self.channels.retire()
        muxes, self._muxes = self._muxes, {}
        for mux in muxes.values():
            mux.retire()

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
        self,
        lease: GuestLease,
        wait: float,
        request: poolnode_pb2.SessionOpen,
        session: MuxSession,
    ) -> int:
        """Open ``session`` on the lease's guest within ``wait``, on the stream that
        carries this sensor's sessions on the lease's pool node; returns the bytes of
        input the node takes before it grants more.

        Raises SessionRefused when the guest refuses the channel, TunnelFailed otherwise.
        """
        await self.check(lease)
        key = (lease.pool_node_address, lease.pool_node)
        mux = self._muxes.get(key)
        if mux is None or not mux.takes_sessions():
            if mux is not None:
                mux.retire()
            channel = self.channels.get(key[0], Peer(Role.POOLNODE, lease.pool_node))
            call: SessionsCall = channel.stream_stream(
                SESSIONS_METHOD,
                # Data frames come encoded already (honeyfleet.sessionwire).
                request_serializer=serialize,
                response_deserializer=poolnode_pb2.SessionsResponse.FromString,
            )(None)
            mux = self._muxes[key] = SessionMux(call, *key, self._mux_gone)
            self._all_muxes.add(mux)
        return await mux.open(session, request, wait)

    def _mux_gone(self, mux: SessionMux) -> None:
        """A sessions stream ended (it broke, or it was retired and its last session went)."""
        self._all_muxes.discard(mux)
        if self._muxes.get((mux.address, mux.node)) is mux:
            del self._muxes[(mux.address, mux.node)]

    async def close(self) -> None:
        """Close every sessions stream and every channel."""
        for mux in list(self._all_muxes):
            mux.cancel()
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


class MuxSession(Protocol):
    """A session on a :class:`SessionMux` (the sensor's end: sensor.ssh.guest)."""

    session_id: int
    scheduled: bool
    """In the stream's queue of sessions with frames to send."""

    def opened(self, mux: SessionMux, window: int) -> None:
        """The node opened the session; it takes ``window`` bytes of input for now."""

    def has_frames(self) -> bool:
        """Whether frames wait for the stream."""

    def next_frame(self) -> poolnode_pb2.SessionsRequest | bytes:
        """The next frame for the stream, a message or one encoded already (only asked
        for while :meth:`has_frames`)."""

    def frame_received(self, frame: poolnode_pb2.SessionsResponse) -> None:
        """A frame of the node's for this session."""

    def stream_lost(self, reason: str) -> None:
        """The stream broke: the session is over."""


class SessionMux:
    """The sensor's end of one ``Sessions`` stream to a pool node: the sessions on it.

    Sessions are taken until the stream is retired (the connector's certificates or
    revocations changed, or it holds MAX_SESSIONS); a retired stream half-closes once its
    last session has ended. :attr:`broken` says why it broke.
    """

    def __init__(
        self, call: SessionsCall, address: str, node: str, on_gone: Callable[[SessionMux], None]
    ) -> None:
        self.address = address
        self.node = node
        self.broken: str | None = None
        self._call = call
        self._on_gone = on_gone
        self._sessions: dict[int, MuxSession] = {}
        # Sessions waiting for the node's answer to their open frame.
        self._opening: dict[int, tuple[MuxSession, asyncio.Future[int]]] = {}
        self._last_id = 0
        self._retired = False
        # Frames of no session's (opens, closes of abandoned opens), sent first.
        self._control: deque[poolnode_pb2.SessionsRequest] = deque()
        # Sessions with frames to send, each once, taken in turn.
        self._ready: deque[MuxSession] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._writer = asyncio.create_task(self._write_loop())
        self._reader = asyncio.create_task(self._read_loop())

    def takes_sessions(self) -> bool:
        """Whether new sessions may go on this stream."""
        return (
            not self._retired
            and self.broken is None
            and len(self._sessions) + len(self._opening) < MAX_SESSIONS
        )

    async def open(
        self, session: MuxSession, request: poolnode_pb2.SessionOpen, wait: float
    ) -> int:
        """Open ``session`` within ``wait``; the node's input window (see
        TunnelConnector.open_session)."""
        self._last_id += 1
        session_id = session.session_id = self._last_id
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._opening[session_id] = (session, answer)
        self._send(poolnode_pb2.SessionsRequest(session_id=session_id, open=request))
        try:
            async with asyncio.timeout(wait):
                return await answer
        except TimeoutError:
            self._abandon(session_id)
            raise TunnelFailed(
                f"pool node {self.address} did not open a session in {wait:.0f}s"
            ) from None
        except asyncio.CancelledError:
            self._abandon(session_id)  # the attacker's channel closed while it opened
            raise

    def _abandon(self, session_id: int) -> None:
        """The opener gave up: close the session, whether or not it opened yet."""
        self._opening.pop(session_id, None)
        self._sessions.pop(session_id, None)
        if self.broken is None:
            self._send(
                poolnode_pb2.SessionsRequest(
                    session_id=session_id, close=poolnode_pb2.SessionClose()
                )
            )
        self._maybe_idle()

    def schedule(self, session: MuxSession) -> None:
        """``session`` has frames to send."""
        if not session.scheduled:
            session.scheduled = True
            self._ready.append(session)
            self._wake()

    def forget(self, session: MuxSession) -> None:
        """``session`` ended (frames for it are dropped from now on)."""
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
            self._maybe_idle()

    def retire(self) -> None:
        """Take no more sessions; half-close once the last one has ended."""
        self._retired = True
        self._maybe_idle()

    def cancel(self) -> None:
        """End the stream now (the sensor is stopping)."""
        self._call.cancel()

    def _send(self, frame: poolnode_pb2.SessionsRequest) -> None:
        self._control.append(frame)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _maybe_idle(self) -> None:
        """A retired stream without sessions half-closes (the node then ends it)."""
        if self._retired and not self._sessions and not self._opening:
            self._wake()

    async def _write_loop(self) -> None:
        """Frames to the node: control frames first, then sessions' frames in turn."""
        call, control, ready = self._call, self._control, self._ready
        frame: poolnode_pb2.SessionsRequest | bytes
        try:
            while True:
                if control:
                    frame = control.popleft()
                elif ready:
                    session = ready.popleft()
                    if not session.has_frames():
                        session.scheduled = False
                        continue
                    frame = session.next_frame()
                    if session.has_frames():
                        ready.append(session)
                    else:
                        session.scheduled = False
                elif self._retired and not self._sessions and not self._opening:
                    await call.done_writing()
                    return
                else:
                    self._wakeup = asyncio.get_running_loop().create_future()
                    await self._wakeup
                    self._wakeup = None
                    continue
                await call.write(frame)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the stream ended: the reader says why

    async def _read_loop(self) -> None:
        """The node's frames to their sessions, until the stream ends."""
        reason = f"pool node {self.address} ended the sessions stream"
        sessions, opening = self._sessions, self._opening
        try:
            while isinstance(frame := await self._call.read(), poolnode_pb2.SessionsResponse):
                session = sessions.get(frame.session_id)
                if session is not None:
                    session.frame_received(frame)
                elif (waiting := opening.pop(frame.session_id, None)) is not None:
                    self._answered(frame, *waiting)
        except grpc.aio.AioRpcError as e:
            reason = f"tunnel broke: {e.code().name}: {e.details() or ''}"
        finally:
            self._writer.cancel()
            self._lost(reason)

    def _answered(
        self,
        frame: poolnode_pb2.SessionsResponse,
        session: MuxSession,
        answer: asyncio.Future[int],
    ) -> None:
        """The node's answer to an open frame."""
        if frame.WhichOneof("frame") == "opened":
            self._sessions[frame.session_id] = session
            session.opened(self, frame.opened.window)
            if not answer.done():
                answer.set_result(frame.opened.window)
            return
        error = frame.closed.error
        code = poolnode_pb2.SessionErrorCode.Name(error.code).removeprefix("SESSION_ERROR_CODE_")
        if error.code == poolnode_pb2.SESSION_ERROR_CODE_FAILED_PRECONDITION:
            failure: Exception = SessionRefused(error.message or "the guest refused the channel")
        else:
            failure = TunnelFailed(f"pool node {self.address}: {code}: {error.message}")
        if not answer.done():
            answer.set_exception(failure)
        self._maybe_idle()

    def _lost(self, reason: str) -> None:
        """The stream ended: so did every session on it."""
        self.broken = reason
        opening, self._opening = self._opening, {}
        for _, answer in opening.values():
            if not answer.done():
                answer.set_exception(TunnelFailed(reason))
        sessions, self._sessions = self._sessions, {}
        if sessions and not self._retired:
            log.warning("%s (%d sessions)", reason, len(sessions))
        for session in sessions.values():
            session.stream_lost(reason)
        self._on_gone(self)
