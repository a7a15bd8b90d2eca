"""systemd readiness notification (sd_notify), without a dependency."""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send states such as "READY=1" to systemd; False when not run by systemd (Type=notify)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(states).encode(), address)
        except OSError:
            return False
    return True
