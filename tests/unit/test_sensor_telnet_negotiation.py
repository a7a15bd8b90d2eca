"""The negotiation guard: options seen once, subnegotiations, bounds, compression refused."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from sensor.config import SensorConfig
from sensor.telnet.client import ClientInfo
from sensor.telnet.negotiation import NegotiationGuard, NegotiationViolation

IAC, SB, SE, WILL, WONT, DO, DONT = 255, 250, 240, 251, 252, 253, 254
NAWS, TTYPE, NEW_ENVIRON, MCCP2, MCCP3 = 31, 24, 39, 86, 87
ENVIRON_IS = bytes([IAC, SB, NEW_ENVIRON, 0])
ENVIRON = ENVIRON_IS + b"\x00USER\x01root\x00TERM\x01xterm\x03X\x01y" + bytes([IAC, SE])


def guard(**bounds: int) -> tuple[NegotiationGuard, list[bytes]]:
    seen: list[bytes] = []
    limits = {"max_subnegotiation": 256, "max_negotiations": 20, **bounds}
    return NegotiationGuard(**limits, on_subnegotiation=seen.append), seen


STREAM = (
    b"hello"
    + bytes([IAC, WILL, TTYPE, IAC, WILL, NAWS, IAC, DO, 1, IAC, WILL, TTYPE])
    + bytes([IAC, SB, NAWS, 0, 80, 0, IAC, IAC, IAC, SE])
    + b"data \xff\xff more"
    + ENVIRON
    + bytes([IAC, 241, IAC, WONT, 99])
)


@pytest.mark.parametrize("split", range(len(STREAM) + 1))
def test_options_are_kept_once_in_order_and_subnegotiations_handed_over(split: int) -> None:
    scanner, seen = guard()
    scanner.feed(STREAM[:split])
    scanner.feed(STREAM[split:])
    assert list(scanner.options) == ["WILL TTYPE", "WILL NAWS", "DO ECHO", "WONT 99"]
    assert seen == [bytes([IAC, SB, NAWS, 0, 80, 0, IAC, IAC, IAC, SE]), ENVIRON]
    # Five option commands and one subnegotiation count; window sizes do not.
    assert scanner.negotiations == 6


def test_a_subnegotiation_that_never_ends_is_cut_off_at_its_bound() -> None:
    scanner, _ = guard(max_subnegotiation=64)
    scanner.feed(bytes([IAC, SB, TTYPE, 0]) + b"x" * 60)
    with pytest.raises(NegotiationViolation, match="longer than 64"):
        scanner.feed(b"x" * 10)


def test_an_option_ping_pong_is_cut_off() -> None:
    scanner, _ = guard(max_negotiations=10)
    scanner.feed(bytes([IAC, WILL, 1, IAC, WONT, 1] * 5))
    with pytest.raises(NegotiationViolation, match="more than 10 option negotiations"):
        scanner.feed(bytes([IAC, DO, 3]))


def test_window_size_updates_are_not_counted() -> None:
    scanner, seen = guard(max_negotiations=1)
    for width in range(100):
        scanner.feed(bytes([IAC, SB, NAWS, 0, width, 0, 24, IAC, SE]))
    assert len(seen) == 100 and scanner.negotiations == 0


@pytest.mark.parametrize("option", [MCCP2, MCCP3])
def test_compression_started_by_the_peer_is_refused(option: int) -> None:
    scanner, _ = guard()
    scanner.feed(bytes([IAC, WILL, option]))  # asking is allowed (and refused by telnetlib3)
    with pytest.raises(NegotiationViolation, match="without agreement"):
        scanner.feed(bytes([IAC, SB, option, IAC, SE]) + b"\x78\x9c")


def test_a_broken_subnegotiation_ends_and_the_command_after_it_counts() -> None:
    scanner, seen = guard()
    scanner.feed(bytes([IAC, SB, TTYPE, 0, 65, IAC, WILL, NAWS]) + b"text")
    assert seen == [] and list(scanner.options) == ["WILL NAWS"]


def username(regex: str, raw: bytes) -> bytes | None:
    found = re.compile(regex.encode("latin-1"), re.DOTALL).search(raw)
    return None if found is None else found.group(2)


def test_the_default_username_expression_takes_user_from_new_environ() -> None:
    default = SensorConfig().telnet_username_in_negotiation_regex
    assert username(default, ENVIRON) == b"root"
    only_user = ENVIRON_IS + b"\x00USER\x01-f root" + bytes([IAC, SE])
    assert username(default, only_user) == b"-f root"
    assert username(default, ENVIRON_IS + b"\x00TERM\x01xterm" + bytes([IAC, SE])) is None
    # Cowrie's own expression works too (it runs on to the next IAC).
    cowrie = r"(.*\xff\xfa.*USER\x01)(.*?)(\xff.*)"
    assert username(cowrie, only_user) == b"-f root"


def test_window_sizes_with_escaped_bytes_are_free_but_empty_and_oversized_ones_count() -> None:
    scanner, seen = guard(max_negotiations=2)
    # 65535 x 65535: every size byte doubled, the longest well-formed NAWS.
    scanner.feed(bytes([IAC, SB, NAWS] + [IAC, IAC] * 4 + [IAC, SE]))
    assert len(seen) == 1 and scanner.negotiations == 0
    scanner.feed(bytes([IAC, SB, IAC, SE]))  # empty
    # One byte longer than the longest well-formed one.
    scanner.feed(bytes([IAC, SB, NAWS] + [IAC, IAC] * 4 + [0, IAC, SE]))
    assert scanner.negotiations == 2
    with pytest.raises(NegotiationViolation, match="more than 2 option negotiations"):
        scanner.feed(bytes([IAC, SB, IAC, SE]))


# Cubic for Cowrie's expression (seconds of blocked event loop at 4000 bytes).
HOSTILE = b"\xff\xff\xfa" * 1333


def test_oversized_window_sizes_hit_the_negotiation_bound() -> None:
    scanner, _ = guard(max_subnegotiation=4096, max_negotiations=3)
    flood = bytes([IAC, SB, NAWS]) + HOSTILE + bytes([IAC, SE])
    scanner.feed(flood * 3)
    with pytest.raises(NegotiationViolation, match="more than 3 option negotiations"):
        scanner.feed(flood)


class Emitted:
    """Records the events ClientInfo emits."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def emit(self, eventid: str, template: str, **fields: object) -> None:
        self.ids.append(eventid)


