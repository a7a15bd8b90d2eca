"""Admission under hostile traffic, honest logins and the guest budget, through a real fleet.

Each test starts a fleet (tests/integration/ssh_fleet.py: real controller, pool node and
guest sshd, real OpenSSH and asyncssh clients on loopback addresses 127.0.0.x) with the
sensor's default bounds unless the test is about one of them. Attackers are raw TCP
connections that hold every slot they can get; the legitimate client is OpenSSH.
Waits are bounded in count and time; nothing asserts on wall-clock durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import pytest

from tests.conftest import until
from tests.integration.ssh_fleet import Fleet, FleetFactory, connect, ssh

REFUSAL = b"Exceeded MaxStartups\r\n"
CLIENT_VERSION = b"SSH-2.0-scanner\r\n"
# A connection an attacker keeps: (reader, writer).
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def attempt(port: int, source: str) -> Stream | None:
    """A TCP connection from ``source`` if the sensor admits it (it speaks first: an SSH
    banner or Telnet negotiation), None if it refuses it (closed at once)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    async with asyncio.timeout(20):
        with contextlib.suppress(ConnectionResetError):
            first = await reader.read(1)
    if first in (b"", REFUSAL[:1]):
        writer.close()
        return None
    return reader, writer


async def hold_every_slot(port: int, sources: list[str], *, most: int = 16) -> list[Stream]:
    """Each source opens connections until one is refused (at most ``most``), and holds
    them without a byte: a slowloris."""
    held: list[Stream] = []
    for source in sources:
        for _ in range(most):
            stream = await attempt(port, source)
            if stream is None:
                break
            held.append(stream)
    return held


def addresses(count: int, first: int = 10) -> list[str]:
    """``count`` loopback addresses for attackers."""
    return [f"127.0.0.{first + n}" for n in range(count)]


async def served(fleet: Fleet, source: str) -> bool:
    """Whether a full OpenSSH login running ``true`` works from ``source``."""
    code, _, _ = await ssh(fleet, "true", source=source)
    return code == 0


def let_go(held: list[Stream]) -> None:
    """Close the attackers' connections."""
    for _, writer in held:
        writer.close()


@pytest.mark.parametrize("sources", [4, 50], ids=["4-addresses", "50-addresses"])
async def test_a_slowloris_holding_every_slot_it_can_does_not_lock_a_client_out(
    make_fleet: FleetFactory, sources: int
) -> None:
    fleet = await make_fleet()  # the default bounds
    attackers = addresses(sources)
    held = await hold_every_slot(fleet.port, attackers)
    logins = []
    for _ in range(5):
        logins.append(await served(fleet, "127.0.0.2"))
        # The attackers take back every slot they lost meanwhile.
        held += await hold_every_slot(fleet.port, attackers)
    assert logins == [True] * 5
    let_go(held)


