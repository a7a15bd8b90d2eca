"""The sensor's SSH host keys (the persona's): made on first start in state_dir, then kept."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import asyncssh

from sensor.ssh_persona import HostKey

log = logging.getLogger(__name__)


def load_or_create(directory: Path, wanted: Sequence[HostKey]) -> list[asyncssh.SSHKey]:
    """The ``wanted`` host keys in ``directory``, generating any that are missing
    (blocking)."""
    directory.mkdir(parents=True, exist_ok=True)
    keys = []
    for spec in wanted:
        name, algorithm, key_size = spec.file, spec.algorithm, spec.bits
        path = directory / name
        if path.exists():
            keys.append(asyncssh.read_private_key(path))
            continue
        key = (
            asyncssh.generate_private_key(algorithm, key_size=key_size)
            if key_size
            else asyncssh.generate_private_key(algorithm)
        )
        # Written with 0600 from the start: a host key is never world-readable.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        (directory / f"{name}.pub").write_bytes(key.export_public_key())
        log.info("made SSH host key %s", path)
        keys.append(key)
    return keys
