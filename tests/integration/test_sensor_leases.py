"""The sensor's lease client against a real gRPC LeaseService (a recording fake) over mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from honeyfleet.pki.identity import Role
from honeyfleet.spool import Spool
from honeyfleet.tls import secure_channel, server_credentials
from honeyfleet.v1 import common_pb2, lease_pb2, lease_pb2_grpc
from sensor.events import EventLog, SessionEvents
from sensor.leases import GuestLease, LeaseClient
from sensor.metrics import SensorMetrics
from sensor.session.budget import LeaseBudget
from sensor.session.guest import GuestLink
from sensor.tunnel import TunnelConnector
from tests.conftest import FleetPki, until


class SlowLeases(lease_pb2_grpc.LeaseServiceServicer):
    """Grants a lease only when told to, and records releases."""

    def __init__(self) -> None:
        self.asked = asyncio.Event()
        self.grant = asyncio.Event()
        self.release_asked = asyncio.Event()
        self.answer_release = asyncio.Event()
        self.answer_release.set()
        self.released: list[tuple[str, str]] = []
        self.renewals: list[float] = []
        self.refuse_renewals = 0

    async def AcquireLease(
        self, request: lease_pb2.AcquireLeaseRequest, context: Any
    ) -> lease_pb2.AcquireLeaseResponse:
        """Wait for the test's word, then grant (whether or not the caller still waits)."""
        self.asked.set()
        await self.grant.wait()
        return lease_pb2.AcquireLeaseResponse(
            lease=lease_pb2.Lease(id="lease-1", pool_node="pool-1", guest="g1"),
            credentials=common_pb2.GuestCredentials(username="root", password="guest-secret"),
            ttl=Duration(seconds=60),
        )

    async def RenewLease(
        self, request: lease_pb2.RenewLeaseRequest, context: Any
    ) -> lease_pb2.RenewLeaseResponse:
        """Record when a renewal came; the first ``refuse_renewals`` are refused UNAVAILABLE
        (a controller that cannot take them: restarting, shedding)."""
        self.renewals.append(asyncio.get_running_loop().time())
        if len(self.renewals) <= self.refuse_renewals:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "controller restarting")
        return lease_pb2.RenewLeaseResponse(lease=lease_pb2.Lease(id=request.lease_id))

    async def ReleaseLease(
        self, request: lease_pb2.ReleaseLeaseRequest, context: Any
    ) -> lease_pb2.ReleaseLeaseResponse:
        """Record the release once the test says so (if its caller is still there)."""
        self.release_asked.set()
        await self.answer_release.wait()
        self.released.append((request.lease_id, request.reason))
        return lease_pb2.ReleaseLeaseResponse()


@contextlib.asynccontextmanager
async def lease_client(fleet_pki: FleetPki, leases: SlowLeases) -> AsyncIterator[LeaseClient]:
    """A LeaseClient over mTLS to a server running ``leases``; both closed afterwards."""
    server = grpc.aio.server()
    lease_pb2_grpc.add_LeaseServiceServicer_to_server(leases, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(fleet_pki.files(Role.CONTROLLER, "ctl"))
    )
    await server.start()
    channel = secure_channel(f"127.0.0.1:{port}", fleet_pki.files(Role.SENSOR, "sensor-1"))
    try:
        yield LeaseClient(channel, timeout=20.0, labels={})
    finally:
        await channel.close(None)
        await server.stop(grace=0)


async def test_a_lease_granted_after_its_session_ended_is_released(fleet_pki: FleetPki) -> None:
    leases = SlowLeases()
    async with lease_client(fleet_pki, leases) as client:
        acquiring = asyncio.create_task(
            client.acquire("192.0.2.7", "session-1", common_pb2.PROTOCOL_SSH)
        )
        async with asyncio.timeout(20):
            await leases.asked.wait()
        # The attacker leaves while the controller is granting the lease.
        acquiring.cancel()
        done, _ = await asyncio.wait([acquiring], timeout=10)
        assert done and acquiring.cancelled()
        leases.grant.set()
        await until(lambda: bool(leases.released))
        assert leases.released[0][0] == "lease-1"
        assert "ended" in leases.released[0][1]
        async with asyncio.timeout(20):
            await client.drain()


