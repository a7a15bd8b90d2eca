"""asyncssh server options for the frontend: OpenSSH's look, our bounds, no forwarding."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncssh
from asyncssh.compression import get_compression_algs
from asyncssh.encryption import get_encryption_algs
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs

from honeyfleet.errors import ConfigError
from sensor.config import SensorConfig
from sensor.ssh import compression

log = logging.getLogger(__name__)


def supported(key: str, wanted: Sequence[str], available: Sequence[bytes]) -> list[str]:
    """The configured algorithms asyncssh implements, in order; ConfigError if none."""
    names = {name.decode() for name in available}
    kept = [name for name in wanted if name in names]
    dropped = [name for name in wanted if name not in names]
    if dropped:
        log.info("%s: asyncssh lacks %s; not offered", key, ", ".join(dropped))
    if not kept:
        raise ConfigError(key, "none of these algorithms is supported by asyncssh")
    return kept


def server_options(
    config: SensorConfig, host_keys: list[asyncssh.SSHKey]
) -> asyncssh.SSHServerConnectionOptions:
    """Options shared by every attacker connection (zlib inflation bounded: see compression)."""
    compression.install()
    return asyncssh.SSHServerConnectionOptions(
        config=None,
        server_host_keys=host_keys,
        server_version=config.ssh_version.removeprefix("SSH-2.0-"),
        kex_algs=supported("ssh_kex_algs", config.ssh_kex_algs, get_kex_algs()),
        encryption_algs=supported(
            "ssh_encryption_algs", config.ssh_encryption_algs, get_encryption_algs()
        ),
        mac_algs=supported("ssh_mac_algs", config.ssh_mac_algs, get_mac_algs()),
        compression_algs=supported(
            "ssh_compression_algs", config.ssh_compression_algs, get_compression_algs()
        ),
        # asyncssh's own login timer is the login grace time (it ends at a successful
        # login, which for us includes leasing and joining the guest).
        login_timeout=config.login_grace_time,
        allow_pty=True,
        # Bytes in and out untouched: the guest's shell does the line editing.
        line_editor=False,
        encoding=None,
        x11_forwarding=False,
        agent_forwarding=False,
        allow_scp=False,
    )
