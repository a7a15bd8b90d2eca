"""The sensor's Telnet frontend next to Debian 12's inetutils telnetd: how each negotiates.

Both on loopback (telnetd under an inetd-like wrapper, tests/debian_telnetd.py). Each
scripted probe (a silent client, one that refuses every option, one that agrees to every
option but answers no subnegotiation) must see the same rounds of option commands from
both, except for ``KNOWN_DIFFERENCES``, each with why it remains; a new difference (or
one that went away) fails the test. Debian's own telnet client (line mode, flow control,
window size, the special characters) must see byte for byte the same negotiation, up to
the greeting. The greeting itself is the persona's business (``telnet_greeting``) and
not compared, only whether there is any; telnetd's names the client by its reverse DNS
name where it has one (here "localhost"), the sensor's by its address (no lookups on
the attacker's behalf), and telnetd's pty number counts up with the sessions open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.conftest import bounded, require_tool
from tests.debian_telnetd import DebianTelnetd
from tests.integration.test_sensor_telnet import Fleet
from tests.integration.test_sensor_telnet import fleet as fleet
from tests.telnetprobe import (
    AGREE,
    REFUSE,
    first_read,
    negotiate,
    nmap_service,
    through_client,
)

FIRST_ROUND = [
    "WILL AUTHENTICATION", "WILL ENCRYPT", "DO TTYPE", "DO TSPEED", "DO XDISPLOC",
    "DO NEW_ENVIRON", "DO 36",
]  # fmt: skip
REQUESTS = ["SB TSPEED 01", "SB XDISPLOC 01", "SB NEW_ENVIRON 01", "SB TTYPE 01"]
THIRD_ROUND = ["WILL SGA", "DO ECHO", "DO LINEMODE", "DO NAWS", "WILL STATUS", "DO LFLOW"]
# probe: (telnetd's rounds, the sensor's rounds). The other probes see the same from both.
KNOWN_DIFFERENCES = {
    # telnetd waits for the answers to its subnegotiations for ever; the sensor goes on
    # NEGOTIATION_WAIT after the client first spoke, so a bot that ignores them still
    # gets a login prompt (and gives its credentials): the rest of its rounds at once
    # (with the kludge line mode probe, DO TM, as LINEMODE was never agreed).
    "agrees to everything": (
        [FIRST_ROUND, REQUESTS],
        [FIRST_ROUND, REQUESTS, [*THIRD_ROUND, "WILL ECHO", "DO TM", "DO BINARY"]],
    ),
}


@pytest.fixture
async def telnetd() -> AsyncIterator[DebianTelnetd]:
    """inetutils telnetd on loopback, stopped afterwards."""
    server = DebianTelnetd()
    await server.start()
    yield server
    await bounded(server.stop)


async def test_the_sensor_negotiates_as_debians_telnetd(
    fleet: Fleet, telnetd: DebianTelnetd
) -> None:
    differences: dict[str, tuple[list[list[str]], list[list[str]]]] = {}
    probes = {
        "silent": {"answers": None},
        "refuses everything": {"answers": REFUSE},
        "agrees to everything": {"answers": AGREE},
    }
    for name, kwargs in probes.items():
        theirs = await negotiate(telnetd.port, **kwargs)  # type: ignore[arg-type]
        ours = await negotiate(fleet.port, **kwargs)  # type: ignore[arg-type]
        if theirs.rounds != ours.rounds:
            differences[name] = (theirs.rounds, ours.rounds)
        if name == "silent":
            # Nothing but the first round: no prompt for a client that says nothing.
            assert theirs.text == ours.text == b""
    assert differences == KNOWN_DIFFERENCES


async def test_debians_telnet_client_sees_the_same_bytes(
    fleet: Fleet, telnetd: DebianTelnetd
) -> None:
    telnet = require_tool("telnet", "inetutils-telnet")
    theirs = await through_client(telnetd.port, telnet)
    ours = await through_client(fleet.port, telnet)
    assert ours.rounds == theirs.rounds
    # What comes before the greeting: the NUL bytes telnetd ends some subnegotiations with.
    assert ours.text.partition(b"\r\n")[0] == theirs.text.partition(b"\r\n")[0] == b"\0\0"


async def test_the_first_round_comes_in_one_segment(fleet: Fleet, telnetd: DebianTelnetd) -> None:
    # telnetd writes a round at once; a round in pieces is what nmap's "Linux telnetd"
    # pattern matches (a read that ends at DO XDISPLOC). Written in pieces, most reads
    # see only the first piece, so a few tries show it.
    theirs = await first_read(telnetd.port)
    assert len(theirs) == 21
    assert [await first_read(fleet.port) for _ in range(5)] == [theirs] * 5


@pytest.mark.timeout(300)
async def test_nmap_tells_them_apart_by_nothing(fleet: Fleet, telnetd: DebianTelnetd) -> None:
    nmap = require_tool("nmap", "nmap")
    theirs, ours = await asyncio.gather(
        nmap_service(telnetd.port, nmap), nmap_service(fleet.port, nmap)
    )
    # Telnet, and no product or OS guess: nmap does not recognise Debian's telnetd.
    assert theirs == {"name": "telnet", "method": "probed"}
    assert ours == theirs
