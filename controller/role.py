"""The controller as a role of the `honeyfleet` command (entry point ``honeyfleet.roles``)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from controller.config import ControllerConfig
from honeyfleet.errors import ConfigError
from honeyfleet.pki import Role
from honeyfleet.roles import RolePlugin


async def _serve(config: ControllerConfig, stop: asyncio.Event) -> None:
    """Run the controller (its modules are imported only when it runs)."""
    from controller.server import serve

    await serve(config, stop)


def _check_with_others(config: ControllerConfig, others: Mapping[str, Any]) -> list[ConfigError]:
    """A sensor configured in the same file must wait for a lease longer than we do."""
    timeout = getattr(others.get("sensor"), "lease_timeout", None)
    if timeout is None or timeout > config.lease_wait:
        return []
    return [
        ConfigError(
            "controller.lease_wait",
            f"must be below sensor.lease_timeout ({timeout:g}s), so sensors hear the "
            "controller's answer instead of timing out",
        )
    ]


ROLE = RolePlugin(
    role=Role.CONTROLLER,
    help="run the controller",
    config=ControllerConfig,
    serve=_serve,
    overrides=("listen",),
    # The controller holds the CA that join tokens enrol against.
    joinable=False,
    check_with_others=_check_with_others,
)
