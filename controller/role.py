"""The controller as a role of the `honeyfleet` command (entry point ``honeyfleet.roles``)."""

from __future__ import annotations

import asyncio

from controller.config import ControllerConfig
from honeyfleet.pki import Role
from honeyfleet.roles import RolePlugin


async def _serve(config: ControllerConfig, stop: asyncio.Event) -> None:
    """Run the controller (its modules are imported only when it runs)."""
    from controller.server import serve

    await serve(config, stop)


ROLE = RolePlugin(
    role=Role.CONTROLLER,
    help="run the controller",
    config=ControllerConfig,
    serve=_serve,
    overrides=("listen",),
    # The controller holds the CA that join tokens enrol against.
    joinable=False,
)
