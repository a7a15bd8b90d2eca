"""The static backend: existing hosts the operator runs (Cowrie's "simple backend").

Nothing boots and nothing is reset: a "guest" is one configured host, leased with the
same rules as VMs. A destroyed guest's host is simply offered again once it answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from honeyfleet.errors import ConfigError, ResourceExhausted


@dataclass(frozen=True)
class StaticHost:
    """One host of the static backend."""

    host: str
    ssh_port: int
    telnet_port: int


def parse_hosts(entries: tuple[str, ...]) -> list[StaticHost]:
    """Parse ``host:ssh_port[:telnet_port]`` entries (IPv6 hosts in brackets)."""
    hosts = []
    for entry in entries:
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            ports = rest.lstrip(":").split(":")
        else:
            host, *ports = entry.split(":")
        try:
            numbers = [int(p) for p in ports if p]
        except ValueError:
            numbers = []
        if not host or not 1 <= len(numbers) <= 2 or not all(0 < n < 65536 for n in numbers):
            raise ConfigError("static_hosts", f"{entry!r} is not host:ssh_port[:telnet_port]")
        hosts.append(StaticHost(host, numbers[0], numbers[1] if len(numbers) > 1 else 23))
    return hosts


class StaticBackend:
    """Hands out configured hosts as guests."""

    name = "static"

    def __init__(self, hosts: list[StaticHost]) -> None:
        self.hosts = hosts
        self.max_guests: int | None = len(hosts)
        self._used: set[StaticHost] = set()
        # When each host was last given back, so a host that just failed goes to the back.
        self._released: dict[StaticHost, float] = {}

    async def start(self) -> None:
        """Nothing to prepare."""

    async def create(self, guest_id: str) -> object:
        """Take the free host that has been free longest."""
        free = [h for h in self.hosts if h not in self._used]
        if not free:
            raise ResourceExhausted("every static host is in use")
        host = min(free, key=lambda h: self._released.get(h, 0.0))
        self._used.add(host)
        return host

    async def address(self, handle: object) -> str | None:
        """The host's address."""
        assert isinstance(handle, StaticHost)
        return handle.host

    async def alive(self, handle: object) -> bool:
        """Static hosts have no VM to die; the pool's port probe tells whether they answer."""
        return True

    async def hung(self, handle: object) -> str | None:
        """A static host is not booted by us: only the port probe tells."""
        return None

    async def destroy(self, handle: object, keep_disk: Path | None) -> None:
        """Give the host back; its disk is the operator's."""
        assert isinstance(handle, StaticHost)
        self._used.discard(handle)
        self._released[handle] = time.monotonic()

    async def stop(self) -> None:
        """Nothing to release."""

    def ports(self, handle: object) -> tuple[int, int]:
        """The host's SSH and Telnet ports."""
        assert isinstance(handle, StaticHost)
        return handle.ssh_port, handle.telnet_port
