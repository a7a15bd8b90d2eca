"""The SSH frontend: asyncssh server, authentication, and the relay into guests."""

from __future__ import annotations

from sensor.ssh.frontend import SshFrontend
from sensor.ssh.hostkeys import load_or_create
from sensor.ssh.options import server_options

__all__ = ["SshFrontend", "load_or_create", "server_options"]
