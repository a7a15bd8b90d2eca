"""A login history for the Debian guest: ``last`` and sshd's "Last login" of a used server.

A freshly installed system has an empty ``/var/log/wtmp`` and ``lastlog``: ``last``
prints nothing but its own boots, and the first SSH login says nothing about a previous
one, which tells a visitor the machine was made yesterday. The image gets the two weeks
before its build instead: the installation's boot, and its administrator's sessions
from two addresses of the persona's office network, in glibc's x86-64 record formats.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass
from pathlib import Path

# glibc's struct utmp on x86-64 (384 bytes): type, pid, line, id, user, host, exit status,
# session, time (seconds, microseconds), address (IPv4 in the first word), reserved.
_UTMP = struct.Struct("<h2xi32s4s32s256shhiii4s12x20x")
# struct lastlog (292 bytes), one per uid at offset uid * size: time, line, host.
_LASTLOG = struct.Struct("<i32s256s")
BOOT_TIME, USER_PROCESS, DEAD_PROCESS = 2, 7, 8
_DAY = 86400
# The persona's administrators connect from these (the office network behind its VPN).
ADMIN_HOSTS = ("10.20.0.14", "10.20.0.23")
_UTMP_GID = 43  # the utmp group of Debian's base-passwd


@dataclass(frozen=True)
class Session:
    """One SSH login of ``user`` on ``line`` from ``host``, ``start`` to ``end`` (epoch s)."""

    user: str
    line: str
    host: str
    start: int
    end: int


def sessions(users: list[str], now: int, seed: str) -> list[Session]:
    """About every day or two of the last two weeks, one of ``users`` logged in a while."""
    rng = random.Random(seed)  # noqa: S311 (set dressing, not a secret)
    out: list[Session] = []
    start = now - 14 * _DAY + rng.randrange(_DAY)
    while start < now - 3600:
        length = rng.randrange(4 * 60, 50 * 60)
        out.append(
            Session(rng.choice(users), "pts/0", rng.choice(ADMIN_HOSTS), start, start + length)
        )
        start += rng.randrange(_DAY // 2, 2 * _DAY)
    return out


def _utmp(kind: int, pid: int, line: str, user: str, host: str, when: int) -> bytes:
    """One wtmp record."""
    address = bytes(int(part) for part in host.split(".")) if host.count(".") == 3 else b""
    return _UTMP.pack(
        kind, pid, line.encode(), line.encode()[-4:], user.encode(),
        host.encode(), 0, 0, 0, when, 0, address,
    )  # fmt: skip


def wtmp(history: list[Session], booted: int, kernel: str) -> bytes:
    """The boot at installation, then each session's login and logout records."""
    out = [_utmp(BOOT_TIME, 0, "~", "reboot", kernel, booted)]
    for pid, s in enumerate(history, start=1400):
        out.append(_utmp(USER_PROCESS, pid * 3, s.line, s.user, s.host, s.start))
        out.append(_utmp(DEAD_PROCESS, pid * 3, s.line, "", "", s.end))
    return b"".join(out)


def lastlog(history: list[Session], uids: dict[str, int]) -> bytes:
    """Each user's last session at their uid's slot (the file is sparse on a real system)."""
    last = {s.user: s for s in history}
    size = (max(uids[u] for u in last) + 1) * _LASTLOG.size if last else 0
    out = bytearray(size)
    for user, s in last.items():
        offset = uids[user] * _LASTLOG.size
        out[offset : offset + _LASTLOG.size] = _LASTLOG.pack(
            s.start, s.line.encode(), s.host.encode()
        )
    return bytes(out)


def seed(root: Path, users: list[str], now: int, kernel: str, seed_text: str) -> None:
    """Write ``var/log/wtmp`` and ``var/log/lastlog`` of ``root`` for ``users``."""
    uids = {
        fields[0]: int(fields[2])
        for fields in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())
    }
    history = sessions(users, now, seed_text)
    booted = history[0].start - 3 * 3600 if history else now
    for name, content in (
        ("wtmp", wtmp(history, booted, kernel)),
        ("lastlog", lastlog(history, uids)),
    ):
        path = root / "var/log" / name
        path.write_bytes(content)
        path.chmod(0o664)
        os.chown(path, 0, _UTMP_GID)
