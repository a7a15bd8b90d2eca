"""A pool node's link to the controller: register, then heartbeat, reconnecting forever.

Open tunnels never depend on this link: while the controller is away the node keeps
serving them and keeps retrying with capped, jittered exponential backoff.

A heartbeat carries the guest table only when its version moved since the previous
heartbeat on the stream; otherwise just the version. Early heartbeats (nudges) are
spaced at least NUDGE_GAP heartbeat intervals apart, so a burst of boots costs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from honeyfleet.tls import TlsFiles, secure_channel
from honeyfleet.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

BACKOFF_START = 0.5
# Short enough that a node is back well within the grace a restarted controller gives it.
BACKOFF_MAX = 5.0
REGISTER_TIMEOUT = 10.0
# Fraction of the heartbeat interval that at least separates two nudged heartbeats.
NUDGE_GAP = 0.1


class ControllerLink:
    """Keeps a pool node registered and heartbeating."""

    def __init__(
        self,
        controller: str,
        tls: TlsFiles,
        registration: Callable[[], registry_pb2.RegisterPoolNodeRequest],
        snapshot: Callable[[], registry_pb2.HeartbeatRequest],
        table_version: Callable[[], int],
        on_response: Callable[[registry_pb2.HeartbeatResponse], Awaitable[None]],
    ) -> None:
        self._controller = controller
        self._tls = tls
        self._registration = registration
        self._snapshot = snapshot
        self._table_version = table_version
        self._on_response = on_response
        self.connected = asyncio.Event()
        # Set to send a heartbeat at once (e.g. after a guest changed state).
        self.nudge = asyncio.Event()

    async def run(self) -> None:
        """Register and heartbeat until cancelled."""
        backoff = BACKOFF_START
        while True:
            try:
                # A channel per session: a reconnection uses the current (renewed) certificate.
                async with secure_channel(self._controller, self._tls) as channel:
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
        response = await stub.RegisterPoolNode(
            self._registration(), timeout=REGISTER_TIMEOUT, wait_for_ready=True
        )
        interval = response.heartbeat_interval.ToTimedelta().total_seconds() or 5.0
        log.info(
            "registered with controller %s (heartbeat every %.1fs)", self._controller, interval
        )
        self.connected.set()
        call = stub.Heartbeat(self._heartbeats(interval))
        async for reply in call:
            await self._on_response(reply)

    async def _heartbeats(self, interval: float) -> AsyncIterator[registry_pb2.HeartbeatRequest]:
        """Yield a heartbeat every interval, or sooner when nudged; the table only if changed."""
        sent = 0  # a new stream always starts with the whole table
        while True:
            version = self._table_version()
            if version == sent:
                yield registry_pb2.HeartbeatRequest(table_version=version, table_unchanged=True)
            else:
                heartbeat = self._snapshot()
                sent = heartbeat.table_version
                yield heartbeat
            self.nudge.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.nudge.wait()
                    await asyncio.sleep(interval * NUDGE_GAP)
