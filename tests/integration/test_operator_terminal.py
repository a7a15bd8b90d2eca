"""Attacker strings reach the operator's terminal escaped: the real CLI, a real controller.

An attacker chooses usernames, passwords, commands and client versions. Shown raw, their
escape sequences would erase lines, forge event lines, set the window title or write the
clipboard (OSC 52), bidi overrides would reorder the text, and rich would render
``[link=...]`` markup. Every human-readable output must show them as visible escapes,
with markup inert, while ``--json`` stays exact.
"""

from __future__ import annotations

import asyncio
import json

from honeyfleet.events import Event
from honeyfleet.pki.identity import Role
from honeyfleet.termtext import shown
from tests.conftest import ControllerFactory, FleetPki
from tests.integration.test_events_ingest import RPC_TIMEOUT, batches, session_events, stream_all
from tests.integration.test_fleet_tools import BIN, run

LINK = "[link=https://evil.example/]x[/link]"
USERNAME = "root\x1b[2K\x1b[1A" + LINK  # erase the line, move up; markup
PASSWORD = "\x1b]52;c;cHduZWQ=\x07\x9b31m\x9c"  # OSC 52 clipboard write; C1 CSI and ST
COMMAND = "\x1b]0;owned\x1b\\ls\rforged \u202egnp.exe\u202c \u2066x\u2069"  # title, CR, bidi
VERSION = "SSH-2.0-\x1b[31mred\x85"  # SGR; C1 NEL


def hostile_session() -> list[Event]:
    """One session whose attacker-chosen fields are all hostile."""
    events = session_events("edge1", "198.51.100.66", username=USERNAME, password=PASSWORD)
    by_id = {e["eventid"]: e for e in events}
    by_id["cowrie.client.version"].update(version=VERSION, message=f"Remote SSH version: {VERSION}")
    by_id["cowrie.command.input"].update(input=COMMAND, message=f"CMD: {COMMAND}")
    return events


def assert_harmless(out: str) -> None:
    """Every line holds printable characters only (no ESC, CR, C1, bidi...)."""
    for line in out.splitlines():
        assert line.isprintable(), repr(line)
    assert "\r" not in out


async def test_events_and_sessions_show_attacker_strings_escaped(
    start_controller: ControllerFactory, fleet_pki: FleetPki
) -> None:
    _, address = await start_controller()
    admin = fleet_pki.files(Role.ADMIN, "alice")
    flags = ["--controller", address, "--ca", str(admin.ca), "--cert", str(admin.cert)]
    flags += ["--key", str(admin.key)]
    honeyfleet = str(BIN / "honeyfleet")

    # `events tail` sees the session arrive, as a human line and as exact JSON.
    tails = {}
    for fmt in ("text", "json"):
        tails[fmt] = await asyncio.create_subprocess_exec(
            honeyfleet, "events", "tail", *flags, *(["--json"] if fmt == "json" else []),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    events = hostile_session()
    try:
        for tail in tails.values():
            assert tail.stderr is not None
            watching = await asyncio.wait_for(tail.stderr.readline(), RPC_TIMEOUT)
            assert "watching events" in watching.decode()
        await stream_all(fleet_pki, address, "edge1", batches(events))
        lines = {}
        for fmt, tail in tails.items():
            assert tail.stdout is not None
            lines[fmt] = [
                (await asyncio.wait_for(tail.stdout.readline(), RPC_TIMEOUT)).decode()
                for _ in events
            ]
    finally:
        for tail in tails.values():
            tail.terminate()
            await asyncio.wait_for(tail.wait(), RPC_TIMEOUT)
    assert [json.loads(line) for line in lines["json"]] == events
    text = "".join(lines["text"])
    assert_harmless(text)
    assert f"CMD: {shown(COMMAND)}" in text
    assert "\\x1b]0;owned\\x1b\\\\ls\\rforged \\u202egnp.exe" in text
    assert f"login attempt [{shown(USERNAME)}/{shown(PASSWORD)}] succeeded" in text
    assert "\\x1b]52;c;cHduZWQ=\\x07\\x9b31m\\x9c" in text

    session = events[0]["session"]
    code, out, err = await run(honeyfleet, "sessions", "show", session, *flags)
    assert code == 0, err
    assert_harmless(out)
    assert f"user:     {shown(USERNAME)} after 2 login attempts" in out
    assert f"client:   {shown(VERSION)}" in out
    assert "SSH-2.0-\\x1b[31mred\\x85" in out
    code, out, err = await run(honeyfleet, "sessions", "show", session, *flags, "--json")
    assert code == 0, err
    # Exact: Cowrie's JSON keeps non-ASCII raw (NEL, bidi), so split on "\n" alone.
    assert [json.loads(line) for line in out.rstrip("\n").split("\n")] == events

    # Tables: rich must print the markup as text, not make a link of it.
    code, out, err = await run(honeyfleet, "sessions", "list", *flags)
    assert code == 0, err
    assert_harmless(out)
    assert LINK in out
    code, out, err = await run(honeyfleet, "sessions", "list", *flags, "--json")
    assert code == 0, err
    assert json.loads(out)["username"] == USERNAME
    code, out, err = await run(honeyfleet, "events", "stats", *flags)
    assert code == 0, err
    assert_harmless(out)
    assert shown(USERNAME) in out  # the markup, as text
    code, out, err = await run(honeyfleet, "events", "stats", *flags, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert {"key": PASSWORD, "count": "1"} in stats["topPasswords"]
