"""asyncssh server options for the frontend: the persona's look, our bounds, no forwarding."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import asyncssh
from asyncssh.compression import get_compression_algs
from asyncssh.encryption import get_encryption_algs
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs
from asyncssh.public_key import get_public_key_algs

from honeyfleet.errors import ConfigError
from sensor.config import SensorConfig
from sensor.ssh import compression, openssh, sntrup

log = logging.getLogger(__name__)


def supported(what: str, wanted: Sequence[str], available: Sequence[bytes]) -> list[str]:
    """The persona's algorithms asyncssh implements, in order; ConfigError if none."""
    names = {name.decode() for name in available}
    kept = [name for name in wanted if name in names]
    dropped = [name for name in wanted if name not in names]
    if dropped:
        log.warning("ssh_persona: asyncssh lacks %s %s; not offered", what, ", ".join(dropped))
    if not kept:
        raise ConfigError("ssh_persona", f"asyncssh supports none of its {what}")
    return kept


def host_keypairs(
    wanted: Sequence[str], host_keys: list[asyncssh.SSHKey]
) -> list[asyncssh.SSHKeyPair]:
    """The host keys as asyncssh key pairs offering only ``wanted``, in its order.

    asyncssh offers every algorithm a key can sign with (for RSA: SHA-1 ``ssh-rsa`` and
    four ssh.com names); OpenSSH offers ``rsa-sha2-512,rsa-sha2-256``. A key pair's
    ``host_key_algorithms`` is what asyncssh puts in its KEXINIT, key by key.
    """
    ranked: list[tuple[int, asyncssh.SSHKeyPair]] = []
    for keypair in asyncssh.load_keypairs(host_keys):
        names = {name.decode() for name in keypair.host_key_algorithms}
        offered = [name for name in wanted if name in names]
        if not offered:
            continue  # a key the persona does not offer
        keypair.host_key_algorithms = [name.encode() for name in offered]
        ranked.append((list(wanted).index(offered[0]), keypair))
    if not ranked:
        raise ConfigError("ssh_persona", "no host key offers any of its host key algorithms")
    return [keypair for _, keypair in sorted(ranked, key=lambda pair: pair[0])]


def server_options(
    config: SensorConfig, host_keys: list[asyncssh.SSHKey]
) -> asyncssh.SSHServerConnectionOptions:
    """Options shared by every attacker connection (zlib inflation bounded: see
    compression; OpenSSH's group exchange: see openssh)."""
    compression.install()
    openssh.install()
    sntrup.install()
    persona = config.persona
    return asyncssh.SSHServerConnectionOptions(
        config=None,
        server_host_keys=host_keypairs(persona.host_key_algs, host_keys),
        # OpenSSH's hostkeys-00@openssh.com after login (UpdateHostKeys).
        send_server_host_keys=True,
        server_version=persona.banner.removeprefix("SSH-2.0-"),
        kex_algs=supported("kex algorithms", persona.kex_algs, get_kex_algs()),
        encryption_algs=supported("ciphers", persona.encryption_algs, get_encryption_algs()),
        mac_algs=supported("MACs", persona.mac_algs, get_mac_algs()),
        compression_algs=supported("compression", persona.compression_algs, get_compression_algs()),
        signature_algs=supported(
            "signature algorithms", persona.signature_algs, get_public_key_algs()
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
