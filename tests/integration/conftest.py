"""Fixtures shared by the integration tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ControllerFactory, FleetPki
from tests.integration.ssh_fleet import Fleet, FleetFactory, start_fleet


@pytest.fixture
async def make_fleet(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> AsyncIterator[FleetFactory]:
    """Start SSH sensor fleets with sensor settings of the test's choosing; all stopped
    afterwards (each one, even if stopping another failed)."""
    started: list[Fleet] = []
    async with contextlib.AsyncExitStack() as teardown:

        async def start(**sensor: Any) -> Fleet:
            tmp = tmp_path / f"fleet{len(started)}"
            fleet = await start_fleet(fleet_pki, start_controller, tmp, **sensor)
            teardown.push_async_callback(fleet.stop)
            started.append(fleet)
            return fleet

        yield start
