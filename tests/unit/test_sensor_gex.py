"""OpenSSH 9.2's choice of DH group-exchange group (sensor.ssh.gex)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sensor.ssh.gex import FALLBACK, Group, GroupChooser, load_moduli, parse_moduli
from sensor.ssh_persona import DEBIAN_12

# The sizes of Debian 12's /etc/ssh/moduli (as OpenSSH reads them: the file's field + 1).
DEBIAN_SIZES = (2048, 3072, 4096, 6144, 7680, 8192)
DEBIAN = GroupChooser([Group(bits, 2, bits) for bits in DEBIAN_SIZES], DEBIAN_12.dh_group_bits)


@pytest.mark.parametrize(
    ("request_bits", "bits"),
    [
        # Measured against Debian 12's sshd (tests/integration/test_stealth_ssh.py).
        ((1024, 1024, 1024), None),
        ((1024, 1024, 2048), 2048),
        ((1024, 2048, 8192), 2048),
        ((2048, 3072, 8192), 3072),
        ((2048, 4096, 8192), 4096),
        ((2048, 5000, 8192), 6144),
        ((2048, 7680, 8192), 7680),
        ((2048, 6144, 7000), 6144),
        ((1024, 1536, 8192), 2048),
        ((2048, 2049, 8192), 3072),
        ((3000, 3000, 3000), 2048),  # no prime in range: group 14
        ((1024, 16384, 16384), 8192),
        ((2048, 9000, 8192), None),  # preferred above maximum
        ((4096, 2048, 8192), None),  # preferred below minimum
    ],
)
def test_the_group_is_the_one_debians_sshd_picks(
    request_bits: tuple[int, int, int], bits: int | None
) -> None:
    group = DEBIAN.choose(*request_bits)
    assert (group.bits if group else None) == bits


def test_never_under_2048_bits_even_without_moduli() -> None:
    bare = GroupChooser([], DEBIAN_12.dh_group_bits)
    assert bare.choose(1024, 1024, 2048) == FALLBACK[2048]
    assert bare.choose(1024, 2048, 4096) == FALLBACK[4096]
    assert bare.choose(1024, 2048, 8192) == FALLBACK[8192]


def test_moduli_lines_are_read_as_openssh_reads_them(tmp_path: Path) -> None:
    prime = FALLBACK[2048].p
    good = f"20230101000000 2 6 100 2047 2 {prime:X}"
    text = "\n".join(
        [
            "# comment",
            good,
            f"20230101000000 2 7 100 2047 2 {prime:X}",  # marked composite
            f"20230101000000 2 6 0 2047 2 {prime:X}",  # never tried
            f"20230101000000 4 6 100 2047 2 {prime:X}",  # not a safe prime
            f"20230101000000 2 6 100 3071 2 {prime:X}",  # size does not match the prime
            "20230101000000 2 6 100 2047 2 XYZ",
        ]
    )
    assert parse_moduli(text) == [Group(2048, 2, prime)]
    assert load_moduli(tmp_path / "missing") == []
    assert load_moduli(None) == []
