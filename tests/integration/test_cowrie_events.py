"""Every event of scripted sessions through a real sensor, checked field by field against
Cowrie 3.1.4's (tests/data/cowrie_events.json): event ids, the fields Cowrie always
writes with their JSON types, and the message text.

The sessions are what attackers do: a wrong password, a public key then a password, an
exec, a shell (with an environment variable), SCP and SFTP uploads of the same file,
a direct-tcpip forward, and a Telnet login with a command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import asyncssh

from tests.conftest import ControllerFactory, FleetPki, require_tool, until
from tests.integration.ssh_fleet import SSH_OPTIONS, FleetFactory, run, ssh
from tests.integration.test_sensor_telnet import start_fleet as start_telnet_fleet
from tests.integration.test_sensor_telnet import telnet
from tests.telnetd import Telnetd

REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "cowrie_events.json").read_text())

# What every scripted run below must have produced.
SSH_EVENTS = {
    "cowrie.session.connect",
    "cowrie.client.version",
    "cowrie.client.kex",
    "cowrie.client.fingerprint",
    "cowrie.login.failed",
    "cowrie.login.success",
    "cowrie.session.params",
    "cowrie.client.size",
    "cowrie.client.var",
    "cowrie.command.input",
    "cowrie.session.file_upload",
    "cowrie.log.closed",
    "cowrie.direct-tcpip.request",
    "cowrie.direct-tcpip.data",
    "cowrie.proxy.backend_connected",
    "cowrie.proxy.backend_disconnected",
    "cowrie.proxy.client_disconnect",
    "cowrie.session.closed",
}
TELNET_EVENTS = {
    "cowrie.session.connect",
    "cowrie.login.success",
    "cowrie.session.params",
    "cowrie.client.size",
    "cowrie.command.input",
    "cowrie.log.closed",
    "cowrie.proxy.backend_connected",
    "cowrie.proxy.backend_disconnected",
    "cowrie.proxy.client_disconnect",
    "cowrie.session.closed",
}


def has_type(value: Any, kind: str) -> bool:
    """Whether a JSON value is of the reference's type name."""
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array<string>":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    raise AssertionError(f"unknown type {kind!r} in the reference")


