"""SSH personas: the OpenSSH server, as one distribution ships and configures it, that the
SSH frontend plays.

A persona fixes in one place everything a client or scanner sees of the server before
and around a login: the banner with the distribution's patch level, every KEXINIT list
in order, host keys, ext-info, auth methods, the wait before a failed password is
refused, the failure limit and its disconnect, the grace time, the answers to bad first
lines and the refusal past the connection limit. ``ssh_persona`` names one (default
``debian-12``); tests/integration/test_stealth_ssh.py compares it with the real server.

Only the stock server is played: a persona is what ``apt install openssh-server`` gives
with the package's own sshd_config, which is what scanners see most.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostKey:
    """A host key the server has: its file name, asyncssh algorithm, RSA size."""

    file: str
    algorithm: str
    bits: int | None = None


@dataclass(frozen=True)
class Persona:
    """One OpenSSH release as one distribution ships it."""

    name: str
    """The ``ssh_persona`` value that selects it."""
    package: str
    """The package (and version) it was read from, for people."""
    banner: str
    """The identification string, with the distribution's patch level."""
    kex_algs: tuple[str, ...]
    """KEXINIT key exchange list, in order (``sntrup761x25519-sha512``: sensor/ssh/sntrup.py)."""
    extra_kex_algs: tuple[str, ...]
    """Pseudo-algorithms appended to the kex list (strict kex, ext-info)."""
    encryption_algs: tuple[str, ...]
    """KEXINIT ciphers, in order (both directions)."""
    mac_algs: tuple[str, ...]
    """KEXINIT MACs, in order (both directions)."""
    compression_algs: tuple[str, ...]
    """KEXINIT compression, in order (both directions)."""
    host_keys: tuple[HostKey, ...]
    """Host keys, made on first start, in the order sshd loads them."""
    host_key_algs: tuple[str, ...]
    """KEXINIT host key algorithms, in order (each needs one of host_keys)."""
    signature_algs: tuple[str, ...]
    """Accepted for public key auth and sent in ext-info's server-sig-algs."""
    ext_info: tuple[tuple[str, str], ...]
    """ext-info extensions after server-sig-algs, with their values."""
    auth_methods: tuple[str, ...]
    """Auth methods offered: "publickey" and/or "password", in that order (asyncssh's and
    OpenSSH's); keyboard-interactive is not played."""
    auth_fail_delay: float
    """Seconds PAM makes a failed password wait (varied and padded: sensor/ssh/faildelay.py)."""
    max_auth_tries: int
    """Failed attempts per connection; the last one disconnects (MaxAuthTries)."""
    too_many_failures: tuple[int, str]
    """The disconnect code and text at the last failed attempt."""
    login_grace_time: float
    """Seconds to log in before the server closes, silently (LoginGraceTime)."""
    protocol_mismatch: bytes
    """Written after the banner to a first line of another SSH version, then close."""
    invalid_identification: bytes
    """Written after the banner to a first line that is no SSH identification (or too
    long), then close."""
    max_startups: str
    """Unauthenticated connections, start:rate:full (MaxStartups)."""
    max_startups_refusal: bytes
    """Written to a connection past MaxStartups, then a FIN."""
    dh_group_bits: tuple[int, int]
    """The smallest and largest DH group exchange group sent (sensor/ssh/gex.py)."""
    moduli_file: Path
    """Where its DH group exchange primes are (``ssh_moduli_file`` can point elsewhere)."""


DEBIAN_12 = Persona(
    name="debian-12",
    package="openssh-server 1:9.2p1-2+deb12u10 (Debian 12 bookworm, with its Terrapin fix)",
    banner="SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10",
    kex_algs=(
        "sntrup761x25519-sha512",
        "sntrup761x25519-sha512@openssh.com",
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
        "ecdh-sha2-nistp256",
        "ecdh-sha2-nistp384",
        "ecdh-sha2-nistp521",
        "diffie-hellman-group-exchange-sha256",
        "diffie-hellman-group16-sha512",
        "diffie-hellman-group18-sha512",
        "diffie-hellman-group14-sha256",
    ),
    # 9.2 with Debian's backported Terrapin fix: strict kex, but not 9.6's ext-info-s.
    extra_kex_algs=("kex-strict-s-v00@openssh.com",),
    encryption_algs=(
        "chacha20-poly1305@openssh.com",
        "aes128-ctr",
        "aes192-ctr",
        "aes256-ctr",
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
    ),
    mac_algs=(
        "umac-64-etm@openssh.com",
        "umac-128-etm@openssh.com",
        "hmac-sha2-256-etm@openssh.com",
        "hmac-sha2-512-etm@openssh.com",
        "hmac-sha1-etm@openssh.com",
        "umac-64@openssh.com",
        "umac-128@openssh.com",
        "hmac-sha2-256",
        "hmac-sha2-512",
        "hmac-sha1",
    ),
    compression_algs=("none", "zlib@openssh.com"),
    host_keys=(
        HostKey("ssh_host_rsa_key", "ssh-rsa", 3072),
        HostKey("ssh_host_ecdsa_key", "ecdsa-sha2-nistp256"),
        HostKey("ssh_host_ed25519_key", "ssh-ed25519"),
    ),
    # No SHA-1 ssh-rsa, none of the ssh.com names asyncssh would add.
    host_key_algs=("rsa-sha2-512", "rsa-sha2-256", "ecdsa-sha2-nistp256", "ssh-ed25519"),
    signature_algs=(
        "ssh-ed25519",
        "sk-ssh-ed25519@openssh.com",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "webauthn-sk-ecdsa-sha2-nistp256@openssh.com",
        "ssh-dss",
        "ssh-rsa",
        "rsa-sha2-256",
        "rsa-sha2-512",
    ),
    ext_info=(("publickey-hostbound@openssh.com", "0"),),
    # Debian's sshd_config: KbdInteractiveAuthentication no.
    auth_methods=("publickey", "password"),
    auth_fail_delay=2.0,  # pam_unix
    max_auth_tries=6,
    too_many_failures=(2, "Too many authentication failures"),  # SSH2_DISCONNECT_PROTOCOL_ERROR
    login_grace_time=120.0,
    protocol_mismatch=b"Protocol major versions differ.\r\n",
    invalid_identification=b"Invalid SSH identification string.\r\n",
    max_startups="10:30:100",
    max_startups_refusal=b"Exceeded MaxStartups\r\n",
    dh_group_bits=(2048, 8192),  # dh.h DH_GRP_MIN, DH_GRP_MAX
    moduli_file=Path("/etc/ssh/moduli"),
)

PERSONAS = {persona.name: persona for persona in (DEBIAN_12,)}
DEFAULT = DEBIAN_12.name


def persona_name(value: str) -> str | None:
    """Check for the ``ssh_persona`` key: a known persona."""
    if value in PERSONAS:
        return None
    return f"unknown persona {value!r}; known: {', '.join(sorted(PERSONAS))}"
