"""The sensor's end of LeaseService.Leases: lease calls as messages on one stream.

A controller takes new calls from gRPC one per turn of its event loop, so a fleet's
acquires and releases as calls of their own queue there under load; as messages on a
stream each sensor keeps open, they do not. Each call is sent with an id and its
timeout and answered under that id, in any order. A call fails as the same call of
its own would (``grpc.aio.AioRpcError`` with the controller's code, message and retry
hint), so callers handle both alike; a stream that breaks fails the calls it carried
with its status, and the next call opens a new stream. After a certificate renewal
new calls go over the new channel, and the old stream ends once it answered its own.

A release needs no answer of its own: releases made in one turn of the event loop go
in one message, or ride along with a call sent in that turn, and the controller
confirms them in the answers it sends later (``releases_through``). Releases a stream
ended without confirming are sent again on a new stream (at once if the stream had
been answered, else after a jittered backoff), until the controller would have
expired their leases anyway (their TTL after the release); releasing twice is
harmless. Only :meth:`LeaseStream.close` gives them up, on shutdown, after
:meth:`LeaseStream.settle`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from honeyfleet.errors import RETRY_AFTER_TRAILER
from honeyfleet.v1 import lease_pb2, lease_pb2_grpc

log = logging.getLogger(__name__)

CODES = {code.value[0]: code for code in grpc.StatusCode}
# Backoff of resending unconfirmed releases after a stream that was never answered.
RESEND_START = 1.0
RESEND_MAX = 30.0


@dataclass(frozen=True, slots=True)
class _Release:
    """A release to send (again) until confirmed, and until when it is worth sending."""

    request: lease_pb2.ReleaseLeaseRequest
    # time.monotonic() after which the controller expired the lease anyway.
    give_up: float


class _Stream:
    """One Leases stream: the calls it carries, its releases not yet confirmed, the
    requests still to send."""

    def __init__(
        self, stub: lease_pb2_grpc.LeaseServiceAsyncStub, ended: Callable[[_Stream], None]
    ) -> None:
        # None ends the requests (and so gRPC's task that sends them).
        self.outbox: asyncio.Queue[lease_pb2.LeasesRequest | None] = asyncio.Queue()
        self.waiting: dict[int, asyncio.Future[lease_pb2.LeasesResponse]] = {}
        # Releases sent, by the id of the message that carried them (ids increase).
        self.unconfirmed: dict[int, list[_Release]] = {}
        # Whether the controller answered anything on it; whether its releases are given up.
        self.answered = False
        self.dropped = False
        # What ended it (set once it ended).
        self.error: grpc.aio.AioRpcError | None = None
        self._ended = ended
        self._call = stub.Leases(self._requests())
        self.task = asyncio.create_task(self._read())
        self._retiring = False

    def send(self, request: lease_pb2.LeasesRequest, releases: list[_Release]) -> None:
        """Send ``request`` with ``releases``, kept until an answer confirms them."""
        if releases:
            request.releases.extend(release.request for release in releases)
            self.unconfirmed[request.id] = releases
        self.outbox.put_nowait(request)

    def _confirmed(self, through: int) -> None:
        """Forget the releases of every message up to id ``through``."""
        for message_id in list(itertools.takewhile(lambda i: i <= through, self.unconfirmed)):
            del self.unconfirmed[message_id]

    async def _requests(self) -> AsyncIterator[lease_pb2.LeasesRequest]:
        while (request := await self.outbox.get()) is not None:
            yield request

    async def _read(self) -> None:
        """Hand each answer to its call; when the stream ends, fail the calls left."""
        try:
            async for answer in self._call:
                self.answered = True
                if self.unconfirmed:
                    self._confirmed(answer.releases_through)
                waiter = self.waiting.pop(answer.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(answer)
            error = _aio_error(grpc.StatusCode.UNAVAILABLE, "the controller ended the lease stream")
        except grpc.aio.AioRpcError as e:
            error = e
        except asyncio.CancelledError:
            error = _aio_error(grpc.StatusCode.CANCELLED, "the lease stream was closed")
        self.error = error
        # Left waiting, gRPC's sending task would be destroyed pending with the stream.
        self.outbox.put_nowait(None)
        for waiter in self.waiting.values():
            if not waiter.done():
                waiter.set_exception(error)
        self.waiting.clear()
        self._ended(self)

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

    def __init__(
        self,
        stub: lease_pb2_grpc.LeaseServiceAsyncStub,
        *,
        unimplemented: Callable[[lease_pb2.ReleaseLeaseRequest, float], object],
    ) -> None:
        """``unimplemented(request, seconds)`` takes a release over (with the seconds its
        lease has left) when the controller has no Leases stream."""
        self._stub = stub
        self._unimplemented = unimplemented
        self._ids = itertools.count(1)
        self._stream: _Stream | None = None
        # Every stream not yet ended: the current one and those retired by use().
        self._open: set[_Stream] = set()
        # Releases to send in the next message, and its sending (soon, or after backoff).
        self._unsent: list[_Release] = []
        self._flushing: asyncio.Handle | None = None
        self._backoff = 0.0

    def use(self, stub: lease_pb2_grpc.LeaseServiceAsyncStub) -> None:
        """Send later calls on a new stream through ``stub`` (a new channel); the calls
        in flight are answered on the old one, which then ends."""
        self._stub = stub
        if self._stream is not None:
            self._stream.retire()
            self._stream = None

    def close(self) -> None:
        """End the current stream, if any, giving up releases not yet confirmed (their
        leases expire)."""
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        self._give_up(self._unsent)
        self._unsent = []
        for stream in self._open:
            stream.dropped = True
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _current(self) -> _Stream:
        """The stream to send on, opened if there is none (or it ended)."""
        if self._stream is None or self._stream.task.done():
            self._stream = _Stream(self._stub, self._stream_ended)
            self._open.add(self._stream)
        return self._stream

    def release(self, request: lease_pb2.ReleaseLeaseRequest, ttl: float) -> None:
        """Release a lease of ``ttl`` seconds without waiting for an answer.

        It goes with the next message sent in this turn of the event loop, or in one
        of its own at the end of the turn.
        """
        self._unsent.append(_Release(request, time.monotonic() + ttl))
        if self._flushing is None:
            self._flushing = asyncio.get_running_loop().call_soon(self._flush)

    def _take_unsent(self) -> list[_Release]:
        """The releases to send now, less those whose leases expired meanwhile."""
        releases, self._unsent = self._unsent, []
        now = time.monotonic()
        if any(release.give_up <= now for release in releases):
            self._give_up([release for release in releases if release.give_up <= now])
            releases = [release for release in releases if release.give_up > now]
        return releases

    def _flush(self) -> None:
        """Send the releases waiting (if no call took them along)."""
        self._flushing = None
        if releases := self._take_unsent():
            self._current().send(lease_pb2.LeasesRequest(id=next(self._ids)), releases)

    def _stream_ended(self, stream: _Stream) -> None:
        """Send the releases an ended stream did not confirm again, on a new stream."""
        self._open.discard(stream)
        if stream.answered:
            self._backoff = 0.0
        left = [release for releases in stream.unconfirmed.values() for release in releases]
        stream.unconfirmed.clear()
        if not left:
            return
        if stream.dropped:
            self._give_up(left)
            return
        if stream.error is not None and stream.error.code() == grpc.StatusCode.UNIMPLEMENTED:
            now = time.monotonic()
            for release in left:
                self._unimplemented(release.request, release.give_up - now)
            return
        self._unsent[:0] = left
        if self._flushing is not None:
            self._flushing.cancel()
        loop = asyncio.get_running_loop()
        if self._backoff == 0.0:
            self._backoff = RESEND_START
            self._flushing = loop.call_soon(self._flush)
        else:
            delay = self._backoff * random.uniform(0.8, 1.2)  # noqa: S311
            self._backoff = min(self._backoff * 2, RESEND_MAX)
            self._flushing = loop.call_later(delay, self._flush)

    @staticmethod
    def _give_up(releases: list[_Release]) -> None:
        for release in releases:
            log.warning(
                "lease %s not released: the controller expires it", release.request.lease_id
            )

    async def settle(self, seconds: float) -> None:
        """Wait up to ``seconds`` for the controller to confirm every release sent.

        One answered release (of the newest release not confirmed) asks for the
        confirmation: its answer confirms every release sent before it.
        """
        if self._flushing is not None:
            self._flushing.cancel()
            self._flushing = None
        stream = self._stream
        unconfirmed = [] if stream is None else list(stream.unconfirmed.values())
        if not self._unsent and not unconfirmed:
            return
        last = self._unsent[-1] if self._unsent else unconfirmed[-1][-1]
        try:
            await self.call("release", last.request, seconds)
        except grpc.aio.AioRpcError as e:
            log.warning("releases not confirmed (%s): the controller expires them", e.code().name)

    async def call(self, kind: str, request: Any, seconds: float) -> Any:
        """Make call ``kind`` ("acquire", "renew" or "release"); its response message.

        Releases waiting to be sent go along. Raises grpc.aio.AioRpcError as the call
        of its own would, DEADLINE_EXCEEDED after ``seconds``.
        """
        stream = self._current()
        call_id = next(self._ids)
        waiter: asyncio.Future[lease_pb2.LeasesResponse] = (
            asyncio.get_running_loop().create_future()
        )
        stream.waiting[call_id] = waiter
        limit = Duration()
        limit.FromMilliseconds(round(seconds * 1000))
        stream.send(
            lease_pb2.LeasesRequest(id=call_id, timeout=limit, **{kind: request}),
            self._take_unsent() if self._unsent else [],
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
