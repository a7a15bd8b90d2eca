"""The pool node as a role of the `honeyfleet` command (entry point ``honeyfleet.roles``).

Besides ``poolnode`` it offers ``image``, the guest image builder.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from honeyfleet.pki import Role
from honeyfleet.roles import RolePlugin
from poolnode.config import PoolNodeConfig


async def _serve(config: PoolNodeConfig, stop: asyncio.Event) -> None:
    """Run the pool node (libvirt is imported only when it runs)."""
    from poolnode.server import serve

    await serve(config, stop)


def _cmd_image(args: argparse.Namespace) -> int:
    """`honeyfleet image ...`: the image builder's own command line."""
    from poolnode.image import main as image_main

    code: int = image_main(args.rest)
    return code


def _add_commands(commands: Any) -> None:
    """Add ``image``."""
    p = commands.add_parser(
        "image", help="build the guest image (image build --help)", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_image)


ROLE = RolePlugin(
    role=Role.POOLNODE,
    help="run a pool node (or join the fleet as one)",
    config=PoolNodeConfig,
    serve=_serve,
    add_commands=_add_commands,
)
