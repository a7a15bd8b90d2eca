"""The sensor's Telnet frontend next to Debian 12's inetutils telnetd: how each negotiates.

Both on loopback (telnetd under an inetd-like wrapper, tests/debian_telnetd.py); each
probe (a silent client, one that refuses every option, one that agrees to every option
but answers no subnegotiation) must see the same
rounds of option commands from both, except for ``KNOWN_DIFFERENCES``, each with why it
remains; a new difference (or one that went away) fails the test. The text shown (the
greeting) is the persona's business and not compared, only whether there is any.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import bounded
from tests.debian_telnetd import DebianTelnetd
from tests.integration.test_sensor_telnet import Fleet
from tests.integration.test_sensor_telnet import fleet as fleet
from tests.telnetprobe import AGREE, REFUSE, negotiate

FIRST_ROUND = [
    "WILL AUTHENTICATION", "WILL ENCRYPT", "DO TTYPE", "DO TSPEED", "DO XDISPLOC",
    "DO NEW_ENVIRON", "DO 36",
]  # fmt: skip
SECOND_ROUND = ["WILL SGA", "DO ECHO", "DO LINEMODE", "DO NAWS", "WILL STATUS", "DO LFLOW"]
# probe: (telnetd's rounds, the sensor's rounds). The silent client sees the same from both.
KNOWN_DIFFERENCES = {
    # telnetd waits for the answers to its subnegotiations for ever; the sensor goes on
    # NEGOTIATION_WAIT after the client first spoke, so a bot that ignores them still
    # gets a login prompt (and gives its credentials). telnetlib3 asks for subnegotiations
    # in the order the client agreed (telnetd: speed, display, environment, terminal),
    # names the NEW-ENVIRON variable types it wants (telnetd: none, meaning all) and
    # refuses OLD-ENVIRON (telnetd takes it and never uses it).
    "agrees to everything": (
        [FIRST_ROUND, ["SB TSPEED 01", "SB XDISPLOC 01", "SB NEW_ENVIRON 01", "SB TTYPE 01"]],
        [
            FIRST_ROUND,
            ["SB TTYPE 01", "SB TSPEED 01", "SB XDISPLOC 01", "SB NEW_ENVIRON 010003", "DONT 36"],
            [*SECOND_ROUND, "WILL ECHO", "DO BINARY"],
        ],
    ),
    # telnetd probes a client that refused LINEMODE for kludge line mode (DO TM) and asks
    # again for SGA and ECHO once refused; the sensor takes the refusals and shows its
    # login prompt (the last round: text, no commands).
    "refuses everything": (
        [FIRST_ROUND, SECOND_ROUND, ["WILL ECHO", "DO TM", "DO BINARY"], ["WILL SGA", "WILL ECHO"]],
        [FIRST_ROUND, SECOND_ROUND, ["WILL ECHO", "DO BINARY"], []],
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
