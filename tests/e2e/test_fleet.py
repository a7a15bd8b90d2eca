"""The whole fleet end to end, as operators deploy it and attackers meet it.

A controller, two pool nodes (libvirt guests under TCG) and two sensors, each started
through the CLI and enrolled with a join token (cli_fleet.py). Attackers at distinct
loopback addresses use OpenSSH and Debian's telnet against both sensors; the operator
checks the fleet and the stored sessions with ``buf curl`` and the admin certificate.

Whether two sessions reached the same machine is shown twice: by the guest the store
recorded for each session, and by a file one session leaves in its guest's /tmp that
only a session on the same guest can read back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest

from poolnode.image import GuestImage
from tests.conftest import require_tool
from tests.e2e.cli_fleet import (
    COMMAND_WAIT,
    NODES,
    SENSORS,
    SSH_PORT,
    TELNET_PORT,
    CliFleet,
    SensorPlan,
)
from tests.e2e.clients import openssh_argv, telnet_login
from tests.e2e.vmhost import VmHost

pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

T = TypeVar("T")
SENSOR_1, SENSOR_2 = SENSORS
ATTACKER_PASSWORD = "letmein-7"  # the default userdb lets root in with anything but "root"


@pytest.fixture(scope="module")
async def cli_fleet(
    vm_host: VmHost, vm_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[CliFleet]:
    """The fleet, up once for this module's tests (booting four guests is the slow part)."""
    require_tool("sshpass", "sshpass")
    require_tool("telnet", "telnet")
    fleet = CliFleet(vm_host, vm_image, tmp_path_factory.mktemp("clifleet"))
    try:
        await fleet.start()
        yield fleet
    finally:
        await fleet.close()


def ssh_argv(fleet: CliFleet, src_ip: str, sensor: SensorPlan, command: str) -> list[str]:
    """OpenSSH from ``src_ip`` to a sensor, inside the namespace."""
    return fleet.host.ns_argv(
        *openssh_argv(ATTACKER_PASSWORD, sensor.address, SSH_PORT, command, source=src_ip)
    )


