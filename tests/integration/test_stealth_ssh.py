"""The sensor next to Debian 12's own sshd: what each says to the same probes.

Both run on loopback: Debian's ``/usr/sbin/sshd`` as the package configures it
(tests/debian_sshd.py) and the sensor with its default persona, which claims to be that
sshd. Each probe's answers must be equal, except for the differences listed in
``KNOWN_DIFFERENCES``, each with why it remains; a new difference (or one that went away)
fails the test, so the list stays true.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

import pytest

from sensor.config import SensorConfig
from sensor.ssh.faildelay import MIN_FAIL_DELAY
from tests import debian_sshd as debian
from tests.conftest import bounded
from tests.debian_sshd import DebianSshd, debian_banner
from tests.integration.ssh_fleet import FleetFactory
from tests.sshprobe import (
    Refusal,
    early_newkeys,
    exchange,
    first_refused,
    gex_group,
    hello,
    login_grace,
    over_limit,
    password_login,
    verbose_login,
    wrong_keys,
    wrong_passwords,
)

log = logging.getLogger(__name__)

# (probe, what differs): Debian's sshd's answer on the left, the sensor's on the right.
KNOWN_DIFFERENCES: set[tuple[str, str]] = set()
# What the sensor's own bounds add, with its defaults, to what Debian 12's sshd does:
# OpenSSH 9.8's PerSourcePenalties (which 9.2 lacks) turn a brute-forcing address away
# after a few failed connections (5 s each, refused from 15 s). Kept on by default: a
# sensor's sessions lease real guests, and one address must not hold them all; a
# patient prober can tell, and `per_source_penalties = false` removes the difference.
BOUNDS_DIFFERENCES = {("penalties", "a brute-forcer turned away: False != True")}
# DH group exchange requests (minimum, preferred, maximum bits): ssh-audit's, OpenSSH
# clients', and the edges of OpenSSH's choice (refusals, clamping, the fallback groups,
# a size between two of its moduli).
GEX_REQUESTS = (
    (1024, 1024, 1024),
    (1024, 1024, 2048),
    (1024, 2048, 8192),
    (2048, 3072, 8192),
    (2048, 4096, 8192),
    (2048, 5000, 8192),
    (2048, 7680, 8192),
    (3000, 3000, 3000),
    (1024, 16384, 16384),
    (2048, 9000, 8192),
)

# Seconds a failed password may take with Debian's PAM and sshd's padding.
PAM_WAITS = (1.0, 6.0)


def list_differences(probe: str, debian: list[str], sensor: list[str]) -> set[tuple[str, str]]:
    """What differs between two lists of names, order included."""
    found = {(probe, f"only OpenSSH offers {name}") for name in debian if name not in sensor}
    found |= {(probe, f"only the sensor offers {name}") for name in sensor if name not in debian}
    common_debian = [name for name in debian if name in sensor]
    common_sensor = [name for name in sensor if name in debian]
    if common_debian != common_sensor:
        found.add((probe, f"order {common_debian} != {common_sensor}"))
    return found


def refusal_differences(probe: str, debian: Refusal, sensor: Refusal) -> set[tuple[str, str]]:
    """What differs in how two servers ended connections that kept failing."""
    return {
        (probe, f"{field}: {getattr(debian, field)!r} != {getattr(sensor, field)!r}")
        for field in ("failures", "code", "reason")
        if getattr(debian, field) != getattr(sensor, field)
    }


@pytest.fixture
async def debian_sshd(tmp_path: Path) -> AsyncIterator[DebianSshd]:
    """Debian's sshd on loopback, stopped afterwards."""
    sshd = DebianSshd(tmp_path / "debian-sshd")
    await sshd.start()
    yield sshd
    await bounded(sshd.stop)


