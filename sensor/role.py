"""The sensor as a role of the `honeyfleet` command (entry point ``honeyfleet.roles``)."""

from __future__ import annotations

import asyncio

from honeyfleet.pki import Role
from honeyfleet.roles import RolePlugin
from sensor.config import SensorConfig


async def _serve(config: SensorConfig, stop: asyncio.Event) -> None:
    """Run the sensor (its modules are imported only when it runs)."""
    from sensor.service import serve

    await serve(config, stop)


ROLE = RolePlugin(
    role=Role.SENSOR,
    help="run a sensor (or join the fleet as one)",
    config=SensorConfig,
    serve=_serve,
)
