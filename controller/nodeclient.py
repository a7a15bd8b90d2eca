"""How the controller asks pool nodes for guests: on a node's heartbeat stream if it
takes allocations there, else in an mTLS AllocateGuest call (one channel per node).

On the stream an allocation costs one message each way instead of a call; the node
answers it as soon as it is made, and the answer is matched by lease id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from honeyfleet.errors import RPCError
from honeyfleet.pki.identity import Role
from honeyfleet.tls import ChannelCache, Peer, TlsFiles
from honeyfleet.v1 import poolnode_pb2, poolnode_pb2_grpc, registry_pb2

log = logging.getLogger(__name__)

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(eq=False)
class _Stream:
    """One node's heartbeat stream, as far as allocations go."""

    # Called when the outbox gains its first request: the stream sends it.
    wake: Callable[[], None]
    outbox: list[poolnode_pb2.AllocateGuestRequest] = field(default_factory=list)
    answers: dict[str, asyncio.Future[registry_pb2.AllocationAnswer]] = field(default_factory=dict)


class NodeClients:
    """Asks pool nodes for guests, and wraps failures as RPCError.

    Every handshake of a call checks that the server is the pool node the controller
    means, by the name it registered under: a node's address is what the node itself
    reported, so a role check alone would let any pool node (or whoever took over its
    address) answer for another one, be handed its leases' guests and their sensors.
    A heartbeat stream is the node's own (its certificate names it).
    """

    def __init__(self, tls: TlsFiles, *, timeout: float) -> None:
        self._timeout = timeout
        self.channels = ChannelCache(tls)
        self._streams: dict[str, _Stream] = {}

    def _stub(self, node: str, address: str) -> poolnode_pb2_grpc.PoolNodeServiceAsyncStub:
        # Revocation needs no check here: the controller refuses revoked nodes'
        # heartbeats, so a node it knows holds a live certificate.
        channel = self.channels.get(address, Peer(Role.POOLNODE, node))
        return poolnode_pb2_grpc.PoolNodeServiceStub(channel)

    async def allocate(
        self, node: str, address: str, request: poolnode_pb2.AllocateGuestRequest
    ) -> poolnode_pb2.AllocateGuestResponse:
        """Ask pool node ``node`` at ``address`` for a guest; RPCError carries its status."""
        stream = self._streams.get(node)
        if stream is not None:
            return await self._on_stream(stream, request)
        try:
            response = await self._stub(node, address).AllocateGuest(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise RPCError.wrap("AllocateGuest", e) from None
        return response

    async def _on_stream(
        self, stream: _Stream, request: poolnode_pb2.AllocateGuestRequest
    ) -> poolnode_pb2.AllocateGuestResponse:
        answer: asyncio.Future[registry_pb2.AllocationAnswer]
        answer = asyncio.get_running_loop().create_future()
        stream.answers[request.lease_id] = answer
        stream.outbox.append(request)
        if len(stream.outbox) == 1:
            stream.wake()
        try:
            async with asyncio.timeout(self._timeout):
                result = await answer
        except TimeoutError:
            raise RPCError(
                "AllocateGuest",
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer on the node's heartbeat stream within {self._timeout:.0f}s",
            ) from None
        finally:
            stream.answers.pop(request.lease_id, None)
            # Not sent yet (its caller left): the node never hears of it.
            stream.outbox = [r for r in stream.outbox if r is not request]
        if result.status_code:
            code = STATUS_CODES.get(result.status_code, grpc.StatusCode.UNKNOWN)
            raise RPCError("AllocateGuest", code, result.status_message)
        return result.granted

    @contextlib.contextmanager
    def stream(self, node: str, wake: Callable[[], None]) -> Iterator[None]:
        """Ask ``node`` for guests on its heartbeat stream while it lasts.

        ``wake`` is called when requests wait to be sent (see take_requests).
        """
        stream = _Stream(wake)
        self._streams[node] = stream
        try:
            yield
        finally:
            if self._streams.get(node) is stream:
                del self._streams[node]
            for answer in stream.answers.values():
                if not answer.done():
                    answer.set_exception(
                        RPCError(
                            "AllocateGuest",
                            grpc.StatusCode.UNAVAILABLE,
                            "the node's heartbeat stream ended before it answered",
                        )
                    )

    def take_requests(self, node: str) -> list[poolnode_pb2.AllocateGuestRequest]:
        """The allocations to send to ``node`` now."""
        stream = self._streams.get(node)
        if stream is None or not stream.outbox:
            return []
        requests, stream.outbox = stream.outbox, []
        return requests

    def answered(self, node: str, answers: Iterable[registry_pb2.AllocationAnswer]) -> None:
        """Hand a node's answers to the allocations waiting for them (late ones are dropped:
        the node's next table reports such a lease as stale)."""
        stream = self._streams.get(node)
        for answer in answers:
            waiting = stream.answers.get(answer.lease_id) if stream is not None else None
            if waiting is not None and not waiting.done():
                waiting.set_result(answer)

    async def close(self) -> None:
        """Close every channel."""
        await self.channels.close()
