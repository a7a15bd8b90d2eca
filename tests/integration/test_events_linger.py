"""Batches that fill under load: the controller's linger hint and the uploader that obeys it.

A real controller over mTLS, a real Spool and Uploader. "Busy" is made with a batch
target far below what one sensor sends, so the hint does not depend on the machine's
speed; batches are counted with the controller's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.server import Controller
from honeyfleet.pki.identity import Role
from honeyfleet.spool import Spool
from honeyfleet.uploader import Uploader
from tests.conftest import ControllerFactory, FleetPki, until
from tests.integration.test_events_ingest import bulk_events

# The controller's cap on its hint; no test waits this long.
BUSY_LINGER = 60.0
# Seconds between a trickle's events.
TRICKLE = 0.05


def metric(controller: Controller, name: str) -> float:
    """A sample of the controller's event metrics, as scraped."""
    return controller.events.metrics_registry.get_sample_value(name) or 0.0


@contextlib.asynccontextmanager
async def uploading(
    spool: Spool, address: str, fleet_pki: FleetPki, **options: float
) -> AsyncIterator[Uploader]:
    """An uploader of sensor edge1 running for the context's length."""
    uploader = Uploader(spool, address, fleet_pki.files(Role.SENSOR, "edge1"), batch=10, **options)
    task = asyncio.create_task(uploader.run())
    try:
        yield uploader
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    """A sensor's spool, closed after the test."""
    spool = Spool(tmp_path / "spool.sqlite3", max_bytes=10_000_000, near_full=0.9)
    yield spool
    spool.close()


async def busy_controller(start_controller: ControllerFactory) -> tuple[Controller, str]:
    """A controller that finds any sensor's events too many: it asks for BUSY_LINGER."""
    return await start_controller(
        ingest_target_batches_per_second=0.001, ingest_max_linger=BUSY_LINGER
    )


async def trickle(spool: Spool, count: int) -> None:
    """Spool ``count`` events, each in a commit of its own and a moment apart (time for
    an uploader that does not wait to send each alone), then wait for their delivery."""
    for event in bulk_events(count, "edge1"):
        assert spool.append(event)
        await spool.flush()
        await asyncio.sleep(TRICKLE)
    await until(lambda: spool.count == 0)


async def test_a_busy_controllers_hint_makes_the_uploader_send_fewer_fuller_batches(
    start_controller: ControllerFactory, fleet_pki: FleetPki, spool: Spool
) -> None:
    controller, address = await busy_controller(start_controller)
    async with uploading(spool, address, fleet_pki, max_linger=BUSY_LINGER) as uploader:
        # The first event goes at once: nobody asked the sensor to wait yet.
        await trickle(spool, 1)
        assert metric(controller, "honeyfleet_ingest_batches_total") == 1
        assert uploader.linger_hint == BUSY_LINGER
        assert metric(controller, "honeyfleet_ingest_linger_seconds") == BUSY_LINGER
        # 30 events, one commit each: without the hint each would be a batch of its
        # own; with it they wait for each other and go as full batches (of 10).
        await trickle(spool, 30)
    assert metric(controller, "honeyfleet_ingest_batches_total") == 1 + 3
    assert metric(controller, "honeyfleet_events_ingested_total") == 31
    assert metric(controller, "honeyfleet_events_duplicate_total") == 0


async def test_the_sensor_bounds_the_hint_so_a_lone_event_still_goes(
    start_controller: ControllerFactory, fleet_pki: FleetPki, spool: Spool
) -> None:
    controller, address = await busy_controller(start_controller)
    async with uploading(spool, address, fleet_pki, max_linger=0.3) as uploader:
        await trickle(spool, 1)
        assert metric(controller, "honeyfleet_ingest_linger_seconds") == BUSY_LINGER
        assert uploader.linger_hint == 0.3
        # Not a full batch, and the controller asks for a minute: the sensor's own
        # bound sends it anyway (until() gives up long before the minute is over).
        await trickle(spool, 1)
    assert metric(controller, "honeyfleet_ingest_batches_total") == 2


async def test_a_quiet_fleet_is_not_asked_to_wait(
    start_controller: ControllerFactory, fleet_pki: FleetPki, spool: Spool
) -> None:
    controller, address = await start_controller()
    async with uploading(spool, address, fleet_pki, max_linger=BUSY_LINGER) as uploader:
        await trickle(spool, 5)
        assert uploader.linger_hint == 0.0
    assert metric(controller, "honeyfleet_ingest_linger_seconds") == 0.0
    assert metric(controller, "honeyfleet_events_ingested_total") == 5
