"""TunnelService: a sensor's SSH sessions and byte tunnels into its leased guests.

``Sessions`` runs a sensor's SSH session channels on the guests' warm logins, all on
one stream (:mod:`poolnode.sessions`). ``Tunnel`` relays a byte stream to a guest's Telnet (or SSH)
port; its flow control comes from awaiting each write (gRPC's window on one side, TCP's
drain on the other); each direction half-closes with an ``eof`` frame.
Guest ports are never exposed: only this node reaches the pool network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from honeyfleet.authz import current_caller
from honeyfleet.errors import InvalidArgument, Unavailable
from honeyfleet.sessionwire import serialize
from honeyfleet.v1 import common_pb2, poolnode_pb2
from poolnode.pool import GuestPool
from poolnode.sessions import SessionMux

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
OPEN_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
PORTS = (common_pb2.GUEST_PORT_SSH, common_pb2.GUEST_PORT_TELNET)
SERVICE = poolnode_pb2.DESCRIPTOR.services_by_name["TunnelService"].full_name


def add_tunnel_service(servicer: TunnelServicer, server: grpc.aio.Server) -> None:
    """Serve ``servicer`` on ``server``: the generated registration, except that the
    Sessions stream also sends frames encoded already (honeyfleet.sessionwire)."""
    handlers = {
        "Tunnel": grpc.stream_stream_rpc_method_handler(
            servicer.Tunnel,
            request_deserializer=poolnode_pb2.TunnelRequest.FromString,
            response_serializer=poolnode_pb2.TunnelResponse.SerializeToString,
        ),
        "Sessions": grpc.stream_stream_rpc_method_handler(
            servicer.Sessions,
            request_deserializer=poolnode_pb2.SessionsRequest.FromString,
            response_serializer=serialize,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class TunnelServicer:
    """Tunnels for sensors, each into a guest leased to that very sensor (served by
    :func:`add_tunnel_service`: ``Sessions`` yields encoded frames too, which the
    generated servicer's types do not allow)."""

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

    async def Sessions(
        self, request_iterator: AsyncIterator[poolnode_pb2.SessionsRequest], context: Any
    ) -> AsyncIterator[poolnode_pb2.SessionsResponse | bytes]:
        """Run the sensor's sessions the stream's frames open, relaying frames both ways."""
        sensor = str(current_caller().identity)
        mux = SessionMux(self._pool, sensor)
        reader = asyncio.create_task(mux.run_requests(request_iterator))
        log.info("sessions stream of %s opened", sensor)
        try:
            async for frame in mux.frames():
                yield frame
            if mux.error is not None:
                raise mux.error
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            await mux.close()
            log.info("sessions stream of %s closed", sensor)

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


async def _first_frame(
    requests: AsyncIterator[poolnode_pb2.TunnelRequest], what: str
) -> poolnode_pb2.TunnelRequest:
    """The first frame of a stream, which must be ``open`` and come within OPEN_TIMEOUT."""
    try:
        async with asyncio.timeout(OPEN_TIMEOUT):
            first = await anext(requests)
    except (StopAsyncIteration, TimeoutError):
        raise InvalidArgument(f"{what} must start with an open frame") from None
    if first.WhichOneof("frame") != "open":
        raise InvalidArgument(f"{what} must start with an open frame")
    return first
