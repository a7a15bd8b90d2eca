"""Tiny file systems for tests of a full disk: tmpfs mounts made and unmounted by the test.

A full disk is made by filling one of these, never the machine's own disk. Mounting
needs root (CAP_SYS_ADMIN): CI runs as root, so there a failure to mount fails the test;
elsewhere the test is skipped, saying why.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
from pathlib import Path

from tests.prereq import require_tool, unmet

FILL_CHUNK = 64 * 1024


class TinyDisks:
    """tmpfs mounts of a test; ``unmount_all`` at teardown."""

    def __init__(self) -> None:
        self._mounted: list[Path] = []

    def mount(self, path: Path, size: int) -> Path:
        """A tmpfs of ``size`` bytes at ``path`` (created if need be)."""
        tool = require_tool("mount", "mount")
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [tool, "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            unmet(f"cannot mount a tmpfs (root needed): {done.stderr.strip()}")
        self._mounted.append(path)
        return path

    def unmount_all(self) -> None:
        """Unmount every tmpfs made (lazily if something still holds one open)."""
        tool = shutil.which("umount") or "umount"
        for path in reversed(self._mounted):
            done = subprocess.run([tool, str(path)], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run([tool, "-l", str(path)], capture_output=True, check=False)
        self._mounted.clear()


def fill(directory: Path, name: str = "filler") -> Path:
    """Write zeros into ``directory/name`` until its file system is full; the file."""
    filler = directory / name
    chunk = bytes(FILL_CHUNK)
    # Unbuffered: a buffered file would raise ENOSPC once more when it is closed.
    with filler.open("ab", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    # Smaller writes fill what a whole chunk no longer fit into.
    with filler.open("ab", buffering=0) as f:
        try:
            while f.write(b"\0" * 512):
                pass
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler
