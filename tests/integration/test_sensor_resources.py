"""What an attacker can make the sensor hold stays bounded: inflated bytes, descriptors,
disk and events. Each test drives a real fleet (tests/integration/ssh_fleet.py) with real
clients past one bound and reads the result through public surfaces: events, metrics,
/proc of this (the sensor's) process, and the files on disk.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncssh

from tests.conftest import require_tool, until
from tests.integration.ssh_fleet import SSH_OPTIONS, Fleet, FleetFactory, connect, run, ssh
from tests.integration.test_sensor_bounds import refusal_reasons, refused
from tests.tinydisk import TinyDisks, fill

ROOT = Path(__file__).resolve().parents[2]


def peak_rss_reset() -> None:
    """Start measuring this process's peak resident memory afresh (Linux clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    """This process's peak resident memory since the last reset, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/self/status")


async def bomb(fleet: Fleet, size: int, count: int) -> str:
    """Run tests/integration/zlib_bomb.py against the sensor; what it saw."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.integration.zlib_bomb", str(fleet.port), str(size),
        str(count), cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        async with asyncio.timeout(180):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out
    return out.decode().strip()


async def test_a_zlib_bomb_packet_is_refused_without_inflating_it(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet()
    await until(lambda: fleet.sensor.spool is not None)
    peak_rss_reset()
    before = peak_rss()
    # One packet of ~200 KiB that inflates to 200 MB.
    assert await bomb(fleet, 200 * 1024 * 1024, 1) == "disconnected"
    grown = peak_rss() - before
    # Before the bound, this packet grew the peak by 420 MB; a margin for the rest of the
    # process (the controller and pool node of the fleet run in it too).
    assert grown < 128 * 1024 * 1024, f"peak RSS grew by {grown} bytes"
    await until(lambda: len(fleet.closed_reasons()) == 1)
    assert fleet.closed_reasons() == ["compressed packet inflates past 262144 bytes"]
    code, out, _ = await ssh(fleet, "-C", "echo compressed")  # OpenSSH with compression
    assert (code, out) == (0, b"compressed\n")


async def test_inflated_bytes_are_bounded_per_connection(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(ssh_max_inflated_bytes=4 * 1024 * 1024)
    # Packets each within the per-packet bound, more of them than the connection may have.
    assert await bomb(fleet, 200 * 1024, 40) == "disconnected"
    await until(lambda: len(fleet.closed_reasons()) == 1)
    assert fleet.closed_reasons() == [f"more than {4 * 1024 * 1024} bytes inflated"]


def sftp_packet(kind: int, *fields: bytes) -> bytes:
    """One SFTP packet: length, type, fields."""
    body = bytes([kind]) + b"".join(fields)
    return len(body).to_bytes(4, "big") + body


def u32(n: int) -> bytes:
    """An SFTP uint32."""
    return n.to_bytes(4, "big")


def sftp_string(data: bytes) -> bytes:
    """An SFTP string."""
    return u32(len(data)) + data


def open_fds() -> int:
    """Descriptors this (the sensor's) process holds."""
    return len(list(Path("/proc/self/fd").iterdir()))


async def test_reused_sftp_handles_do_not_grow_descriptors(make_fleet: FleetFactory) -> None:
    sftp_server = require_tool("/usr/lib/openssh/sftp-server", "openssh-sftp-server")
    fleet = await make_fleet(guest_sftp_server=sftp_server)
    conn = await connect(fleet)
    process = await conn.create_process(subsystem="sftp", encoding=None)

    async def replies(count: int) -> None:
        for _ in range(count):
            size = int.from_bytes(await process.stdout.readexactly(4), "big")
            await process.stdout.readexactly(size)

    process.stdin.write(sftp_packet(1, u32(3)))  # INIT, version 3
    async with asyncio.timeout(30):
        await replies(1)
    before = open_fds()
    # Each CLOSE goes out before the OPEN's HANDLE comes back, naming the handle OpenSSH's
    # sftp-server will give (its lowest free one): every OPEN reuses handle 0, and the
    # sensor sees the handle named again before any CLOSE for it.
    flags = 0x02 | 0x08 | 0x10  # WRITE | CREAT | TRUNC
    batch = 10  # OPENs awaiting their reply stay within what the watcher remembers
    async with asyncio.timeout(120):
        for first in range(0, 500, batch):
            process.stdin.write(
                b"".join(
                    sftp_packet(3, u32(2 * n), sftp_string(b"f.bin"), u32(flags), u32(0))
                    + sftp_packet(4, u32(2 * n + 1), sftp_string(u32(0)))
                    for n in range(first, first + batch)
                )
            )
            await replies(2 * batch)
    assert open_fds() - before < 20
    assert len(list((fleet.state_dir / "downloads" / "incoming").iterdir())) < 20
    # An ordinary upload on the same channel is still captured.
    process.stdin.write(sftp_packet(3, u32(5000), sftp_string(b"g.bin"), u32(0x1A), u32(0)))
    async with asyncio.timeout(30):
        size = int.from_bytes(await process.stdout.readexactly(4), "big")
        reply = await process.stdout.readexactly(size)
    assert reply[0] == 102  # HANDLE
    handle = reply[9:]
    process.stdin.write(
        sftp_packet(
            6, u32(5001), sftp_string(handle), (0).to_bytes(8, "big"), sftp_string(b"payload")
        )
        + sftp_packet(4, u32(5002), sftp_string(handle))
    )
    async with asyncio.timeout(30):
        await replies(2)
    conn.close()
    await until(lambda: len(fleet.closed_reasons()) == 1)
    uploads = [(e["filename"], e["size"]) for e in fleet.events("cowrie.session.file_upload")]
    assert ("g.bin", 7) in uploads


async def test_a_full_disk_refuses_new_sessions_and_keeps_every_event(
    tiny_disks: TinyDisks, make_fleet: FleetFactory, tmp_path: Path
) -> None:
    disk = tiny_disks.mount(tmp_path / "disk", 8 * 1024 * 1024)
    fleet = await make_fleet(
        state_dir=disk, spool_reserve_bytes=1024 * 1024, refusal_event_interval=0.0
    )
    session = await connect(fleet)
    await session.run("echo before", check=True)
    fill(disk)  # the sensor's disk fills up (captures, logs, anything)
    await session.run("echo filled", check=True)  # the spool notices at its next commit
    assert await refused(fleet, "127.0.0.2")
    await until(lambda: refusal_reasons(fleet) == ["spool_near_full"])
    # The session already in keeps working, and none of its events is lost.
    for n in range(30):
        result = await session.run(f"echo {n}", check=True)
        assert result.stdout == f"{n}\n"
    session.close()
    await until(lambda: len(fleet.closed_reasons()) == 1)
    commands = [e["input"] for e in fleet.events("cowrie.command.input")]
    assert commands == ["echo before", "echo filled", *(f"echo {n}" for n in range(30))]
    registry = fleet.sensor.metrics.registry
    assert registry.get_sample_value("honeyfleet_sensor_events_dropped_total") == 0
    assert registry.get_sample_value("honeyfleet_sensor_spool_near_full") == 1


def disk_bytes(*roots: Path) -> int:
    """Bytes of the files under ``roots``."""
    return sum(p.stat().st_size for root in roots for p in root.rglob("*") if p.is_file())


async def test_a_recording_that_cannot_be_written_leaves_the_session_and_its_slot_intact(
    tiny_disks: TinyDisks, make_fleet: FleetFactory, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    fill(tiny_disks.mount(state / "tty", 256 * 1024))  # recordings go to a full disk
    fleet = await make_fleet(state_dir=state, metrics_listen="127.0.0.1:0")
    typed = b"echo recorded\nexit\n"
    code, out, _ = await ssh(fleet, "-tt", stdin=typed)
    assert code == 0 and b"recorded" in out
    await until(lambda: len(fleet.closed_reasons()) == 1 and fleet.connections() == 0)
    assert fleet.closed_reasons() == ["client logged out"]
    (failed,) = fleet.events("honeyfleet.artefact.failed")
    assert failed["kind"] == "recording" and failed["reason"] == "No space left on device"
    commands = [e["input"] for e in fleet.events("cowrie.command.input")]
    assert commands == ["echo recorded", "exit"]
    registry = fleet.sensor.metrics.registry
    assert registry.get_sample_value("honeyfleet_sensor_open_connections") == 0
    # The slot is back: with one connection allowed per address, it connects again.
    code, out, _ = await ssh(fleet, "echo again")
    assert (code, out) == (0, b"again\n")


async def test_captures_and_recordings_share_one_disk_budget(
    make_fleet: FleetFactory, tmp_path: Path
) -> None:
    budget = 400_000
    fleet = await make_fleet(artefact_max_bytes=budget)
    scp = require_tool("scp", "openssh-client")
    first, second = tmp_path / "first.bin", tmp_path / "second.bin"
    first.write_bytes(os.urandom(300_000))
    second.write_bytes(os.urandom(300_000))
    for local in (first, second):
        code, _, err = await run(
            scp, "-O", *SSH_OPTIONS, "-P", str(fleet.port), str(local),
            f"root@127.0.0.1:{local.name}", password="toor",
        )  # fmt: skip
        assert code == 0, err
        assert (fleet.guest.home / local.name).read_bytes() == local.read_bytes()
    # A session whose recording would take more than what is left.
    code, _, _ = await ssh(fleet, "-tt", stdin=b"head -c 150000 /dev/urandom | base64\nexit\n")
    assert code == 0
    await until(lambda: len(fleet.closed_reasons()) == 3)
    uploads = [e["filename"] for e in fleet.events("cowrie.session.file_upload")]
    assert uploads == ["first.bin"]
    (log_closed,) = fleet.events("cowrie.log.closed")
    assert log_closed["truncated"]
    told = fleet.events("honeyfleet.artefact.budget")
    assert {e["kind"] for e in told} == {"capture", "recording"}
    artefacts = disk_bytes(fleet.state_dir / "downloads", fleet.state_dir / "tty")
    assert artefacts <= budget
    registry = fleet.sensor.metrics.registry
    assert registry.get_sample_value("honeyfleet_sensor_artefact_bytes") == artefacts
    for kind in ("capture", "recording"):
        refused_ = registry.get_sample_value(
            "honeyfleet_sensor_artefacts_refused_total", {"kind": kind}
        )
        assert refused_ is not None and refused_ >= 1


async def test_a_session_past_its_event_budget_writes_one_summary_and_goes_on(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(session_max_events=10)
    conn = await connect(fleet)
    for _ in range(30):  # forwarding requests, each one an event
        chan, _ = await conn.create_connection(asyncssh.SSHTCPSession, "203.0.113.7", 80)
        chan.close()
        await chan.wait_closed()
    result = await conn.run("echo still served", check=True)
    assert result.stdout == "still served\n"
    conn.close()
    await until(lambda: len(fleet.closed_reasons()) == 1)
    assert len(fleet.events("cowrie.direct-tcpip.request")) == 10
    assert not fleet.events("cowrie.command.input")  # past the budget too
    (summary,) = fleet.events("honeyfleet.session.event_budget")
    assert summary["budget"] == "session_total"
    (closed,) = fleet.events("cowrie.session.closed")
    assert closed["events_suppressed"] == 21
    registry = fleet.sensor.metrics.registry
    assert (
        registry.get_sample_value(
            "honeyfleet_sensor_events_over_budget_total", {"budget": "session_total"}
        )
        == 21
    )


async def test_held_sessions_share_the_sensors_ssh_options_and_keep_no_kexinit(
    make_fleet: FleetFactory,
) -> None:
    """What a held session keeps is its own: the asyncssh options (host keys, algorithm
    lists) are the sensor's one object, not a copy per connection or per login, the
    KEXINITs that served only the exchange hash are gone, and the host key sets only a
    client fills are not made per connection (issue 15: memory per shell)."""
    fleet = await make_fleet()
    clients = [await connect(fleet) for _ in range(2)]
    shells = [await c.create_process(term_type="xterm") for c in clients]
    for n, shell in enumerate(shells):
        shell.stdin.write(f"echo held-{n}\n")
        async with asyncio.timeout(30):
            await shell.stdout.readuntil(f"held-{n}")
    assert fleet.sensor.admission is not None
    # The server side of each attacker connection (a private attribute: no public
    # surface shows what asyncssh holds).
    live = fleet.sensor.admission.connections
    servers = [session._ssh for session in live]  # type: ignore[attr-defined]
    assert len(servers) == 2
    assert servers[0]._options is servers[1]._options
    assert all(s._client_kexinit == s._server_kexinit == b"" for s in servers)
    # A client's host key sets: one empty object for all, never one per connection.
    assert servers[0]._revoked_host_keys is servers[1]._server_sig_algs == set()
    assert servers[0]._trusted_host_keys is None
    for c in clients:
        c.close()
    await until(lambda: len(fleet.closed_reasons()) == 2)