async def test_the_sensor_answers_probes_as_debians_sshd(
    make_fleet: FleetFactory, debian_sshd: DebianSshd
) -> None:
    # The default persona, with the sensor's own defaults where the test fleet shortens
    # them; it claims the installed openssh-server's version (bump the persona's banner
    # with the package).
    fleet = await make_fleet(
        ssh_auth_fail_delay=SensorConfig.ssh_auth_fail_delay,
        login_grace_time=SensorConfig.login_grace_time,
    )
    assert fleet.sensor.config.persona.banner == await debian_banner()
    differences: set[tuple[str, str]] = set()
    # A connection that never logs in waits out the grace time (120 s) while the other
    # probes run.
    graces = asyncio.gather(login_grace(debian_sshd.port), login_grace(fleet.port))

    debian_hello, sensor_hello = await hello(debian_sshd.port), await hello(fleet.port)
    for probe, value in asdict(debian_hello).items():
        if isinstance(value, list):
            differences |= list_differences(probe, value, getattr(sensor_hello, probe))
        elif value != getattr(sensor_hello, probe):
            differences.add((probe, f"{value!r} != {getattr(sensor_hello, probe)!r}"))
    if debian_hello.hassh_server != sensor_hello.hassh_server:
        differences.add(
            ("hasshServer", f"{debian_hello.hassh_server} != {sensor_hello.hassh_server}")
        )

    debian_login, sensor_login = (
        await verbose_login(debian_sshd.port),
        await verbose_login(fleet.port),
    )
    differences |= list_differences("ext_info", debian_login.ext_info, sensor_login.ext_info)
    if debian_login.kex != sensor_login.kex:
        differences.add(("negotiated kex", f"{debian_login.kex} != {sensor_login.kex}"))
    if debian_login.auth_methods != sensor_login.auth_methods:
        differences.add(("auth", f"{debian_login.auth_methods} != {sensor_login.auth_methods}"))

    for first_line in (
        b"SSH-1.5-Cisco-1.25\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        b"A" * 10240 + b"\r\n",
    ):
        theirs = await exchange(debian_sshd.port, first_line)
        ours = await exchange(fleet.port, first_line)
        if theirs != ours:
            differences.add(("first line", f"{first_line[:16]!r}: {theirs!r} != {ours!r}"))

    for request in GEX_REQUESTS:
        theirs_bits = await gex_group(debian_sshd.port, *request)
        ours_bits = await gex_group(fleet.port, *request)
        if theirs_bits != ours_bits:
            differences.add(("gex", f"{request}: {theirs_bits} != {ours_bits}"))

    theirs_newkeys, ours_newkeys = (
        await early_newkeys(debian_sshd.port),
        await early_newkeys(fleet.port),
    )
    if theirs_newkeys != ours_newkeys:
        differences.add(("early NEWKEYS", f"{theirs_newkeys} != {ours_newkeys}"))

    debian_refusal = await wrong_passwords(debian_sshd.port)
    sensor_refusal = await wrong_passwords(fleet.port)
    differences |= refusal_differences("failures", debian_refusal, sensor_refusal)
    # PAM's 2 s varied by up to half either way, padded by sshd to a per-user time
    # doubled (at most once more, for a slow first try): sensor/ssh/faildelay.py.
    theirs_pam, ours_pam = (
        all(PAM_WAITS[0] <= wait <= PAM_WAITS[1] for wait in refusal.waits)
        for refusal in (debian_refusal, sensor_refusal)
    )
    if theirs_pam != ours_pam:
        differences.add(("failures", f"waits like PAM's: {theirs_pam} != {ours_pam}"))

    debian_keys, sensor_keys = await wrong_keys(debian_sshd.port), await wrong_keys(fleet.port)
    differences |= refusal_differences("keys", debian_keys, sensor_keys)
    # sshd pads a refused key to the user's minimum, 5 ms or more (no PAM delay).
    theirs_padded, ours_padded = (
        all(MIN_FAIL_DELAY <= wait < PAM_WAITS[0] for wait in refusal.waits)
        for refusal in (debian_keys, sensor_keys)
    )
    if theirs_padded != ours_padded:
        differences.add(("keys", f"waits padded: {theirs_padded} != {ours_padded}"))

    debian_in = await password_login(
        debian_sshd.port, debian.USER, debian.PASSWORD, debian_sshd.host_keys()
    )
    sensor_in = await password_login(
        fleet.port, "root", "toor", sorted((fleet.state_dir / "keys").glob("ssh_host_*.pub"))
    )
    if debian_in.host_keys != sensor_in.host_keys:
        differences.add(("after login", f"{debian_in.host_keys} != {sensor_in.host_keys}"))
    # A right password must not stand out: answered sooner than a wrong one, as with PAM.
    theirs_sooner = debian_in.seconds < debian_refusal.seconds_per_failure
    ours_sooner = sensor_in.seconds < sensor_refusal.seconds_per_failure
    if theirs_sooner != ours_sooner:
        differences.add(
            ("right password", f"sooner than a wrong one: {theirs_sooner} != {ours_sooner}")
        )

    theirs_refused, ours_refused = await over_limit(debian_sshd.port), await over_limit(fleet.port)
    if theirs_refused != ours_refused:
        differences.add(("over the limit", f"{theirs_refused} != {ours_refused}"))

    theirs_grace, ours_grace = await graces
    if theirs_grace != ours_grace:
        differences.add(("login grace", f"{theirs_grace} != {ours_grace}"))

    log.info(
        "seconds per failed password: Debian %.2f, sensor %.2f; right password: %.2f, %.2f; "
        "per refused key: %.4f, %.4f",
        debian_refusal.seconds_per_failure,
        sensor_refusal.seconds_per_failure,
        debian_in.seconds,
        sensor_in.seconds,
        debian_keys.seconds_per_failure,
        sensor_keys.seconds_per_failure,
    )
    assert differences == KNOWN_DIFFERENCES


async def test_the_sensors_own_bounds_are_its_only_other_difference(
    make_fleet: FleetFactory, debian_sshd: DebianSshd
) -> None:
    # Failed passwords answered at once: penalties run down while PAM's delay passes.
    fleet = await make_fleet(per_source_penalties=SensorConfig.per_source_penalties)
    differences: set[tuple[str, str]] = set()
    theirs = await first_refused(debian_sshd.port) is not None
    ours = await first_refused(fleet.port) is not None
    if theirs != ours:
        differences.add(("penalties", f"a brute-forcer turned away: {theirs} != {ours}"))
    assert differences == BOUNDS_DIFFERENCES
