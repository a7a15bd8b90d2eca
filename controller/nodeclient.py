"""mTLS clients for the pool nodes' PoolNodeService, one channel per node address."""

from __future__ import annotations

import logging

import grpc

from honeyfleet.errors import RPCError
from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import poolnode_pb2, poolnode_pb2_grpc

log = logging.getLogger(__name__)


class NodeClients:
    """Keeps one channel per pool-node address and wraps transport errors."""

    def __init__(self, tls: TlsFiles, *, timeout: float) -> None:
        self._tls = tls
        self._timeout = timeout
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> poolnode_pb2_grpc.PoolNodeServiceAsyncStub:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = secure_channel(address, self._tls)
        return poolnode_pb2_grpc.PoolNodeServiceStub(channel)

    async def allocate(
        self, address: str, request: poolnode_pb2.AllocateGuestRequest
    ) -> poolnode_pb2.AllocateGuestResponse:
        """Ask a node for a guest; RPCError carries the node's status."""
        try:
            response = await self._stub(address).AllocateGuest(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise RPCError.wrap("AllocateGuest", e) from None
        return response

    async def release(self, address: str, lease_id: str, reason: str) -> None:
        """Tell a node a lease ended; RPCError if the node cannot be told now."""
        request = poolnode_pb2.ReleaseGuestRequest(lease_id=lease_id, reason=reason)
        try:
            await self._stub(address).ReleaseGuest(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise RPCError.wrap("ReleaseGuest", e) from None

    async def close(self) -> None:
        """Close every channel."""
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
