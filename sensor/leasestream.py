"""The sensor's end of LeaseService.Leases: lease calls as messages on one stream.

A controller takes new calls from gRPC one per turn of its event loop, so a fleet's
acquires and releases as calls of their own queue there under load; as messages on a
stream each sensor keeps open, they do not. Each call is sent with an id and its
timeout and answered under that id, in any order. A call fails as the same call of
its own would (``grpc.aio.AioRpcError`` with the controller's code, message and retry
hint), so callers handle both alike; a stream that breaks fails the calls it carried
with its status, and the next call opens a new stream. After a certificate renewal
new calls go over the new channel, and the old stream ends once it answered its own.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from honeyfleet.errors import RETRY_AFTER_TRAILER
from honeyfleet.v1 import lease_pb2, lease_pb2_grpc

CODES = {code.value[0]: code for code in grpc.StatusCode}


class _Stream:
    """One Leases stream: the calls it carries, the requests still to send."""

    def __init__(self, stub: lease_pb2_grpc.LeaseServiceAsyncStub) -> None:
        # None ends the requests (and so gRPC's task that sends them).
        self.outbox: asyncio.Queue[lease_pb2.LeasesRequest | None] = asyncio.Queue()
        self.waiting: dict[int, asyncio.Future[lease_pb2.LeasesResponse]] = {}
        self._call = stub.Leases(self._requests())
        self.task = asyncio.create_task(self._read())
        self._retiring = False

    async def _requests(self) -> AsyncIterator[lease_pb2.LeasesRequest]:
        while (request := await self.outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        """Hand each answer to its call; when the stream ends, fail the calls left."""
        try:
            async for answer in self._call:
                waiter = self.waiting.pop(answer.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
            error = _aio_error(grpc.StatusCode.UNAVAILABLE, "the controller ended the lease stream")
        except grpc.aio.AioRpcError as e:
            error = e
        except asyncio.CancelledError:
            error = _aio_error(grpc.StatusCode.CANCELLED, "the lease stream was closed")
        # Left waiting, gRPC's sending task would be destroyed pending with the stream.
        self.outbox.put_nowait(None)
        for waiter in self.waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
        self.waiting.clear()

    def close(self) -> None:
        """End the stream (the calls in flight fail with CANCELLED)."""
        self._call.cancel()
        self.task.cancel()

    def retire(self) -> None:
        """End the stream once the calls in flight on it are answered."""
        self._retiring = True
        self.done_with(None)

    def done_with(self, call_id: int | None) -> None:
        """Forget call ``call_id``; a retired stream with no call left ends."""
        if call_id is not None:
            self.waiting.pop(call_id, None)
        if self._retiring and not self.waiting:
            self.close()


class LeaseStream:
    """Acquire, renew and release as messages on one stream, opened when first needed."""

    def __init__(self, stub: lease_pb2_grpc.LeaseServiceAsyncStub) -> None:
        self._stub = stub
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None

    def use(self, stub: lease_pb2_grpc.LeaseServiceAsyncStub) -> None:
        """Send later calls on a new stream through ``stub`` (a new channel); the calls
        in flight are answered on the old one, which then ends."""
        self._stub = stub
        if self._stream is not None:
            self._stream.retire()
            self._stream = None

    def close(self) -> None:
        """End the current stream, if any."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    async def call(self, kind: str, request: Any, seconds: float) -> Any:
        """Make call ``kind`` ("acquire", "renew" or "release"); its response message.

        Raises grpc.aio.AioRpcError as the call of its own would, DEADLINE_EXCEEDED
        after ``seconds``.
        """
        if self._stream is None or self._stream.task.done():
            self._stream = _Stream(self._stub)
        stream = self._stream
        call_id = next(self._ids)
        waiter: asyncio.Future[lease_pb2.LeasesResponse] = (
            asyncio.get_running_loop().create_future()
        )
        stream.waiting[call_id] = waiter
        limit = Duration()
        limit.FromMilliseconds(round(seconds * 1000))
        stream.outbox.put_nowait(
            lease_pb2.LeasesRequest(id=call_id, timeout=limit, **{kind: request})
        )
        try:
            async with asyncio.timeout(seconds):
                answer = await waiter
        except TimeoutError:
            raise _aio_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        finally:
            stream.done_with(call_id)
        if answer.HasField("error"):
            raise _rpc_error(answer.error)
        return getattr(answer, kind)


def _rpc_error(error: lease_pb2.LeasesError) -> grpc.aio.AioRpcError:
    """The error a call of its own would have raised, retry hint included."""
    trailers = grpc.aio.Metadata()
    if error.HasField("retry_after"):
        millis = error.retry_after.ToMilliseconds()
        trailers.add(RETRY_AFTER_TRAILER, str(millis))
    return _aio_error(CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message, trailers)


def _aio_error(
    code: grpc.StatusCode, details: str, trailers: grpc.aio.Metadata | None = None
) -> grpc.aio.AioRpcError:
    """The error grpc.aio raises for a call that ended with ``code``."""
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), trailers or grpc.aio.Metadata(), details, None
    )