async def test_a_release_sent_on_the_stream_reaches_a_controller_without_one(
    fleet_pki: FleetPki,
) -> None:
    # The release is sent on the lease stream, which this controller lacks: it is made
    # again as a call of its own.
    leases = SlowLeases()
    lease = GuestLease("lease-4", "pool-1", "", "g1", 60.0, "root", "guest-secret")
    async with lease_client(fleet_pki, leases) as client:
        await client.release(lease, "client logged out")
        await until(lambda: bool(leases.released))
        async with asyncio.timeout(20):
            await client.drain()
        assert leases.released == [("lease-4", "client logged out")]


async def test_a_release_whose_caller_is_cancelled_still_happens(fleet_pki: FleetPki) -> None:
    leases = SlowLeases()
    leases.grant.set()
    lease = GuestLease("lease-2", "pool-1", "", "g1", 60.0, "root", "guest-secret")
    async with lease_client(fleet_pki, leases) as client:
        # A first call finds that the controller has no lease stream: calls of their own.
        await client.acquire("192.0.2.7", "session-1", common_pb2.PROTOCOL_SSH)
        leases.answer_release.clear()
        releasing = asyncio.create_task(client.release(lease, "client logged out"))
        async with asyncio.timeout(20):
            await leases.release_asked.wait()
        # The session is torn down (cancelled) while the controller takes the release.
        releasing.cancel()
        done, _ = await asyncio.wait([releasing], timeout=10)
        assert done and releasing.cancelled()
        leases.answer_release.set()
        async with asyncio.timeout(20):
            await client.drain()  # waits for the release still under way
        assert leases.released == [("lease-2", "client logged out")]


async def test_a_lease_request_its_session_gave_up_counts_in_the_budget_until_answered(
    fleet_pki: FleetPki, tmp_path: Path
) -> None:
    # An attacker who hangs up while its lease is being granted, and again, must not
    # have more requests pending at the controller than its guest budget allows.
    leases = SlowLeases()
    budget = LeaseBudget(per_source=1, total=4)
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=10_000_000, near_full=0.9)
    log = EventLog(spool, SensorMetrics(), sensor_uuid="sensor-uuid")
    events = SessionEvents(
        log,
        session="session-1",
        peer=("192.0.2.7", 40000),
        local=("192.0.2.1", 22),
        sensor="sensor-1",
        protocol="ssh",
    )
    async with lease_client(fleet_pki, leases) as client:
        link = GuestLink(
            leases=client,
            tunnels=TunnelConnector(fleet_pki.files(Role.SENSOR, "sensor-1")),
            budget=budget,
            events=events,
            src_ip="192.0.2.7",
            protocol=common_pb2.PROTOCOL_SSH,
            on_lost=lambda reason: None,
        )
        acquiring = asyncio.create_task(link.acquire())
        async with asyncio.timeout(20):
            await leases.asked.wait()
        acquiring.cancel()
        done, _ = await asyncio.wait([acquiring], timeout=10)
        assert done and acquiring.cancelled()
        await link.drop("client disconnected")
        assert budget.take("192.0.2.7") is not None  # the request is still pending
        leases.grant.set()
        async with asyncio.timeout(20):
            await client.drain()  # answered, and its lease released
        assert leases.released and budget.held == 0
    await log.close()


async def test_a_renewal_the_controller_could_not_take_is_retried_within_the_period(
    fleet_pki: FleetPki,
) -> None:
    # Renewals come every ttl/3; one the controller refuses (an outage) is retried with
    # a short backoff instead of a whole period later, so a controller back from an outage
    # hears from the session long before its lease could expire; once one gets through,
    # renewals are back to every ttl/3.
    ttl, refused = 12.0, 3
    period = ttl / 3
    leases = SlowLeases()
    leases.refuse_renewals = refused
    lease = GuestLease("lease-3", "pool-1", "", "g1", ttl, "root", "guest-secret")
    lost: list[str] = []
    async with lease_client(fleet_pki, leases) as client:
        start = asyncio.get_running_loop().time()
        keeper = client.keep(lease, lost.append)
        try:
            await until(lambda: len(leases.renewals) >= refused + 2, timeout=ttl * 2)
        finally:
            keeper.cancel()
    assert not lost  # an outage is no reason to give the session up
    times = [start, *leases.renewals]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # The first renewal comes a period after the lease; the retries after each refusal
    # well within one (the old client waited a whole period each time: 3 x period).
    assert period <= gaps[0] < 1.5 * period, gaps
    assert all(gap < 0.75 * period for gap in gaps[1 : refused + 1]), gaps
    assert times[refused + 1] - times[1] < period, gaps
    # After the renewal that got through, the next one waits a period again.
    assert gaps[refused + 1] >= period, gaps
