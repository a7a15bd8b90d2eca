"""An instance's identity: Cowrie's ``uuid``, the same on every event it writes.

Sensors and pool nodes each have one (a pool node's events carry its own).

Configured (``uuid``), or made once and kept in ``state_dir/uuid`` so it survives
restarts and upgrades: consumers (OCSF ``product.uid``, dashboards) key on it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

FILE_NAME = "uuid"


def instance_uuid(configured: str, state_dir: Path) -> str:
    """The configured identity, else the one kept in ``state_dir`` (made on first use).

    Blocking file I/O: call it on a thread. A new identity is written to a temporary
    file and renamed, so a crash never leaves an empty one behind.
    """
    if configured:
        return configured
    path = state_dir / FILE_NAME
    try:
        kept = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        kept = ""
    if kept:
        return kept
    made = str(uuid.uuid4())
    state_dir.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(FILE_NAME + ".new")
    with temp.open("w", encoding="ascii") as f:
        f.write(made + "\n")
        f.flush()
        os.fsync(f.fileno())
    temp.replace(path)
    return made