def client(regex: str | None = None) -> ClientInfo:
    config = SensorConfig()
    if regex is not None:
        config = replace(config, telnet_username_in_negotiation_regex=regex)
    return ClientInfo(config, Emitted())  # type: ignore[arg-type]


def test_the_username_is_looked_for_only_in_environment_subnegotiations() -> None:
    # An expression that would match anything: only ENVIRON (36) and NEW-ENVIRON (39)
    # subnegotiations are searched, not whatever else an attacker sends.
    info = client(r"(.)(.+)")
    info.guard.feed(bytes([IAC, SB, TTYPE, 0]) + b"xterm" + bytes([IAC, SE]))
    info.guard.feed(bytes([IAC, SB, NAWS]) + HOSTILE[:8] + bytes([IAC, SE]))
    info.guard.feed(bytes([IAC, SB, IAC, SE]))
    assert info.username is None
    for option in (36, NEW_ENVIRON):
        info = client()
        info.guard.feed(bytes([IAC, SB, option, 0, 0]) + b"USER\x01root" + bytes([IAC, SE]))
        assert info.username == "root"


def test_a_hostile_environment_subnegotiation_yields_no_username() -> None:
    hostile = ENVIRON_IS + HOSTILE + bytes([IAC, SE])
    assert username(SensorConfig().telnet_username_in_negotiation_regex, hostile) is None
    info = client()
    info.guard.feed(hostile)
    assert info.username is None and info.guard.negotiations == 1
