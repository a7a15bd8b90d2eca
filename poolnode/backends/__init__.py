"""Guest backends: ``libvirt`` (VMs from a base image) and ``static`` (hosts you run)."""

from __future__ import annotations

from poolnode.backend import Backend
from poolnode.backends.static import StaticBackend, parse_hosts
from poolnode.config import PoolNodeConfig


def build_backend(config: PoolNodeConfig) -> Backend:
    """The backend a config asks for (libvirt is imported only when used)."""
    if config.backend == "static":
        return StaticBackend(parse_hosts(config.static_hosts))
    from poolnode.backends.libvirt import LibvirtBackend

    return LibvirtBackend(config)