def form_problems(event: dict[str, Any], form: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """How an event departs from one form of its reference (our documented departures
    in ``ours`` applied)."""
    problems = []
    absent = set(ours.get("absent", ()))
    types = {**form["fields"], **ours.get("types", {})}
    for name, kind in types.items():
        if name in absent:
            if name in event:
                problems.append(f"{name} is documented as absent")
        elif name not in event:
            problems.append(f"lacks {name}")
        elif not has_type(event[name], kind):
            problems.append(f"{name} is {event[name]!r}, not {kind}")
    if not problems:
        expected = ours.get("message", form["message"]).format(**event)
        if event["message"] != expected:
            problems.append(f"message {event['message']!r} is not {expected!r}")
    return problems


def problems(event: dict[str, Any]) -> list[str]:
    """How an event departs from Cowrie's (empty: it matches)."""
    found = [
        f"common field {name} is {event.get(name)!r}, not {kind}"
        for name, kind in REFERENCE["common"].items()
        if not has_type(event.get(name), kind)
    ]
    eventid = event["eventid"]
    if eventid.startswith("honeyfleet."):
        return found  # our own events: only the shared fields are Cowrie's
    spec = REFERENCE["events"].get(eventid)
    if spec is None:
        return [*found, "not an event id of Cowrie's"]
    forms = spec.get("variants", [spec])
    each = [form_problems(event, form, spec.get("honeyfleet", {})) for form in forms]
    if all(each):
        found += min(each, key=len)
    return found


def check_all(events: list[dict[str, Any]], expected: set[str]) -> None:
    """Every event matches Cowrie's; every expected kind was seen; one sensor identity."""
    wrong = {
        f"{e['eventid']}: {'; '.join(p)}": e for e in events if (p := problems(e))
    }  # fmt: skip
    assert not wrong, "\n".join(wrong)
    assert expected <= {e["eventid"] for e in events}, expected - {e["eventid"] for e in events}
    assert len({e["uuid"] for e in events}) == 1
    assert len({e["hf_event_id"] for e in events}) == len(events)


async def test_ssh_sessions_write_cowries_events(make_fleet: FleetFactory, tmp_path: Path) -> None:
    fleet = await make_fleet()
    # A wrong password (the userdb refuses root/root).
    code, _, _ = await ssh(fleet, "true", password="root")
    assert code != 0
    # A public key (refused, as every key is), then the password; an exec.
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = tmp_path / "id_ed25519"
    key.write_private_key(str(key_file))
    key_file.chmod(0o600)
    with_key = [
        o.replace("PubkeyAuthentication=no", "PubkeyAuthentication=yes").replace(
            "PreferredAuthentications=password", "PreferredAuthentications=publickey,password"
        )
        for o in SSH_OPTIONS
    ]
    tool = require_tool("ssh", "openssh-client")
    code, out, _ = await run(
        tool, *with_key, "-i", str(key_file), "-p", str(fleet.port), "root@127.0.0.1", "echo in",
        password="toor",
    )  # fmt: skip
    assert (code, out) == (0, b"in\n")
    # A shell, with a variable set.
    code, _, err = await ssh(fleet, "-tt", "-o", "SetEnv=HF_TEST=1", stdin=b"echo hi\nexit\n")
    assert code == 0, err
    # The same file by legacy SCP and by SFTP: the second is a duplicate.
    local = tmp_path / "dropper.sh"
    local.write_bytes(os.urandom(4096))
    scp = require_tool("scp", "openssh-client")
    for mode in ("-O", "-s"):
        code, _, err = await run(
            scp, mode, *SSH_OPTIONS, "-P", str(fleet.port), str(local), "root@127.0.0.1:dropped.sh",
            password="toor",
        )  # fmt: skip
        assert code == 0, err
    # A direct-tcpip forward.
    await ssh(fleet, "-W", "203.0.113.7:80", stdin=b"GET / HTTP/1.0\r\n\r\n")
    await until(lambda: len(fleet.events("cowrie.session.closed")) == 6)
    await until(lambda: len(fleet.events("cowrie.session.file_upload")) == 2)

    events = fleet.events()
    check_all(events, SSH_EVENTS)
    assert events[0]["uuid"] == (fleet.state_dir / "uuid").read_text().strip()
    failed = {e["message"] for e in fleet.events("cowrie.login.failed")}
    assert failed == {
        "login attempt [root/root] failed",
        "public key login attempt for [root] failed",
    }
    # OpenSSH offers no languages: Cowrie splits the empty list as [""].
    assert {tuple(e["langCS"]) for e in fleet.events("cowrie.client.kex")} == {("",)}
    uploads = fleet.events("cowrie.session.file_upload")
    assert [e["duplicate"] for e in uploads] == [False, True]
    # The path written (legacy SCP: the header's name under the target, as Cowrie's).
    assert [(e["url"], e["destfile"]) for e in uploads] == [
        ("dropped.sh/dropper.sh", "dropped.sh/dropper.sh"),
        ("dropped.sh", "dropped.sh"),
    ]


async def test_telnet_sessions_write_cowries_events(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> None:
    async with start_telnet_fleet(fleet_pki, start_controller, tmp_path, Telnetd()) as fleet:
        async with telnet(fleet) as term:
            await term.expect(rb"srv04 login: ")
            term.send(b"root\r")
            await term.expect(rb"Password: ")
            term.send(b"toor\r")
            await term.expect(rb"srv04:~# ")
            term.send(b"echo hi\r")
            await term.expect(rb"srv04:~# ")
            term.send(b"exit\r")
            await term.expect(rb"Connection closed by foreign host")
        await until(fleet.closed())
        check_all(fleet.events(), TELNET_EVENTS)
