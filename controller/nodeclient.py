"""mTLS clients for the pool nodes' PoolNodeService, one channel per node and address."""

from __future__ import annotations

import logging

import grpc

from honeyfleet.errors import RPCError
from honeyfleet.pki.identity import Role
from honeyfleet.tls import ChannelCache, Peer, TlsFiles
from honeyfleet.v1 import poolnode_pb2, poolnode_pb2_grpc

log = logging.getLogger(__name__)


class NodeClients:
    """Keeps one channel per pool node and address, and wraps transport errors.

    Every handshake checks that the server is the pool node the controller means, by the
    name it registered under: a node's address is what the node itself reported, so a
    role check alone would let any pool node (or whoever took over its address) answer
    for another one, be handed its leases' guests and their sensors.
    """

    def __init__(self, tls: TlsFiles, *, timeout: float) -> None:
        self._timeout = timeout
        self.channels = ChannelCache(tls)

    def _stub(self, node: str, address: str) -> poolnode_pb2_grpc.PoolNodeServiceAsyncStub:
        # Revocation needs no check here: the controller refuses revoked nodes'
        # heartbeats, so a node it knows holds a live certificate.
        channel = self.channels.get(address, Peer(Role.POOLNODE, node))
        return poolnode_pb2_grpc.PoolNodeServiceStub(channel)

    async def allocate(
        self, node: str, address: str, request: poolnode_pb2.AllocateGuestRequest
    ) -> poolnode_pb2.AllocateGuestResponse:
        """Ask pool node ``node`` at ``address`` for a guest; RPCError carries its status."""
        try:
            response = await self._stub(node, address).AllocateGuest(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise RPCError.wrap("AllocateGuest", e) from None
        return response

    async def close(self) -> None:
        """Close every channel."""
        await self.channels.close()
