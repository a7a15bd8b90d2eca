"""The Debian guest's login history, read back as glibc's record formats."""

from __future__ import annotations

import struct

from poolnode.image._logins import ADMIN_HOSTS, lastlog, sessions, wtmp

NOW = 1_796_000_000
UTMP = struct.Struct("<h2xi32s4s32s256shhiii4s12x20x")
LASTLOG = struct.Struct("<i32s256s")


def text(field: bytes) -> str:
    return field.rstrip(b"\0").decode()


def test_two_weeks_of_sessions_from_the_office_before_the_build() -> None:
    history = sessions(["deploy", "root"], NOW, "srv04")
    assert len(history) >= 7
    assert all(NOW - 15 * 86400 < s.start < s.end < NOW for s in history)
    assert {s.host for s in history} <= set(ADMIN_HOSTS)
    assert history == sessions(["deploy", "root"], NOW, "srv04")  # same persona, same past


def test_wtmp_holds_the_boot_then_a_login_and_logout_per_session() -> None:
    history = sessions(["root"], NOW, "srv04")
    data = wtmp(history, history[0].start - 60, "6.1.0-57-amd64")
    assert len(data) == UTMP.size * (1 + 2 * len(history)) and UTMP.size == 384
    records = [UTMP.unpack_from(data, i) for i in range(0, len(data), UTMP.size)]
    boot = records[0]
    assert (boot[0], text(boot[4]), text(boot[5])) == (2, "reboot", "6.1.0-57-amd64")
    login, logout = records[1], records[2]
    first = history[0]
    assert (login[0], text(login[2]), text(login[4]), text(login[5])) == (
        7, "pts/0", "root", first.host,
    )  # fmt: skip
    assert login[9] == first.start and login[11] == bytes(int(p) for p in first.host.split("."))
    assert (logout[0], text(logout[2]), logout[1], logout[9]) == (8, "pts/0", login[1], first.end)


def test_lastlog_has_each_users_last_session_at_its_uid() -> None:
    history = sessions(["deploy", "root"], NOW, "srv04")
    data = lastlog(history, {"root": 0, "deploy": 1000})
    assert len(data) == 1001 * LASTLOG.size
    for user, uid in (("root", 0), ("deploy", 1000)):
        last = [s for s in history if s.user == user][-1]
        when, line, host = LASTLOG.unpack_from(data, uid * LASTLOG.size)
        assert (when, text(line), text(host)) == (last.start, "pts/0", last.host)