async def ssh(fleet: CliFleet, src_ip: str, sensor: SensorPlan, command: str) -> str:
    """Run one command over SSH through a sensor; what it printed."""
    proc = await asyncio.create_subprocess_exec(
        *ssh_argv(fleet, src_ip, sensor, command),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(COMMAND_WAIT * 2):
        out, err = await proc.communicate()
    assert proc.returncode == 0, f"ssh from {src_ip} via {sensor.name}: {err.decode()}"
    return out.decode()


async def eventually(
    fetch: Callable[[], Awaitable[T]], done: Callable[[T], bool], what: str, timeout: float = 60
) -> T:
    """Poll ``fetch`` until ``done`` holds for its result (bounded in time)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {value!r}")
        await asyncio.sleep(0.5)


async def closed_sessions(fleet: CliFleet, src_ip: str, count: int) -> list[dict[str, Any]]:
    """Wait until ``count`` sessions of ``src_ip`` are stored, ended and placed on a guest."""
    return await eventually(
        lambda: fleet.sessions(src_ip),
        lambda found: (
            len(found) == count and all(s.get("endTime") and s.get("guest") for s in found)
        ),
        f"{count} closed sessions from {src_ip}",
    )


async def session_events(fleet: CliFleet, session: str) -> list[dict[str, Any]]:
    """A session's stored events, once its ``cowrie.session.closed`` is among them."""
    return await eventually(
        lambda: fleet.events(session=session),
        lambda found: any(e["eventid"] == "cowrie.session.closed" for e in found),
        f"session {session} to be closed in the store",
    )


async def commands_typed(fleet: CliFleet, text: str) -> list[dict[str, Any]]:
    """Stored ``cowrie.command.input`` events whose input is ``text``."""
    typed = await fleet.events(eventid="cowrie.command.input")
    return [e for e in typed if e["input"] == text]


def guests_by_attacker(sessions: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    """(pool node, guest) -> the attacker addresses whose sessions ran on it."""
    seen: dict[tuple[str, str], set[str]] = {}
    for s in sessions:
        if s.get("guest"):
            seen.setdefault((s["poolNode"], s["guest"]), set()).add(s["srcIp"])
    return seen


async def test_attackers_spread_follow_their_guest_and_never_share(cli_fleet: CliFleet) -> None:
    a, b = "127.0.0.2", "127.0.0.3"
    claim = "cat /tmp/hf-owner 2>/dev/null || echo no-owner-here; echo {} > /tmp/hf-owner"
    ssh_command = claim.format("owner-a") + "; echo ssh-ran-$((6*7))"
    telnet_command = "echo telnet-ran-$((6*7))"

    # Over SSH, A through sensor 1 and B through sensor 2 each find a guest nobody
    # marked, and mark it.
    assert (await ssh(cli_fleet, a, SENSOR_1, ssh_command)).split() == [
        "no-owner-here",
        "ssh-ran-42",
    ]
    assert (await ssh(cli_fleet, b, SENSOR_2, claim.format("owner-b"))).split() == ["no-owner-here"]
    # Each comes back over Telnet through the other sensor: the same guest, mark and all.
    for src, sensor, owner in ((a, SENSOR_2, b"owner-a"), (b, SENSOR_1, b"owner-b")):
        async with telnet_login(
            cli_fleet.host, sensor.address, TELNET_PORT, ATTACKER_PASSWORD, source=src
        ) as term:
            term.send(b"cat /tmp/hf-owner\r")
            await term.expect(rb"\r\n" + owner + rb"\r\n", timeout=COMMAND_WAIT)
            if src == a:
                term.send(telnet_command.encode() + b"\r")
                await term.expect(rb"telnet-ran-42", timeout=COMMAND_WAIT)  # the guest's sum
            term.send(b"exit\r")
            await term.ended(timeout=COMMAND_WAIT)

    a_ssh, a_telnet = await closed_sessions(cli_fleet, a, 2)
    b_ssh, b_telnet = await closed_sessions(cli_fleet, b, 2)
    assert [s["sensor"] for s in (a_ssh, a_telnet, b_ssh, b_telnet)] == [
        SENSOR_1.name,
        SENSOR_2.name,
        SENSOR_2.name,
        SENSOR_1.name,
    ]
    where = {s["id"]: (s["poolNode"], s["guest"]) for s in (a_ssh, a_telnet, b_ssh, b_telnet)}
    assert where[a_ssh["id"]] == where[a_telnet["id"]]
    assert where[b_ssh["id"]] == where[b_telnet["id"]]
    # Both nodes were pristine-equal, so the second attacker went to the other node.
    assert {where[a_ssh["id"]][0], where[b_ssh["id"]][0]} == {n.name for n in NODES}
    assert all(
        len(ips) == 1 for ips in guests_by_attacker([a_ssh, a_telnet, b_ssh, b_telnet]).values()
    )

    # Each command ran once and is stored once, in the session it was typed in.
    (typed_ssh,) = await eventually(
        lambda: commands_typed(cli_fleet, ssh_command), lambda e: len(e) > 0, "the SSH command"
    )
    (typed_telnet,) = await eventually(
        lambda: commands_typed(cli_fleet, telnet_command), lambda e: len(e) > 0, "Telnet command"
    )
    assert (typed_ssh["session"], typed_ssh["protocol"]) == (a_ssh["id"], "ssh")
    assert (typed_telnet["session"], typed_telnet["protocol"]) == (a_telnet["id"], "telnet")

    # What an operator sees with buf curl: both nodes, both sensors, every session.
    nodes = await cli_fleet.pool_nodes()
    assert {n: nodes[n]["state"] for n in nodes} == {n.name: "POOL_NODE_STATE_ALIVE" for n in NODES}
    assert {n: nodes[n]["address"] for n in nodes} == {n.name: n.address for n in NODES}
    sensors = (await cli_fleet.query("FleetService/ListSensors"))["sensors"]
    assert sorted(s["name"] for s in sensors) == [s.name for s in SENSORS]
    listed = (await cli_fleet.query("EventQueryService/ListSessions", {"page_size": 100}))[
        "sessions"
    ]
    assert set(where) <= {s["id"] for s in listed}


async def test_a_controller_crash_loses_no_session_and_no_event(cli_fleet: CliFleet) -> None:
    a = "127.0.0.2"  # after the first test, back on their guest: no new one is used
    command = "sleep 6; echo after-$((6*7))"
    proc = await asyncio.create_subprocess_exec(
        *ssh_argv(cli_fleet, a, SENSOR_1, command),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        (typed,) = await eventually(
            lambda: commands_typed(cli_fleet, command), lambda e: len(e) > 0, "the command"
        )
        await cli_fleet.kill("controller")
        # The session runs on without it: tunnels go from sensor to pool node.
        async with asyncio.timeout(COMMAND_WAIT):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        assert out.decode().split() == ["after-42"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    # The session ended while the controller was down; its last events waited in the
    # sensor's spool and arrive, once each, when the controller is back.
    await cli_fleet.restart("controller")
    events = await session_events(cli_fleet, typed["session"])
    ids = [e["eventid"] for e in events]
    assert ids.count("cowrie.command.input") == 1
    assert ids.count("cowrie.session.closed") == 1
    assert len({e["hf_event_id"] for e in events}) == len(events)
    # The release the sensor could not make during the outage lands now.
    await eventually(
        lambda: cli_fleet.query("FleetService/ListLeases", {"src_ip": a}),
        lambda listed: any(
            lease["id"] == typed["lease"] and lease["state"] == "LEASE_STATE_RELEASED"
            for lease in listed.get("leases", [])
        ),
        "the session's lease to be released",
    )
    # Pool nodes and sensors find the controller again by themselves.
    await eventually(
        cli_fleet.pool_nodes,
        lambda nodes: all(
            nodes[n.name]["state"] == "POOL_NODE_STATE_ALIVE"
            and nodes[n.name].get("guestCounts", {}).get("pristine", 0) > 0
            for n in NODES
        ),
        "both pool nodes back",
    )


async def test_killing_a_pool_node_ends_its_session_and_new_ones_go_elsewhere(
    cli_fleet: CliFleet,
) -> None:
    victim, newcomer = "127.0.0.4", "127.0.0.5"
    proc = await asyncio.create_subprocess_exec(
        *ssh_argv(cli_fleet, victim, SENSOR_1, "echo started; sleep 600"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(COMMAND_WAIT * 2):
            assert await proc.stdout.readline() == b"started\n"
        (session,) = await eventually(
            lambda: cli_fleet.sessions(victim),
            lambda found: len(found) == 1 and bool(found[0].get("poolNode")),
            "the victim's session on a node",
        )
        doomed = session["poolNode"]
        (survivor,) = {n.name for n in NODES} - {doomed}

        await cli_fleet.kill(doomed)
        # The attacker's connection ends (it does not hang until its own timeout) ...
        async with asyncio.timeout(COMMAND_WAIT):
            rest, _ = await proc.communicate()
        assert rest == b""
        assert proc.returncode != 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    # ... and the sensor says why and closes the session, once.
    events = await session_events(cli_fleet, session["id"])
    ids = [e["eventid"] for e in events]
    assert ids.count("honeyfleet.guest.lost") == 1
    assert ids.count("cowrie.session.closed") == 1
    for sensor in SENSORS:
        cli_fleet.check_alive(sensor.name)

    # The controller notices the node is gone; the lease on it is over.
    await eventually(
        cli_fleet.pool_nodes,
        lambda nodes: nodes[doomed]["state"] != "POOL_NODE_STATE_ALIVE",
        f"{doomed} to be marked down",
        timeout=30,
    )
    listed = await cli_fleet.query("FleetService/ListLeases", {"src_ip": victim})
    (victim_lease,) = listed["leases"]
    assert victim_lease["state"] in ("LEASE_STATE_RELEASED", "LEASE_STATE_FAILED")

    # A new attacker is served by the node that is left.
    assert (await ssh(cli_fleet, newcomer, SENSOR_1, "echo after-$((6*7))")).split() == ["after-42"]
    (placed,) = await closed_sessions(cli_fleet, newcomer, 1)
    assert placed["poolNode"] == survivor
    everyone = (await cli_fleet.query("EventQueryService/ListSessions", {"page_size": 100}))[
        "sessions"
    ]
    assert all(len(ips) == 1 for ips in guests_by_attacker(everyone).values())

    # The operator retires the dead node; the fleet lists only the one left.
    await cli_fleet.admin("node", "remove", doomed)
    assert set(await cli_fleet.pool_nodes()) == {survivor}
