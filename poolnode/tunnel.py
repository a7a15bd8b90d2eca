"""TunnelService: a sensor's SSH sessions and byte tunnels into its leased guests.

``Session`` runs one SSH session channel on the guest's warm login
(:mod:`poolnode.sessions`). ``Tunnel`` relays a byte stream to a guest's Telnet (or SSH)
port; its flow control comes from awaiting each write (gRPC's window on one side, TCP's
drain on the other); each direction half-closes with an ``eof`` frame.
Guest ports are never exposed: only this node reaches the pool network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import asyncssh

from honeyfleet.authz import current_caller
from honeyfleet.errors import InvalidArgument, Unavailable
from honeyfleet.v1 import common_pb2, poolnode_pb2, poolnode_pb2_grpc
from poolnode.pool import GuestPool
from poolnode.sessions import SessionRelay

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
OPEN_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
# How long a session's stream stays for the sensor's half-close after the last frame.
HALF_CLOSE_WAIT = 10.0
PORTS = (common_pb2.GUEST_PORT_SSH, common_pb2.GUEST_PORT_TELNET)


class TunnelServicer(poolnode_pb2_grpc.TunnelServiceServicer):
    """Tunnels for sensors, each into a guest leased to that very sensor."""

    def __init__(self, pool: GuestPool) -> None:
        self._pool = pool

    async def Tunnel(
        self, request_iterator: AsyncIterator[poolnode_pb2.TunnelRequest], context: Any
    ) -> AsyncIterator[poolnode_pb2.TunnelResponse]:
        """Open the guest connection named by the first frame, then relay both ways."""
        sensor = str(current_caller().identity)
        requests = aiter(request_iterator)
        first = await _first_frame(requests, "a tunnel")
        if first.open.port not in PORTS:
            raise InvalidArgument("a tunnel must start with an open frame naming SSH or Telnet")
        lease_id = first.open.lease_id
        host, port = self._pool.tunnel_target(lease_id, sensor, first.open.port)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(host, port, limit=CHUNK)
        except (OSError, TimeoutError) as e:
            raise Unavailable(f"guest at {host}:{port} does not answer: {e}") from None
        untrack = self._pool.track_tunnel(lease_id, writer)
        upstream = asyncio.create_task(self._upstream(requests, writer))
        log.info("tunnel for lease %s (%s) to %s:%d opened", lease_id, sensor, host, port)
        metrics = self._pool.metrics.tunnel_bytes.labels("to_sensor")
        try:
            yield poolnode_pb2.TunnelResponse(opened=poolnode_pb2.TunnelOpened(guest=host))
            while True:
                try:
                    data = await reader.read(CHUNK)
                except OSError:
                    break
                if not data:
                    break
                metrics.inc(len(data))
                yield poolnode_pb2.TunnelResponse(data=data)
            yield poolnode_pb2.TunnelResponse(eof=poolnode_pb2.TunnelEof())
            if not writer.is_closing():
                # Half-close: the guest is done, the sensor may still be sending.
                await upstream
        finally:
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await upstream
            untrack()
            writer.close()
            log.info("tunnel for lease %s closed", lease_id)

    async def Session(
        self, request_iterator: AsyncIterator[poolnode_pb2.SessionRequest], context: Any
    ) -> AsyncIterator[poolnode_pb2.SessionResponse]:
        """Open the session channel the first frame names, then relay frames both ways."""
        sensor = str(current_caller().identity)
        requests = aiter(request_iterator)
        first = await _first_frame(requests, "a session")
        lease_id = first.open.lease_id
        login = self._pool.session_login(lease_id, sensor)
        relay = SessionRelay(f"{lease_id}/{login.guest}")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                host = await login.room()
        except (asyncssh.Error, OSError, TimeoutError) as e:
            raise Unavailable(f"guest {login.guest} took no further login: {e}") from None
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await relay.open(host.conn, first.open)
            untrack = self._pool.track_tunnel(lease_id, relay)
        except TimeoutError:
            host.release()
            raise Unavailable(f"guest {login.guest} did not open a session channel") from None
        except BaseException:
            host.release()
            raise
        upstream = asyncio.create_task(relay.run_requests(requests))
        log.info("session for lease %s (%s) on guest %s opened", lease_id, sensor, login.guest)
        try:
            yield relay.opened()
            async for frame in relay.frames():
                yield frame
            if relay.error is not None:
                raise relay.error
            why = login.lost or host.lost
            lost = f"guest {login.guest} lost its SSH login: {why}" if why else ""
            yield poolnode_pb2.SessionResponse(closed=poolnode_pb2.SessionClosed(lost=lost))
            # Ending the call under a write of the sensor's would turn its status into
            # INTERNAL on the sensor's side (grpc/grpc#36066): wait for its half-close.
            await asyncio.wait({upstream}, timeout=HALF_CLOSE_WAIT)
        finally:
            upstream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upstream
            untrack()
            relay.close()
            host.release()
            metrics = self._pool.metrics.tunnel_bytes
            metrics.labels("to_guest").inc(relay.bytes_in)
            metrics.labels("to_sensor").inc(relay.bytes_out)
            log.info("session for lease %s closed", lease_id)

    async def _upstream(
        self, requests: AsyncIterator[poolnode_pb2.TunnelRequest], writer: asyncio.StreamWriter
    ) -> None:
        """Sensor -> guest, until the sensor's eof (half-close) or the stream ends."""
        metrics = self._pool.metrics.tunnel_bytes.labels("to_guest")
        try:
            async for request in requests:
                frame = request.WhichOneof("frame")
                if frame == "data":
                    writer.write(request.data)
                    metrics.inc(len(request.data))
                    await writer.drain()
                elif frame == "eof":
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                else:
                    log.warning("tunnel protocol error: unexpected %s frame", frame)
                    break
        except OSError:
            pass
        writer.close()


Frame = TypeVar("Frame", poolnode_pb2.TunnelRequest, poolnode_pb2.SessionRequest)


async def _first_frame(requests: AsyncIterator[Frame], what: str) -> Frame:
    """The first frame of a stream, which must be ``open`` and come within OPEN_TIMEOUT."""
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            first = await anext(requests)
    except (StopAsyncIteration, TimeoutError):
        raise InvalidArgument(f"{what} must start with an open frame") from None
    if first.WhichOneof("frame") != "open":
        raise InvalidArgument(f"{what} must start with an open frame")
    return first