async def test_idle_telnet_connections_do_not_lock_out_ssh(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(telnet_listen=("127.0.0.1:0",))
    telnet_port = fleet.sensor.telnet_ports[0]
    held = await hold_every_slot(telnet_port, addresses(40))
    assert len(held) >= 64  # more than the old shared bound on unauthenticated connections
    assert await served(fleet, "127.0.0.2")
    let_go(held)


async def test_a_slot_goes_back_the_moment_the_connection_ends_not_after_the_spool(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(max_connections_per_ip=1)
    spool = fleet.sensor.spool
    assert spool is not None
    first = await attempt(fleet.port, "127.0.0.1")
    assert first is not None
    await until(lambda: bool(fleet.events("cowrie.session.connect")))
    await spool.flush()
    # A disk that stalls: the spool cannot commit the session's last events. (The lock is
    # taken on a thread: the spool may be committing or deleting at that moment.)
    db = sqlite3.connect(
        fleet.state_dir / "spool.sqlite3", isolation_level=None, timeout=20, check_same_thread=False
    )
    try:
        await asyncio.to_thread(db.execute, "BEGIN IMMEDIATE")
        first[1].close()
        await until(lambda: fleet.connections() == 0)
        # The slot came back while the session's last events were still waiting.
        assert spool.dropped == 0 and not fleet.closed_reasons()
        second = await attempt(fleet.port, "127.0.0.1")
        assert second is not None, "the address's one slot was still taken"
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.close()
    await until(lambda: len(fleet.closed_reasons()) == 1)
    assert spool.dropped == 0
    second[1].close()


async def test_a_source_that_keeps_failing_is_refused_for_a_while(
    make_fleet: FleetFactory,
) -> None:
    # Long penalties, so that the time the logins take does not matter: two failures
    # (400 s) stay under penalty_min, a third reaches it.
    fleet = await make_fleet(
        per_source_penalties=True,
        penalty_authfail=200.0,
        penalty_min=500.0,
        penalty_max=1000.0,
        refusal_event_interval=0.0,
    )
    metrics = fleet.sensor.metrics.registry
    for n in range(3):
        code, _, _ = await ssh(fleet, "true", password="root", source="127.0.0.3")
        assert code == 255
        await until(lambda n=n: len(fleet.closed_reasons()) == n + 1)  # type: ignore[misc]
        await until(lambda: fleet.connections() == 0)
    assert metrics.get_sample_value("honeyfleet_sensor_penalties_total", {"kind": "authfail"}) == 3
    assert not fleet.events("honeyfleet.session.refused")
    code, _, err = await ssh(fleet, "true", source="127.0.0.3")  # even with the password
    assert code == 255 and b"Connection closed by remote host" in err, err
    await until(lambda: bool(fleet.events("honeyfleet.session.refused")))
    assert [e["reason"] for e in fleet.events("honeyfleet.session.refused")] == ["penalty"]
    assert await served(fleet, "127.0.0.4")  # others are not affected
    sample = metrics.get_sample_value("honeyfleet_sensor_refusals_total", {"reason": "penalty"})
    assert sample == 1


async def test_an_address_gets_only_its_share_of_the_unauthenticated_slots(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(max_startups_per_source=2, refusal_event_interval=0.0)
    held = await hold_every_slot(fleet.port, ["127.0.0.3"])
    assert len(held) == 2
    await until(lambda: bool(fleet.events("honeyfleet.session.refused")))
    reasons = [e["reason"] for e in fleet.events("honeyfleet.session.refused")]
    assert reasons == ["max_startups_per_source"]
    assert await served(fleet, "127.0.0.4")
    let_go(held)


async def test_a_refusal_reads_like_openssh_and_ends_with_fin_not_rst(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(max_startups_per_source=1, telnet_listen=("127.0.0.1:0",))
    held = [await attempt(fleet.port, "127.0.0.1")]
    # A client that sends its version at once, as OpenSSH's does: unread bytes at close
    # would make the kernel send an RST; a refusal must read them and end with a FIN.
    reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port)
    writer.write(CLIENT_VERSION)
    received = bytearray()
    async with asyncio.timeout(20):
        while data := await reader.read(4096):  # a reset raises ConnectionResetError
            received += data
    assert bytes(received) == REFUSAL
    writer.close()
    # OpenSSH's own client sees a closed connection, not a reset.
    code, _, err = await ssh(fleet, "true")
    assert code == 255
    assert b"Connection closed by remote host" in err and b"reset" not in err, err
    # Telnet: a plain close, with a FIN.
    telnet_port = fleet.sensor.telnet_ports[0]
    held.append(await attempt(telnet_port, "127.0.0.1"))
    reader, writer = await asyncio.open_connection("127.0.0.1", telnet_port)
    writer.write(b"root\r\n")
    async with asyncio.timeout(20):
        assert await reader.read(4096) == b""
    writer.close()
    let_go([stream for stream in held if stream is not None])


@pytest.fixture
async def leaseless(make_fleet: FleetFactory) -> Fleet:
    """A sensor whose leases must carry a label no pool node has."""
    return await make_fleet(guest_labels={"image": "no-such-image"}, lease_timeout=1.0)


async def test_a_login_without_a_guest_fails_as_a_wrong_password_does(leaseless: Fleet) -> None:
    code, _, wrong = await ssh(leaseless, "true", password="root")
    assert code == 255
    code, _, no_guest = await ssh(leaseless, "true")  # the right password: no guest
    assert code == 255
    assert no_guest == wrong  # the attacker cannot tell them apart
    await until(lambda: len(leaseless.closed_reasons()) == 2)
    assert not leaseless.events("cowrie.login.success")
    failed = leaseless.events("cowrie.login.failed")
    assert [e["password"] for e in failed] == ["root", "toor"]
    (lease_failed,) = leaseless.events("honeyfleet.lease.failed")
    assert lease_failed["session"] == failed[1]["session"]


async def test_login_success_is_written_only_once_the_guest_is_joined(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet()
    conn = await connect(fleet)
    await until(lambda: bool(fleet.events("cowrie.login.success")))
    events = fleet.events()
    ids = [e["eventid"] for e in events]
    # The lease (its fields on the event) and the guest login come first.
    success = events[ids.index("cowrie.login.success")]
    assert success["lease"] and success["guest"]
    conn.close()


async def test_guests_per_address_are_bounded(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(max_leases_per_source=1)
    first = await connect(fleet)
    code, _, _ = await ssh(fleet, "true")  # a second guest for the same address
    assert code == 255
    await until(lambda: bool(fleet.events("honeyfleet.lease.failed")))
    (failed,) = fleet.events("honeyfleet.lease.failed")
    assert "max_leases_per_source" in failed["reason"]
    assert len(fleet.controller.leases.active) == 1  # the controller was not even asked
    first.close()
    await first.wait_closed()
    await until(lambda: not fleet.controller.leases.active)
    assert await served(fleet, "127.0.0.1")
