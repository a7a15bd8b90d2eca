"""`shown` escapes what a terminal would act on; status tables print it inert."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from honeyfleet.status import render
from honeyfleet.termtext import shown
from honeyfleet.v1 import fleet_pb2, lease_pb2

HOSTILE = "\x1b]52;c;cHduZWQ=\x07[link=https://evil.example/]x[/link]\x9b2J\u202e"


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("uname -a; ls ~/ü", "uname -a; ls ~/ü"),  # printable text is left alone
        ("\x1b[2K\x1b[1A", "\\x1b[2K\\x1b[1A"),  # erase line, cursor up
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # window title
        ("ok\rforged\n\t", "ok\\rforged\\n\\t"),
        ("\x7f\x85\x9b\x9d\x9c", "\\x7f\\x85\\x9b\\x9d\\x9c"),  # DEL, C1 NEL, CSI, OSC, ST
        ("\u202eexe.txt\u202c\u2066\u2069\u200f", "\\u202eexe.txt\\u202c\\u2066\\u2069\\u200f"),
        ("a\u2028b\u00a0c\U000e0041", "a\\u2028b\\xa0c\\U000e0041"),  # separators, tags
        ("C:\\x1b", "C:\\\\x1b"),  # a typed backslash cannot pass for an escape
        ("[link=https://evil.example/]x[/link]", "[link=https://evil.example/]x[/link]"),
    ],
)
def test_shown_makes_every_control_visible(raw: str, escaped: str) -> None:
    assert shown(raw) == escaped
    assert shown(raw).isprintable()


def test_status_tables_print_hostile_strings_inert() -> None:
    state = {
        "pool_nodes": [fleet_pb2.PoolNode(name=HOSTILE, address=HOSTILE, labels={"k": HOSTILE})],
        "sensors": [fleet_pb2.Sensor(name=HOSTILE, version=HOSTILE, listen_addresses=[HOSTILE])],
        "leases": [lease_pb2.Lease(id="L1", sensor=HOSTILE, src_ip=HOSTILE, session=HOSTILE)],
        "stats": fleet_pb2.GetFleetStatsResponse(),
    }
    out = io.StringIO()
    # A terminal that renders links and colours: rich's own styling is all it may emit.
    render(state, Console(file=out, force_terminal=True, width=400, color_system="truecolor"))
    text = out.getvalue()
    assert "\x1b]" not in text  # neither the attacker's OSC 52 nor a rich OSC 8 link
    assert not any(c in text for c in "\x07\x9b\u202e")
    assert shown(HOSTILE) in text
