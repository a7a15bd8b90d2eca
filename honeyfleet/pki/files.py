"""Writing PKI files safely: private (0600), atomic, and never clobbering keys by accident.

Readers (servers reloading certificates or the revocation list) must never see a half-written
file, so every write goes to a temporary file in the same directory, is fsynced, and is then
renamed (or hard-linked, when overwriting is refused) into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from honeyfleet.pki.errors import PkiFileError

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "append_private",
    "ensure_private_dir",
    "write_private",
]

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700

# Filesystems without hard links report one of these from os.link.
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV})


def ensure_private_dir(directory: Path) -> None:
    """Create ``directory`` (and parents) as 0700 if missing; leave an existing one alone."""
    # An existing directory's mode is the operator's choice; we only control what we create.
    directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600.

    Raises PkiFileError if ``path`` exists and ``overwrite`` is false, so a second
    ``issue`` or ``init`` cannot silently replace a private key.
    """
    directory = path.parent
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    # O_EXCL: never follow or reuse a file someone planted at the temp name.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    try:
        try:
            # The umask may have stripped bits; make the mode exact rather than assume.
            os.fchmod(fd, PRIVATE_FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            tmp.replace(path)
        else:
            _link_exclusive(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(directory)


def append_private(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` (created 0600 if missing) and fsync it.

    Used for append-only ledgers; O_APPEND keeps concurrent single-write appends whole.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_exclusive(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` only if ``path`` does not exist, atomically where possible."""
    try:
        # link(2) fails if the target exists, so there is no check-then-rename race.
        os.link(tmp, path)
    except FileExistsError:
        raise PkiFileError(
            f"refusing to overwrite existing file {path}: remove it first or choose another "
            "output location"
        ) from None
    except OSError as exc:
        if exc.errno not in _NO_LINK_ERRNOS:
            raise
        # No hard links here (e.g. some network or FAT mounts): best effort.
        if path.exists():
            raise PkiFileError(
                f"refusing to overwrite existing file {path}: remove it first or choose "
                "another output location"
            ) from None
        tmp.replace(path)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a rename survives a crash; ignored where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
