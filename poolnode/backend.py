"""The interface between the generic pool and a guest backend."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Backend(Protocol):
    """Starts and stops guests. Blocking work happens off the event loop."""

    name: str
    """Backend kind, reported to the controller ("libvirt", "static")."""

    max_guests: int | None
    """A hard limit on guests (a static backend has only so many hosts), or None."""

    async def start(self) -> None:
        """Prepare shared resources and remove leftovers of an earlier run."""
        ...

    async def create(self, guest_id: str) -> object:
        """Start a guest; returns the backend's handle for it."""
        ...

    async def address(self, handle: object) -> str | None:
        """The guest's IP address, once it has one."""
        ...

    async def alive(self, handle: object) -> bool:
        """Whether the guest is still running (its VM exists and runs)."""
        ...

    async def hung(self, handle: object) -> str | None:
        """Asked when a booting guest has had no address for boot_silence_timeout: if it
        shows no sign of life at all, why and which setting to change; else None."""
        ...

    async def destroy(self, handle: object, keep_disk: Path | None) -> None:
        """Stop the guest and delete its disk, or move the disk to ``keep_disk``."""
        ...

    async def stop(self) -> None:
        """Release shared resources (guests are destroyed by the pool first)."""
        ...

    def ports(self, handle: object) -> tuple[int, int]:
        """The guest's SSH and Telnet ports."""
        ...
