"""A minimal writer for the "newc" cpio format the kernel unpacks as initramfs.

Written in Python rather than shelling out to cpio so the archive is reproducible
(fixed owners and times) and can hold a /dev/console node without needing mknod.
"""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path
from typing import Protocol

_MAGIC = b"070701"
# The kernel only needs the archive, not the build time; a constant keeps the
# output byte-for-byte reproducible.
_MTIME = 0


class _Sink(Protocol):
    """Anything with a binary ``write`` (a file, a GzipFile)."""

    def write(self, data: bytes, /) -> int:
        """Write bytes."""
        ...


class CpioWriter:
    """Append entries to a newc archive; call :meth:`close` to write the trailer."""

    def __init__(self, out: _Sink) -> None:
        """Write to ``out`` (opened in binary mode)."""
        self._out = out
        self._ino = 0
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        """Write one header, name and payload, each padded to 4 bytes."""
        name = name.strip("/") or "."
        if name in self._names:
            return
        self._names.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            2 if stat.S_ISDIR(mode) else 1,
            _MTIME,
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        header = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data + b"\0" * (-len(data) % 4))

    def add_dir(self, name: str, perm: int = 0o755) -> None:
        """Add a directory (parents are not implied; add them first)."""
        self._entry(name, stat.S_IFDIR | perm)

    def add_file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file with the given content."""
        self._entry(name, stat.S_IFREG | perm, data)

    def add_symlink(self, name: str, target: str) -> None:
        """Add a symbolic link."""
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def add_chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node."""
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def add_tree(self, root: Path, prefix: str = "") -> None:
        """Add everything under ``root`` (sorted, owners forced to root)."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            base = Path(dirpath)
            rel = base.relative_to(root).as_posix()
            if rel != ".":
                self.add_dir(f"{prefix}{rel}", stat.S_IMODE(base.stat().st_mode))
            for fname in sorted(filenames + [d for d in dirnames if (base / d).is_symlink()]):
                path = base / fname
                name = f"{prefix}{path.relative_to(root).as_posix()}"
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    self.add_symlink(name, str(path.readlink()))
                else:
                    self.add_file(name, path.read_bytes(), stat.S_IMODE(st.st_mode))

    def close(self) -> None:
        """Write the trailer entry that ends the archive."""
        self._entry("TRAILER!!!", 0)


def write_gzip_cpio(dest: Path, root: Path, console: bool = True) -> None:
    """Write ``root`` as a gzip-compressed newc archive to ``dest``."""
    with dest.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        writer = CpioWriter(gz)
        if console:
            # The kernel opens /dev/console for init's stdio before init runs; without
            # it, the init script's messages would be lost.
            writer.add_dir("dev")
            writer.add_chardev("dev/console", 5, 1)
        writer.add_tree(root)
        writer.close()
