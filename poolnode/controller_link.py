"""A pool node's link to the controller: register, then heartbeat, reconnecting forever.

Open tunnels never depend on this link: while the controller is away the node keeps
serving them and keeps retrying with capped, jittered exponential backoff.

A heartbeat carries the guest table only when its version moved since the previous
heartbeat on the stream; otherwise just the version. Early heartbeats (nudges) are
spaced at least NUDGE_GAP heartbeat intervals apart, so a burst of boots costs one; the
controller replies to them only when it has something to say. They do not move the
next heartbeat at the interval, which it always answers.

The controller asks for allocations on the same stream (cheaper than a call each):
every one is answered on it as soon as it is made, in a message of its own, or in an
early heartbeat when a changed table is waiting to be sent (it goes along at once).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from honeyfleet.errors import HoneyfleetError
from honeyfleet.tls import SMALL_ANSWERS, TlsFiles, secure_channel
from honeyfleet.v1 import poolnode_pb2, registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
# Short enough that a node is back well within the grace a restarted controller gives it.
BACKOFF_MAX = 5.0
REGISTER_TIMEOUT = 10.0
# Fraction of the heartbeat interval that at least separates two nudged heartbeats.
NUDGE_GAP = 0.1


class ControllerLink:
    """Keeps a pool node registered and heartbeating."""

    # Announced at registration: the controller then asks for guests on the stream.
    stream_allocations = True

    def __init__(
        self,
        controller: str,
        tls: TlsFiles,
        registration: Callable[[], registry_pb2.RegisterPoolNodeRequest],
        snapshot: Callable[[], registry_pb2.HeartbeatRequest],
        table_version: Callable[[], int],
        on_response: Callable[[registry_pb2.HeartbeatResponse], Awaitable[None]],
        allocate: Callable[
            [poolnode_pb2.AllocateGuestRequest], Awaitable[poolnode_pb2.AllocateGuestResponse]
        ],
        on_round_trip: Callable[[float], None] | None = None,
    ) -> None:
        """``on_round_trip`` is given the seconds each heartbeat sent at the interval
        took to be answered."""
        self._controller = controller
        self._tls = tls
        self._registration = registration
        self._snapshot = snapshot
        self._table_version = table_version
        self._on_response = on_response
        self._allocate = allocate
        self._on_round_trip = on_round_trip
        # When each heartbeat sent at the interval and not answered yet was sent.
        self._unanswered: collections.deque[float] = collections.deque()
        self.connected = asyncio.Event()
        # When a nudge asked for an early heartbeat (e.g. a guest changed state).
        self._nudged_at: float | None = None
        # Allocation answers not yet handed to the stream, and the stream's wake-up.
        self._answers: list[registry_pb2.AllocationAnswer] = []
        self._wake = asyncio.Event()
        # Allocations being made. One that outlives its stream is answered on the next;
        # the controller ignores the answer and reports the lease as stale.
        self._allocations: set[asyncio.Task[None]] = set()
        # The controller asked for the whole table (it had lost it).
        self._table_wanted = False

    def nudge(self) -> None:
        """Send a heartbeat soon (at most NUDGE_GAP intervals after the last one)."""
        if self._nudged_at is None:
            self._nudged_at = asyncio.get_running_loop().time()
            self._wake.set()

    async def run(self) -> None:
        """Register and heartbeat until cancelled."""
        backoff = BACKOFF_START
        while True:
            try:
                # A channel per session: a reconnection uses the current (renewed) certificate.
                async with secure_channel(
                    self._controller, self._tls, extra_options=SMALL_ANSWERS
                ) as channel:
                    await self._session(registry_pb2_grpc.PoolNodeRegistryServiceStub(channel))
            except grpc.aio.AioRpcError as e:
                if self.connected.is_set():
                    backoff = BACKOFF_START
                log.warning(
                    "controller %s: %s (%s); retrying in %.1fs",
                    self._controller,
                    e.code().name,
                    e.details(),
                    backoff,
                )
            except Exception:
                # A bug or a reply this node cannot apply must not end the link:
                # the node would stop heartbeating while it still runs. The backoff
                # is not reset: a reply failing every time must not flood the log.
                log.exception(
                    "link to controller %s failed; retrying in %.1fs",
                    self._controller,
                    backoff,
                )
            self.connected.clear()
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))  # noqa: S311
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _session(self, stub: registry_pb2_grpc.PoolNodeRegistryServiceAsyncStub) -> None:
        """One registration and heartbeat stream, until the stream breaks."""
        # wait_for_ready: a controller coming back is found as soon as the channel
        # reconnects, not at the next attempt after this link's own backoff.
        registration = self._registration()
        registration.stream_allocations = self.stream_allocations
        response = await stub.RegisterPoolNode(
            registration, timeout=REGISTER_TIMEOUT, wait_for_ready=True
        )
        interval = response.heartbeat_interval.ToTimedelta().total_seconds() or 5.0
        log.info(
            "registered with controller %s (heartbeat every %.1fs)", self._controller, interval
        )
        self.connected.set()
        self._answers.clear()
        self._unanswered.clear()
        loop = asyncio.get_running_loop()
        call = stub.Heartbeat(self._heartbeats(interval))
        async for reply in call:
            if not reply.between_heartbeats and self._unanswered:
                sent = self._unanswered.popleft()
                if self._on_round_trip is not None:
                    self._on_round_trip(loop.time() - sent)
            if reply.send_table:
                self._table_wanted = True
                self.nudge()
            for request in reply.allocate:
                task = asyncio.create_task(self._answer(request))
                self._allocations.add(task)
                task.add_done_callback(self._allocations.discard)
            await self._on_response(reply)

    async def _answer(self, request: poolnode_pb2.AllocateGuestRequest) -> None:
        """Allocate as the AllocateGuest call would, and queue the answer for the stream."""
        answer = registry_pb2.AllocationAnswer(lease_id=request.lease_id)
        try:
            answer.granted.CopyFrom(await self._allocate(request))
        except HoneyfleetError as e:
            answer.status_code = e.code.value[0]
            answer.status_message = str(e)
        except Exception as e:
            log.exception("allocation of lease %s failed", request.lease_id)
            answer.status_code = grpc.StatusCode.INTERNAL.value[0]
            answer.status_message = f"the node failed to allocate: {e!r}"
        self._answers.append(answer)
        self._wake.set()

    async def _heartbeats(self, interval: float) -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        """Yield a heartbeat every interval, and early ones when nudged (the table only
        if changed); allocation answers as soon as they are ready, in an early heartbeat
        if a nudge waits."""
        loop = asyncio.get_running_loop()
        gap = interval * NUDGE_GAP
        sent = 0  # a new stream always starts with the whole table
        early = False
        due = loop.time()
        while True:
            version = self._table_version()
            if self._table_wanted:
                self._table_wanted = False
                sent = 0
            if version == sent:
                heartbeat = registry_pb2.HeartbeatRequest(
                    table_version=version, table_unchanged=True
                )
            else:
                heartbeat = self._snapshot()
                sent = heartbeat.table_version
            heartbeat.early = early
            if self._answers:
                heartbeat.allocations.extend(self._answers)
                self._answers = []
            now = loop.time()
            if not early:
                self._unanswered.append(now)
                due = now + interval
            self._nudged_at = None
            yield heartbeat
            while True:
                nudged = self._nudged_at
                if self._answers:
                    if nudged is not None:
                        # The changed table goes along with the answers: no message
                        # of its own (the gap spaces messages, not tables).
                        early = True
                        break
                    answers, self._answers = self._answers, []
                    yield registry_pb2.HeartbeatRequest(allocations=answers, answers_only=True)
                    continue
                send_at = due if nudged is None else min(due, nudged + gap)
                if loop.time() >= send_at:
                    early = send_at < due
                    break
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(send_at):
                        await self._wake.wait()
