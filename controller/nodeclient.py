"""mTLS clients for the pool nodes' PoolNodeService, one channel per node address."""

from __future__ import annotations

import logging

import grpc

from honeyfleet.errors import RPCError
from honeyfleet.pki.identity import Role
from honeyfleet.tls import ChannelCache, Peer, TlsFiles
from honeyfleet.v1 import poolnode_pb2, poolnode_pb2_grpc

log = logging.getLogger(__name__)
POOL_NODE = Peer(Role.POOLNODE)


class NodeClients:
    """Keeps one channel per pool-node address and wraps transport errors."""

    def __init__(self, tls: TlsFiles, *, timeout: float) -> None:
        self._timeout = timeout
        self.channels = ChannelCache(tls)

    def _stub(self, address: str) -> poolnode_pb2_grpc.PoolNodeServiceAsyncStub:
        # Role only: the controller reaches nodes by address (it refuses revoked nodes'
        # heartbeats, so a node it knows holds a live certificate).
        return poolnode_pb2_grpc.PoolNodeServiceStub(self.channels.get(address, POOL_NODE))

    async def allocate(
        self, address: str, request: poolnode_pb2.AllocateGuestRequest
    ) -> poolnode_pb2.AllocateGuestResponse:
        """Ask a node for a guest; RPCError carries the node's status."""
        try:
            response = await self._stub(address).AllocateGuest(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise RPCError.wrap("AllocateGuest", e) from None
        return response

    async def release(self, address: str, lease_id: str, reason: str) -> int:
        """Tell a node a lease ended; returns the node's table version after it.

        RPCError if the node cannot be told now.
        """
        request = poolnode_pb2.ReleaseGuestRequest(lease_id=lease_id, reason=reason)
        try:
            response = await self._stub(address).ReleaseGuest(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise RPCError.wrap("ReleaseGuest", e) from None
        return response.table_version

    async def close(self) -> None:
        """Close every channel."""
        await self.channels.close()
