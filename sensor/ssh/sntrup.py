"""``sntrup761x25519-sha512``: the first kex OpenSSH 9.2 offers, for asyncssh without liboqs.

asyncssh implements OpenSSH's hybrid (Streamlined NTRU Prime 761 + X25519, SHA-512) but
takes the NTRU Prime half only from liboqs, which Debian 12 does not package (and which
PyPI's liboqs-python builds at run time; the one wheel bundling a liboqs.so has sntrup761
disabled). :func:`install` gives asyncssh's own hybrid key exchange the NTRU Prime of the
``pqcrypto`` wheel instead, where asyncssh has none; an OpenSSH 9.2 client negotiates it
with the sensor (tests/integration/test_stealth_ssh.py).
"""

from __future__ import annotations

from hashlib import sha512

from asyncssh.crypto import Curve25519DH
from asyncssh.kex import _kex_handlers, register_kex_alg
from asyncssh.kex_dh import _KexHybridECDH
from pqcrypto.kem import sntrup_761  # type: ignore[import-untyped]

NAMES = (b"sntrup761x25519-sha512", b"sntrup761x25519-sha512@openssh.com")


class Sntrup761:
    """asyncssh's post-quantum half (its ``PQKey`` protocol) over pqcrypto's sntrup761."""

    pubkey_bytes: int = sntrup_761.PUBLIC_KEY_SIZE
    privkey_bytes: int = sntrup_761.SECRET_KEY_SIZE
    ciphertext_bytes: int = sntrup_761.CIPHERTEXT_SIZE
    secret_bytes: int = sntrup_761.SHARED_SECRET_SIZE

    def __init__(self, alg_name: bytes) -> None:
        # asyncssh makes one per key exchange, a server's too, which only encapsulates
        # to the client's key: its key pair (12 ms of CPU) is made when first needed.
        self._pair: tuple[bytes, bytes] | None = None

    def _keys(self) -> tuple[bytes, bytes]:
        """Our key pair (public, secret), made on first use (a client's side)."""
        if self._pair is None:
            self._pair = sntrup_761.keygen()
        return self._pair

    def get_public(self) -> bytes:
        """Our public key (a client's side)."""
        return bytes(self._keys()[0])

    def encaps(self, peer_public: bytes) -> tuple[bytes, bytes]:
        """A fresh secret encrypted to the client's key: (secret, ciphertext)."""
        if len(peer_public) != self.pubkey_bytes:
            raise ValueError("Invalid public key")
        ciphertext, secret = sntrup_761.encaps(peer_public)
        return bytes(secret), bytes(ciphertext)

    def decaps(self, ciphertext: bytes) -> bytes:
        """The secret in a server's ciphertext (a client's side)."""
        if len(ciphertext) != self.ciphertext_bytes:
            raise ValueError("Invalid ciphertext")
        return bytes(sntrup_761.decaps(self._keys()[1], ciphertext))


def install() -> None:
    """Register the hybrid under OpenSSH's names, unless asyncssh has it (from liboqs);
    not among asyncssh's defaults, so only the persona's list offers it."""
    for name in NAMES:
        if name not in _kex_handlers:
            register_kex_alg(
                name, _KexHybridECDH, sha512, (Sntrup761, b"sntrup761", Curve25519DH), False
            )
