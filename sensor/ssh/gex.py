"""Which Diffie-Hellman group a group-exchange request gets: OpenSSH 9.2's sshd's choice.

OpenSSH (kexgexs.c) refuses a request whose own numbers are inconsistent or whose
maximum is under 2048 bits (it closes the connection), clamps the rest to 2048..8192
(the persona's ``dh_group_bits``: dh.h's DH_GRP_MIN and DH_GRP_MAX) and picks from
``/etc/ssh/moduli`` (dh.c ``choose_dh``): the smallest size at or above the preferred
one within the bounds, else the largest below it, a random prime of that size. With no
usable prime it falls back to RFC 3526 group 14, 16 or 18 by the maximum
(``dh_new_group_fallback``). asyncssh instead answers from its fixed groups and goes down
to 1024 bits, which ssh-audit flags and which no OpenSSH server sends.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# asyncssh's copies of the RFC 3526 groups (bits, g, p): OpenSSH's fallback groups.
from asyncssh.kex_dh import _dh_gex_groups

log = logging.getLogger(__name__)

# moduli(5): type 2 is a safe prime; test bit 0x01 marks a composite; tries must be > 0.
MODULI_TYPE_SAFE = 2
MODULI_TESTS_COMPOSITE = 0x01
MODULI_FIELDS = 7


@dataclass(frozen=True)
class Group:
    """A DH group: its size in bits, generator and prime."""

    bits: int
    g: int
    p: int


FALLBACK = {bits: Group(bits, g, p) for bits, g, p in _dh_gex_groups}


def parse_moduli(text: str) -> list[Group]:
    """The primes of a moduli(5) file that OpenSSH's ``parse_prime`` accepts, in order."""
    groups: list[Group] = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#") or len(fields) != MODULI_FIELDS:
            continue
        try:
            kind, tests, tries, size = (int(fields[i]) for i in (1, 2, 3, 4))
            g, p = int(fields[5], 16), int(fields[6], 16)
        except ValueError:
            continue
        if kind != MODULI_TYPE_SAFE or tests & MODULI_TESTS_COMPOSITE or not tests or not tries:
            continue
        # The size field is the bit count less one ("the whole group is one bit larger").
        if p.bit_length() != size + 1 or g < 2:
            continue
        groups.append(Group(size + 1, g, p))
    return groups


def load_moduli(path: Path | None) -> list[Group]:
    """The primes of ``path`` (None or unreadable: none, so the fallback groups answer)."""
    if path is None:
        return []
    try:
        groups = parse_moduli(path.read_text(encoding="ascii", errors="replace"))
    except OSError as e:
        log.info("no DH moduli from %s (%s): RFC 3526 groups 14/16/18 answer", path, e)
        return []
    log.info("%d DH moduli from %s", len(groups), path)
    return groups


class GroupChooser:
    """OpenSSH's answer to DH group-exchange requests, from a list of primes."""

    def __init__(self, groups: Sequence[Group], bits: tuple[int, int]) -> None:
        self.bits = bits
        self._by_size: dict[int, list[Group]] = {}
        for group in groups:
            self._by_size.setdefault(group.bits, []).append(group)

    def choose(self, minimum: int, preferred: int, maximum: int) -> Group | None:
        """The group for a request, or None where OpenSSH closes the connection."""
        if maximum < minimum or preferred < minimum or maximum < preferred:
            return None
        smallest, largest = self.bits
        if maximum < smallest:
            return None
        low, high = max(smallest, minimum), min(largest, maximum)
        want = min(largest, max(smallest, preferred))
        best = 0
        for size in sorted(self._by_size):
            if size < low or size > high:
                continue
            if (want < size < best) or (size > best and best < want):
                best = size
        if best == 0:
            return fallback(high)
        candidates = self._by_size[best]
        return candidates[secrets.randbelow(len(candidates))]


def fallback(maximum: int) -> Group:
    """OpenSSH's ``dh_new_group_fallback``: group 14, 16 or 18 by the maximum."""
    if maximum < 3072:
        return FALLBACK[2048]
    if maximum < 6144:
        return FALLBACK[4096]
    return FALLBACK[8192]
