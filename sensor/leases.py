"""The sensor's side of LeaseService and SensorService.

A lease is asked for only after an attacker logged in (scanners never use up guests),
renewed at a third of its TTL while the session lasts, and released when it ends. A
renewal the controller could not take (an outage) is retried soon, with jittered
backoff, so a controller back from an outage hears from every live session well
within the grace it gives them. A lease request the controller shed (RESOURCE_EXHAUSTED
with a retry hint) makes every request of this sensor fail at once, without a call, for
the hinted time stretched by a random half: a saturated controller sees its load fall
instead of its gRPC queues fill.

Lease calls ride one stream (:mod:`sensor.leasestream`); a controller without it is
called one call per request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from honeyfleet import __version__
from honeyfleet.errors import HoneyfleetError, RPCError, retry_after
from honeyfleet.intake import timeout_metadata
from honeyfleet.v1 import common_pb2, lease_pb2, lease_pb2_grpc, sensor_pb2, sensor_pb2_grpc
from sensor.leasestream import LeaseStream

log = logging.getLogger(__name__)

RENEW_FRACTION = 3
RELEASE_TIMEOUT = 10.0
RELEASE_BACKOFF_MAX = 30.0
RENEW_TIMEOUT = 10.0
# Backoff of renewals after a failed one: from RENEW_RETRY_START seconds, doubling, at
# most RENEW_RETRY_MAX (and never beyond the normal renewal period).
RENEW_RETRY_START = 0.5
RENEW_RETRY_MAX = 5.0
REGISTER_BACKOFF_MAX = 30.0
# The longest a controller's retry hint may hold this sensor's lease requests off.
SHED_HOLD_MAX = 60.0
# Renewal errors that mean the lease is gone for good (not a passing outage).
FINAL = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


class LeaseFailed(HoneyfleetError):
    """No guest could be had for a session; the message says why."""


@dataclass(frozen=True)
class GuestLease:
    """A granted lease and how to reach and log into its guest."""

    id: str
    pool_node: str
    pool_node_address: str
    guest: str
    ttl: float
    username: str
    # Never logged, never recorded: repr leaves it out.
    password: str = field(repr=False)

    @property
    def context(self) -> dict[str, str]:
        """The fleet fields every later event of the session carries."""
        return {"lease": self.id, "pool_node": self.pool_node, "guest": self.guest}


class LeaseClient:
    """Acquires, renews and releases leases over the controller channel."""

    def __init__(
        self, channel: grpc.aio.Channel, *, timeout: float, labels: Mapping[str, str]
    ) -> None:
        self._stream: LeaseStream | None = None
        self.use(channel)
        self._timeout = timeout
        self._labels = dict(labels)
        self._abandoned: set[asyncio.Task[None]] = set()
        self._releasing: set[asyncio.Task[None]] = set()
        self._retries: set[asyncio.Task[None]] = set()
        self._streaming = True
        # Until this time.monotonic() value, lease requests fail without a call.
        self._hold_until = 0.0

    def use(self, channel: grpc.aio.Channel) -> None:
        """Make later calls on ``channel`` (a new one, after a certificate renewal)."""
        self._leases = lease_pb2_grpc.LeaseServiceStub(channel)
        self._sensors = sensor_pb2_grpc.SensorServiceStub(channel)
        if self._stream is not None:
            self._stream.use(self._leases)

    async def _call(self, kind: str, request: Any, seconds: float, **options: Any) -> Any:
        """One lease call (``kind``: acquire, renew, release) on the stream, else on its own.

        Raises grpc.aio.AioRpcError either way.
        """
        if self._streaming:
            try:
                return await self._lease_stream().call(kind, request, seconds)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._streaming = False
                log.info("the controller has no lease stream: one call per lease request")
        method = getattr(self._leases, f"{kind.capitalize()}Lease")
        return await method(request, timeout=seconds, **options)

    def _lease_stream(self) -> LeaseStream:
        """The lease stream, made when first needed."""
        if self._stream is None:
            self._stream = LeaseStream(self._leases, unimplemented=self._release_by_call)
        return self._stream

    def close(self) -> None:
        """End the lease stream (after the last call)."""
        if self._stream is not None:
            self._stream.close()

    async def register(self, listen: list[str]) -> None:
        """Announce this sensor, retrying with backoff until the controller answers."""
        backoff = 0.5
        request = sensor_pb2.RegisterSensorRequest(
            version=__version__, listen_addresses=listen, hostname=socket.gethostname()
        )
        while True:
            try:
                reply = await self._sensors.RegisterSensor(request, timeout=10)
            except grpc.aio.AioRpcError as e:
                log.warning("cannot register with the controller (%s); retrying", e.code().name)
                await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311
                backoff = min(backoff * 2, REGISTER_BACKOFF_MAX)
                continue
            log.info("registered with the controller as %s", reply.sensor)
            return

    async def acquire(
        self,
        src_ip: str,
        session: str,
        protocol: common_pb2.Protocol.ValueType,
        *,
        settled: Callable[[], None] | None = None,
    ) -> GuestLease:
        """A lease for this session within ``lease_timeout``, else LeaseFailed.

        A caller cancelled while waiting (the attacker left) does not cancel the request:
        the controller may be granting the lease at that moment, so the answer is awaited
        in the background and a granted lease released at once. ``settled`` is called
        when such an abandoned request is over (answered, its lease released): until
        then it still asks the controller for a guest, and a budget counts it.
        """
        request = lease_pb2.AcquireLeaseRequest(
            src_ip=src_ip, protocol=protocol, session=session, labels=self._labels
        )
        answer = asyncio.ensure_future(self._acquire(request))
        try:
            return await asyncio.shield(answer)
        except asyncio.CancelledError:
            task = asyncio.create_task(self._release_when_granted(answer, settled))
            self._abandoned.add(task)
            task.add_done_callback(self._abandoned.discard)
            raise

    async def drain(self) -> None:
        """Wait for abandoned requests to be answered and their leases released.

        Releases whose callers were cancelled are waited for too, and the controller's
        confirmation of releases on the stream (each is bounded).
        """
        while self._abandoned or self._releasing:
            await asyncio.gather(*self._abandoned, *self._releasing, return_exceptions=True)
        if self._stream is not None and self._streaming:
            await self._stream.settle(RELEASE_TIMEOUT)

    async def _release_when_granted(
        self, answer: asyncio.Future[GuestLease], settled: Callable[[], None] | None
    ) -> None:
        """Release the lease an abandoned request brings (bounded by its deadline)."""
        try:
            lease = await answer
            log.info("lease %s arrived after its session ended; releasing it", lease.id)
            await self.release(lease, "the session ended while its lease was being granted")
        except LeaseFailed:
            pass
        finally:
            if settled is not None:
                settled()

    async def _acquire(self, request: lease_pb2.AcquireLeaseRequest) -> GuestLease:
        """One AcquireLease call; LeaseFailed says why there is no lease."""
        if (hold := self._hold_until - time.monotonic()) > 0:
            raise LeaseFailed(
                f"the controller is shedding lease requests; asking again in {hold:.0f}s"
            )
        try:
            reply = await self._call(
                "acquire", request, self._timeout, metadata=timeout_metadata(self._timeout)
            )
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise LeaseFailed(f"no lease within {self._timeout:.0f}s") from None
            if hint := retry_after(e, cap=SHED_HOLD_MAX):
                hold_until = time.monotonic() + hint * random.uniform(1.0, 1.5)  # noqa: S311
                self._hold_until = max(self._hold_until, hold_until)
            raise LeaseFailed(str(RPCError.wrap("AcquireLease", e))) from None
        lease = reply.lease
        return GuestLease(
            id=lease.id,
            pool_node=lease.pool_node,
            pool_node_address=lease.pool_node_address,
            guest=lease.guest,
            ttl=reply.ttl.ToTimedelta().total_seconds() or 60.0,
            username=reply.credentials.username,
            password=reply.credentials.password,
        )

    def keep(self, lease: GuestLease, on_lost: Callable[[str], None]) -> LeaseKeeper:
        """Renew ``lease`` until the keeper is cancelled; call ``on_lost(reason)`` if the
        lease ends under us."""
        return LeaseKeeper(self, lease, on_lost)

    async def renew(self, lease: GuestLease, within: float) -> None:
        """One renewal of ``lease``, answered ``within`` seconds."""
        await self._call("renew", lease_pb2.RenewLeaseRequest(lease_id=lease.id), within)

    async def release(self, lease: GuestLease, reason: str) -> None:
        """End the lease.

        On the lease stream the release is sent without waiting for an answer, and
        sent again until the controller confirms it or the lease would have expired
        anyway (see :mod:`sensor.leasestream`).

        Without the stream (one call per request), if the controller cannot be
        reached, keep trying in the background (the session does not wait) until the
        lease would have expired anyway: the controller's record then ends as released
        with the session's reason, and the guest is back in the pool sooner, instead of
        both waiting for the lease's TTL. A caller cancelled meanwhile (its session is
        being torn down) does not cancel the release: it runs on, within
        RELEASE_TIMEOUT, and is retried as above if it fails.
        """
        request = lease_pb2.ReleaseLeaseRequest(lease_id=lease.id, reason=reason)
        if self._streaming:
            self._lease_stream().release(request, lease.ttl)
            return
        await asyncio.shield(self._release_by_call(request, lease.ttl))

    def _release_by_call(
        self, request: lease_pb2.ReleaseLeaseRequest, ttl: float
    ) -> asyncio.Task[None]:
        """Release in a call of its own (drain waits for it), retried if it fails."""
        self._streaming = False
        task = asyncio.create_task(self._release_or_retry(request, ttl))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return task

    async def _release_or_retry(self, request: lease_pb2.ReleaseLeaseRequest, ttl: float) -> None:
        """One release; retried in the background if the controller could not take it."""
        try:
            await self._call("release", request, RELEASE_TIMEOUT)
        except grpc.aio.AioRpcError as e:
            if e.code() in FINAL:
                return  # already over (expired, or its pool node failed)
            log.warning("releasing lease %s: %s; retrying", request.lease_id, e.code().name)
            task = asyncio.create_task(self._retry_release(request, ttl))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)

    async def _retry_release(self, request: lease_pb2.ReleaseLeaseRequest, ttl: float) -> None:
        """Retry a release with backoff, for as long as the lease could still be alive."""
        deadline = time.monotonic() + ttl
        backoff = 1.0
        while time.monotonic() + backoff < deadline:
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311
            try:
                await self._call("release", request, RELEASE_TIMEOUT)
            except grpc.aio.AioRpcError as e:
                if e.code() in FINAL:
                    return
                backoff = min(backoff * 2, RELEASE_BACKOFF_MAX)
                continue
            log.info("released lease %s once the controller answered", request.lease_id)
            return
        log.warning("lease %s not released: the controller expires it", request.lease_id)

    async def abandon_retries(self) -> None:
        """Stop retrying releases (on shutdown: the controller expires those leases)."""
        for task in self._retries:
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)


class LeaseKeeper:
    """Renews one lease every ttl/RENEW_FRACTION until cancelled, sooner after a renewal
    the controller could not take (an outage).

    One per held session: between renewals it is a timer, and a task only while a
    renewal runs (a task waiting all along held about 1.4 KB per session).
    """

    __slots__ = ("_client", "_lease", "_on_lost", "_period", "_retry", "_task", "_timer")

    def __init__(
        self, client: LeaseClient, lease: GuestLease, on_lost: Callable[[str], None]
    ) -> None:
        self._client = client
        self._lease = lease
        self._on_lost = on_lost
        self._period = lease.ttl / RENEW_FRACTION
        self._retry = RENEW_RETRY_START
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._wait(self._period)

    def cancel(self) -> None:
        """Renew no more."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _wait(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._due)

    def _due(self) -> None:
        self._timer = None
        self._task = asyncio.create_task(self._renew())

    async def _renew(self) -> None:
        period = self._period
        try:
            await self._client.renew(self._lease, min(RENEW_TIMEOUT, period))
        except grpc.aio.AioRpcError as e:
            if e.code() in FINAL:
                self._task = None
                self._on_lost(e.details() or e.code().name)
                return
            # A controller outage: keep the session and renew as soon as it is back.
            log.warning("renewing lease %s: %s", self._lease.id, e.code().name)
            delay = min(self._retry, period) * random.uniform(0.5, 1.0)  # noqa: S311
            self._retry = min(self._retry * 2, RENEW_RETRY_MAX)
        else:
            delay, self._retry = period, RENEW_RETRY_START
        self._task = None
        self._wait(delay)
