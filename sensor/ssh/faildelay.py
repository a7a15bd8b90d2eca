"""How long OpenSSH 9.2 with Debian's PAM takes to refuse a password, reproduced.

Two waits add up (measured against Debian's sshd: tests/integration/test_stealth_ssh.py):

* pam_unix asks libpam for a 2 s delay, which libpam varies by up to half of itself
  either way (``_pam_compute_delay``: the mean of three pseudo-random draws), before it
  reports the failure;
* sshd then pads every failed request (auth2.c ``ensure_minimum_time_since``) to a
  per-user time, 5 ms plus up to 4.3 ms taken from a hash of a server secret and the user
  name, doubled until it exceeds the time already spent.

So one server refuses one user's passwords in that user's figure times a power of two:
2.35 s again and again for one name, 3.05 s for another, on one Debian server. A sensor
that slept a flat 2 s would refuse every name in exactly the same time.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets

import asyncssh

# libpam's resolution for its random draws (``(seed / 10) % 1000000``).
PAM_DRAWS = 3
PAM_DRAW_RANGE = 1_000_000
# auth2.c: MIN_FAIL_DELAY_SECONDS, plus a 32-bit hash value read as picoseconds.
MIN_FAIL_DELAY = 0.005
HASH_UNITS_PER_SECOND = 1e12


def pam_delay(base: float) -> float:
    """libpam's wait for a failure that asked for ``base`` seconds: base x (0.5 to 1.5)."""
    draws = sum(secrets.randbelow(PAM_DRAW_RANGE) for _ in range(PAM_DRAWS))
    return base * (1.0 + draws / PAM_DRAWS / PAM_DRAW_RANGE - 0.5)


def user_delay(secret: int, username: str) -> float:
    """sshd's ``user_specific_delay``: the shortest a failure for ``username`` takes."""
    digest = hashlib.sha512(f"{secret}{username}".encode(errors="surrogateescape")).digest()
    return MIN_FAIL_DELAY + int.from_bytes(digest[:4], "big") / HASH_UNITS_PER_SECOND


def padding(elapsed: float, minimum: float) -> float:
    """sshd's ``ensure_minimum_time_since``: what is left to wait after ``elapsed``
    seconds, with ``minimum`` doubled until it exceeds them."""
    while minimum < elapsed:
        minimum *= 2
    return minimum - elapsed


def timing_secret(host_keys: list[asyncssh.SSHKey]) -> int:
    """A secret that stays with the sensor's host keys (sshd hashes its private host keys
    the same way), so the per-user times do not change at a restart."""
    digest = hashlib.sha512()
    for key in host_keys:
        digest.update(key.export_private_key())
    return int.from_bytes(digest.digest()[:8], "big")


class FailDelay:
    """The wait before a failed password is answered."""

    def __init__(self, secret: int, pam_base: float) -> None:
        self._secret = secret
        self._pam_base = pam_base

    async def wait(self, started: float, username: str) -> None:
        """Wait as PAM then sshd would for a password request that arrived at ``started``
        (the event loop's clock)."""
        if self._pam_base:
            await asyncio.sleep(pam_delay(self._pam_base))
        await self.pad(started, username)

    async def pad(self, started: float, username: str) -> None:
        """Wait as sshd alone does (for any failed request but "none": a refused key)."""
        elapsed = asyncio.get_running_loop().time() - started
        await asyncio.sleep(padding(elapsed, user_delay(self._secret, username)))
