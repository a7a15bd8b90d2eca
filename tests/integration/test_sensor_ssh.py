"""The SSH sensor end to end: OpenSSH clients -> sensor -> real controller, real pool node
(static backend, real TunnelService) -> a real SSH server on loopback (tests/sshd.py).

The fleet and its clients are in tests/integration/ssh_fleet.py; ``make_fleet`` is in the
integration conftest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import sys
import urllib.request
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from cryptography import x509

from honeyfleet.eventbounds import FIELD_LIMITS
from honeyfleet.pki.identity import Role
from tests.conftest import FleetPki, require_tool, until
from tests.integration.ssh_fleet import SSH_OPTIONS, Fleet, FleetFactory, connect, run, ssh
from tests.sshd import PASSWORD
from tests.sshprobe import hello, wrong_passwords


@pytest.fixture
async def fleet(make_fleet: FleetFactory) -> Fleet:
    """The default fleet."""
    return await make_fleet()


async def test_exec_output_reaches_client_and_events_have_cowrie_fields(fleet: Fleet) -> None:
    code, out, err = await ssh(fleet, "echo hello from the guest; exit 3")
    assert out == b"hello from the guest\n", err
    assert code == 3
    await until(lambda: bool(fleet.events("cowrie.session.closed")))
    login = fleet.events("cowrie.login.success")[0]
    assert login["username"] == "root" and login["password"] == "toor"
    assert login["message"] == "login attempt [root/toor] succeeded"
    command = fleet.events("cowrie.command.input")[0]
    assert command["input"] == "echo hello from the guest; exit 3"
    assert command["message"] == "CMD: echo hello from the guest; exit 3"
    for key in ("lease", "guest", "pool_node"):
        assert command[key], key
    assert command["pool_node"] == "pool-1"
    connect_ = fleet.events("cowrie.session.connect")[0]
    assert connect_["message"].startswith(f"New connection: 127.0.0.1:{connect_['src_port']} (")
    version = fleet.events("cowrie.client.version")[0]
    assert version["version"].startswith("SSH-2.0-OpenSSH")
    kex = fleet.events("cowrie.client.kex")[0]
    assert (
        kex["hassh"]
        == hashlib.md5(kex["hasshAlgorithms"].encode(), usedforsecurity=False).hexdigest()
    )
    assert "curve25519-sha256" in kex["kexAlgs"]
    closed = fleet.events("cowrie.session.closed")[0]
    assert closed["message"].startswith("Connection lost after ")
    assert closed["duration_ms"] >= 0 and "duration" in closed
    sessions = {e["session"] for e in fleet.events()}
    assert len(sessions) == 1
    assert all(e["sensor"] == "sensor-1" and e["protocol"] == "ssh" for e in fleet.events())
    # The guest's credentials appear in no event.
    assert PASSWORD not in fleet.json_log.read_text()
    await until(lambda: not fleet.controller.leases.active)


async def test_wrong_password_and_negated_user_fail_without_a_lease(fleet: Fleet) -> None:
    code, _, _ = await ssh(fleet, "true", password="root")  # root:x:!root
    assert code == 255
    code, _, _ = await ssh(fleet, "true", user="admin", password="admin")  # admin:x:!* first
    assert code == 255
    code, _, _ = await ssh(fleet, "true", user="nobody", password="x")  # no rule matches
    assert code == 255
    await until(lambda: len(fleet.events("cowrie.session.closed")) == 3)
    failed = fleet.events("cowrie.login.failed")
    assert [(e["username"], e["password"]) for e in failed] == [
        ("root", "root"),
        ("admin", "admin"),
        ("nobody", "x"),
    ]
    assert failed[0]["message"] == "login attempt [root/root] failed"
    assert fleet.guest_pristine() and not fleet.controller.leases.active
    assert not fleet.events("cowrie.login.success")


async def test_shell_lines_become_commands_and_the_recording_replays_them(
    fleet: Fleet, tmp_path: Path
) -> None:
    typed = b"echo helo\x7flo world\necho x\x1b[Dy\x15echo second\nexit\n"
    code, out, err = await ssh(fleet, "-tt", stdin=typed)
    assert code == 0, (out, err)
    assert b"hello world" in out and b"second" in out
    await until(lambda: bool(fleet.events("cowrie.log.closed")))
    commands = [e["input"] for e in fleet.events("cowrie.command.input")]
    assert commands == ["echo hello world", "echo second", "exit"]
    closed = fleet.events("cowrie.log.closed")[0]
    cast = Path(closed["ttylog"])
    assert closed["message"] == (
        f"Closing TTY Log: {cast} after {closed['duration_ms']} milliseconds"
    )
    assert closed["size"] == cast.stat().st_size and closed["duration_ms"] >= 0
    lines = [json.loads(line) for line in cast.read_text().splitlines()]
    header, events = lines[0], lines[1:]
    assert header["version"] == 2 and header["width"] > 0 and header["height"] > 0
    typed_back = "".join(text for _, kind, text in events if kind == "i").encode()
    assert typed_back == typed
    assert closed["shasum"] == hashlib.sha256(typed).hexdigest()
    shown = "".join(text for _, kind, text in events if kind == "o")
    assert "hello world" in shown
    # `honeyfleet replay` shows what the attacker saw.
    out_file = tmp_path / "replayed.txt"
    with out_file.open("w") as replayed:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "honeyfleet"),
            "replay",
            str(cast),
            "--speed",
            "1000",
            stdout=replayed,
        )
        async with asyncio.timeout(60):
            assert await proc.wait() == 0
    assert out_file.read_bytes().decode() == shown


async def test_piped_stdin_of_a_command_is_captured_whole_and_its_output_recorded(
    fleet: Fleet,
) -> None:
    payload = os.urandom(200_000)
    digest = hashlib.sha256(payload).hexdigest()
    code, out, err = await ssh(fleet, "cat >dropped.bin; echo stored; exit 5", stdin=payload)
    assert (code, out) == (5, b"stored\n"), err
    assert (fleet.guest.home / "dropped.bin").read_bytes() == payload
    await until(lambda: bool(fleet.events("cowrie.log.closed")))
    upload = fleet.events("cowrie.session.file_upload")[0]
    stored = fleet.state_dir / "downloads" / digest
    assert upload["message"] == f"Saved stdin contents with SHA-256 {digest} to {stored}"
    assert (upload["shasum"], upload["size"], upload["destfile"]) == (digest, len(payload), "")
    assert stored.read_bytes() == payload
    # The recording has the command's output; its input is the file above.
    cast = Path(fleet.events("cowrie.log.closed")[0]["ttylog"])
    events = [json.loads(line) for line in cast.read_text().splitlines()[1:]]
    assert [(kind, text) for _, kind, text in events] == [("o", "stored\n")]
    # A command that reads nothing captures nothing.
    code, _, _ = await ssh(fleet, "true")
    assert code == 0
    await until(lambda: len(fleet.events("cowrie.session.closed")) == 2)
    assert len(fleet.events("cowrie.session.file_upload")) == 1


async def test_scp_and_sftp_uploads_are_captured_once_by_sha256(
    fleet: Fleet, tmp_path: Path
) -> None:
    payload = os.urandom(300_000)
    local = tmp_path / "malware.bin"
    local.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    scp = require_tool("scp", "openssh-client")
    sftp = require_tool("sftp", "openssh-client")
    target = "root@127.0.0.1"
    port = str(fleet.port)
    # Legacy SCP (-O), then scp's default SFTP mode, then sftp itself.
    for mode, name in (("-O", "legacy.bin"), ("-s", "scp-sftp.bin")):
        code, _, err = await run(
            scp, mode, *SSH_OPTIONS, "-P", port, str(local), f"{target}:{name}", password="toor"
        )
        assert code == 0, err
    batch = tmp_path / "batch"
    batch.write_text(f"put {local} put.bin\n")
    code, _, err = await run(
        # -b turns BatchMode on (no passwords) unless an earlier -o says otherwise.
        sftp, "-o", "BatchMode=no", *SSH_OPTIONS, "-P", port, "-b", str(batch), target,
        password="toor",
    )  # fmt: skip
    assert code == 0, err
    await until(lambda: len(fleet.events("cowrie.session.file_upload")) == 3)
    uploads = fleet.events("cowrie.session.file_upload")
    # SCP names the file as the client's header does; SFTP as the path it opens.
    assert sorted(e["filename"] for e in uploads) == ["malware.bin", "put.bin", "scp-sftp.bin"]
    assert all(e["shasum"] == digest and e["size"] == len(payload) for e in uploads)
    assert sorted(e["message"].split(" ")[0] for e in uploads) == ["SCP", "SFTP", "SFTP"]
    stored = fleet.state_dir / "downloads" / digest
    assert all(e["outfile"] == str(stored) for e in uploads)
    assert stored.read_bytes() == payload
    assert [p.name for p in (fleet.state_dir / "downloads").iterdir() if p.is_file()] == [digest]
    for name in ("legacy.bin", "scp-sftp.bin", "put.bin"):
        assert (fleet.guest.home / name).read_bytes() == payload
    # Each upload event precedes its session's end.
    await until(lambda: len(fleet.closed_reasons()) == 3)
    for upload in uploads:
        order = [e["eventid"] for e in fleet.events() if e["session"] == upload["session"]]
        assert order.index("cowrie.session.file_upload") < order.index("cowrie.session.closed")


async def test_direct_tcpip_is_logged_and_refused(fleet: Fleet) -> None:
    request = b"GET / HTTP/1.0\r\n\r\n"
    await ssh(fleet, "-W", "203.0.113.7:80", stdin=request)
    await until(lambda: bool(fleet.events("cowrie.direct-tcpip.data")))
    asked = fleet.events("cowrie.direct-tcpip.request")[0]
    assert (asked["dst_ip"], asked["dst_port"]) == ("203.0.113.7", 80)
    assert asked["message"].startswith("direct-tcp connection request to 203.0.113.7:80 from ")
    data = fleet.events("cowrie.direct-tcpip.data")[0]
    assert repr(request) in data["data"]
    assert data["message"].startswith("discarded direct-tcp forward request 1 to 203.0.113.7:80")


async def test_public_keys_are_logged_and_refused(fleet: Fleet, tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519")
    key_file = tmp_path / "id_ed25519"
    key.write_private_key(str(key_file))
    key_file.chmod(0o600)
    options = [
        o.replace("PubkeyAuthentication=no", "PubkeyAuthentication=yes") for o in SSH_OPTIONS
    ]
    options = [
        o.replace(
            "PreferredAuthentications=password", "PreferredAuthentications=publickey,password"
        )
        for o in options
    ]
    tool = require_tool("ssh", "openssh-client")
    code, out, _ = await run(
        tool, *options, "-i", str(key_file), "-p", str(fleet.port), "root@127.0.0.1", "echo in",
        password="toor",
    )  # fmt: skip
    assert code == 0 and out == b"in\n"
    seen = fleet.events("cowrie.client.fingerprint")[0]
    assert seen["fingerprint"] == key.get_fingerprint("md5").removeprefix("MD5:")
    assert seen["type"] == "ssh-ed25519" and seen["username"] == "root"
    # The refused key is a failed login, with the same key fields (as Cowrie writes it).
    refused = fleet.events("cowrie.login.failed")
    assert [e["message"] for e in refused] == ["public key login attempt for [root] failed"]
    assert {k: refused[0][k] for k in ("fingerprint", "key", "type", "username")} == {
        k: seen[k] for k in ("fingerprint", "key", "type", "username")
    }


def scrape(port: int) -> dict[str, float]:
    """Prometheus samples from a metrics endpoint, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


async def test_metrics_count_logins_sessions_refusals_and_the_spool(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(
        metrics_listen="127.0.0.1:0", max_connections_per_ip=1, refusal_event_interval=0.0
    )
    port = fleet.sensor.metrics_port
    assert port
    code, out, _ = await ssh(fleet, "echo ok")
    assert (code, out) == (0, b"ok\n")
    await until(lambda: len(fleet.closed_reasons()) == 1 and fleet.connections() == 0)
    code, _, _ = await ssh(fleet, "true", password="root")
    assert code == 255
    await until(lambda: len(fleet.closed_reasons()) == 2 and fleet.connections() == 0)
    # One connection from an address is all it may have: the second is refused.
    held = await connect(fleet)
    code, _, _ = await ssh(fleet, "true")
    assert code == 255
    await until(lambda: bool(fleet.events("honeyfleet.session.refused")))
    samples = await asyncio.to_thread(scrape, port)
    assert samples['honeyfleet_sensor_logins_total{result="success"}'] == 2
    assert samples['honeyfleet_sensor_logins_total{result="failed"}'] == 1
    assert samples["honeyfleet_sensor_sessions_total"] == 2
    assert samples["honeyfleet_sensor_active_sessions"] == 1
    assert samples["honeyfleet_sensor_open_connections"] == 1
    assert samples['honeyfleet_sensor_refusals_total{reason="max_connections_per_ip"}'] == 1
    held.close()
    await held.wait_closed()
    await until(lambda: len(fleet.closed_reasons()) == 3 and fleet.connections() == 0)
    samples = await asyncio.to_thread(scrape, port)
    assert samples["honeyfleet_sensor_open_connections"] == 0
    assert samples["honeyfleet_sensor_active_sessions"] == 0
    # Delivered events leave the spool, and the gauges follow.
    await until(lambda: fleet.sensor.spool is not None and fleet.sensor.spool.count == 0)
    samples = await asyncio.to_thread(scrape, port)
    assert samples["honeyfleet_sensor_spool_events"] == 0
    assert samples["honeyfleet_sensor_spool_bytes"] == 0


async def test_stop_ends_running_sessions_and_spools_their_last_events(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet()
    conn = await connect(fleet)
    process = await conn.create_process("sleep 60")
    await until(lambda: bool(fleet.events("cowrie.command.input")))
    await fleet.sensor.stop()
    async with asyncio.timeout(30):
        await process.wait_closed()
        await conn.wait_closed()
    # Stopped means written: the file already has the session's end.
    assert fleet.closed_reasons() == ["sensor shutting down"]
    with contextlib.suppress(OSError):
        conn.close()


async def test_a_vanished_pool_node_ends_the_session_and_gives_back_its_slot(
    make_fleet: FleetFactory,
) -> None:
    fleet = await make_fleet(max_connections_per_ip=1)
    conn = await connect(fleet)
    process = await conn.create_process("sleep 60")
    await until(lambda: bool(fleet.events("cowrie.command.input")))
    await fleet.node.stop(grace=0)  # its tunnels break under the running session
    async with asyncio.timeout(30):
        await process.wait_closed()
        await conn.wait_closed()
    await until(lambda: bool(fleet.closed_reasons()) and fleet.connections() == 0)
    (reason,) = fleet.closed_reasons()
    assert reason.startswith("tunnel broke"), reason
    assert [e["reason"] for e in fleet.events("honeyfleet.guest.lost")] == [reason]
    # The address's only connection slot is free again: the next login gets as far as
    # asking for a lease (which fails: the pool is gone), not a refusal at the door.
    code, _, err = await ssh(fleet, "true", timeout=30)
    assert code != 0
    assert len(fleet.events("cowrie.session.connect")) == 2, err
    assert not fleet.events("honeyfleet.session.refused")


def stored_json(fleet: Fleet, uuid: str) -> dict[str, Any] | None:
    """One event as the controller's SQLite event store holds it, if it does."""
    with sqlite3.connect(fleet.controller.config.state_dir / "events.sqlite3") as db:
        row = db.execute("SELECT json FROM events WHERE hf_event_id = ?", (uuid,)).fetchone()
    return json.loads(row[0]) if row else None


async def test_a_huge_password_is_logged_cut_and_the_session_works(fleet: Fleet) -> None:
    # asyncssh takes passwords of any length; the controller refuses events over
    # MAX_EVENT_JSON, and a password is kept to FIELD_LIMITS (as OpenSSH's sshd refuses
    # passwords over 1 KiB), so a 200 KB one costs no more than an ordinary one.
    password = "p" * 200_000
    conn = await connect(fleet, password=password)
    result = await conn.run("echo in", check=True)
    assert result.stdout == "in\n"
    conn.close()
    await until(lambda: len(fleet.closed_reasons()) == 1)
    (login,) = fleet.events("cowrie.login.success")
    assert login["password"] == password[: FIELD_LIMITS["password"]]
    assert login["message"] == f"login attempt [root/{login['password']}] succeeded"
    assert len(json.dumps(login, ensure_ascii=False).encode()) < 4096
    await until(lambda: stored_json(fleet, login["hf_event_id"]) is not None)
    assert stored_json(fleet, login["hf_event_id"]) == login


async def test_too_many_auth_attempts_are_told_why_they_end(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(max_auth_attempts=2)

    class Persistent(asyncssh.SSHClient):
        def password_auth_requested(self) -> str:
            return "root"  # root:x:!root, again and again

    # Like OpenSSH, the sensor says why it hangs up (a disconnect message, not just EOF),
    # with OpenSSH's code and text, at the failure that reaches max_auth_attempts.
    with pytest.raises(asyncssh.ProtocolError) as refused:
        async with asyncio.timeout(30):
            await asyncssh.connect(
                "127.0.0.1", fleet.port, username="root", known_hosts=None, client_keys=None,
                agent_path=None, client_factory=Persistent, preferred_auth="password",
            )  # fmt: skip
    assert refused.value.code == asyncssh.DISC_PROTOCOL_ERROR
    assert refused.value.reason == "Too many authentication failures"
    await until(lambda: fleet.closed_reasons() == ["too many authentication failures"])
    assert len(fleet.events("cowrie.login.failed")) == 2


async def test_a_failed_password_waits_without_holding_up_other_connections(
    make_fleet: FleetFactory,
) -> None:
    # A delay far longer than the rest of the test: the attempt is still waiting while
    # another connection is served from start to KEXINIT (the wait is not blocking).
    fleet = await make_fleet(ssh_auth_fail_delay=300.0)
    waiting = asyncio.create_task(wrong_passwords(fleet.port))
    await until(lambda: len(fleet.events("cowrie.login.failed")) == 1)
    served = await hello(fleet.port)
    assert served.banner.startswith("SSH-2.0-OpenSSH_9.2p1 Debian-")
    assert not waiting.done()
    assert len(fleet.events("cowrie.login.failed")) == 1  # the refusal is still to come
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def test_a_login_after_the_connection_closed_is_refused_without_a_lease(
    fleet: Fleet,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port)
    try:
        async with asyncio.timeout(20):
            assert (await reader.readline()).startswith(b"SSH-2.0-")
        assert fleet.sensor.admission is not None
        (connection,) = fleet.sensor.admission.connections
        connection.close("test")
        async with asyncio.timeout(20):
            await connection.closed.wait()
        # An auth request asyncssh still hands over after the close: no join, no lease.
        async with asyncio.timeout(20):
            assert not await connection.login("root", "toor")
        assert not fleet.controller.leases.active and fleet.guest_pristine()
        assert not fleet.events("cowrie.login.success")
    finally:
        writer.close()


async def test_forwards_refused_for_want_of_room_are_not_events(make_fleet: FleetFactory) -> None:
    fleet = await make_fleet(max_channels=1)
    conn = await connect(fleet)
    process = await conn.create_process("cat")
    for _ in range(20):
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_connection(asyncssh.SSHTCPSession, "203.0.113.7", 80)
    process.stdin.write("still here\n")
    async with asyncio.timeout(20):
        assert await process.stdout.readline() == "still here\n"
    conn.close()
    await until(lambda: len(fleet.closed_reasons()) == 1)
    assert not fleet.events("cowrie.direct-tcpip.request")


async def test_an_upload_that_cannot_be_stored_is_relayed_all_the_same(
    fleet: Fleet, tmp_path: Path
) -> None:
    # Where captures are made is not a directory: every capture fails, as on a full disk.
    incoming = fleet.state_dir / "downloads" / "incoming"
    incoming.rmdir()
    incoming.write_bytes(b"")
    payload = os.urandom(100_000)
    local = tmp_path / "dropper.bin"
    local.write_bytes(payload)
    scp = require_tool("scp", "openssh-client")
    sftp = require_tool("sftp", "openssh-client")
    port = str(fleet.port)
    code, _, err = await run(
        scp, "-O", *SSH_OPTIONS, "-P", port, str(local), "root@127.0.0.1:scp.bin",
        password="toor",
    )  # fmt: skip
    assert code == 0, err
    batch = tmp_path / "batch"
    batch.write_text(f"put {local} sftp.bin\n")
    code, _, err = await run(
        sftp, "-o", "BatchMode=no", *SSH_OPTIONS, "-P", port, "-b", str(batch),
        "root@127.0.0.1", password="toor",
    )  # fmt: skip
    assert code == 0, err
    for name in ("scp.bin", "sftp.bin"):
        assert (fleet.guest.home / name).read_bytes() == payload
    await until(lambda: len(fleet.closed_reasons()) == 2)
    assert fleet.closed_reasons() == ["client logged out"] * 2
    assert not fleet.events("cowrie.session.file_upload")


async def test_env_window_changes_and_signals_run_on_the_nodes_one_warm_login(
    fleet: Fleet,
) -> None:
    conn = await connect(fleet)
    result = await conn.run("echo $GREETING", env={"GREETING": "hello"}, check=False)
    assert result.stdout == "hello\n"
    sized = await conn.create_process(
        "stty size; read line; stty size", term_type="xterm", term_size=(80, 24)
    )
    assert (await sized.stdout.readline()).strip() == "24 80"
    sized.change_terminal_size(120, 40)
    sized.stdin.write("go\n")
    assert "40 120" in await sized.stdout.read()
    sleeper = await conn.create_process("echo started; exec sleep 60")
    assert await sleeper.stdout.readline() == "started\n"
    sleeper.send_signal("TERM")
    done = await sleeper.wait()
    assert done.exit_signal is not None and done.exit_signal[0] == "TERM"
    conn.close()
    # The attacker comes back: still the node's one login into the guest.
    code, out, _ = await ssh(fleet, "echo again")
    assert (code, out) == (0, b"again\n")
    assert fleet.guest.connections == 1


async def test_a_guest_that_drops_the_nodes_login_ends_the_session(fleet: Fleet) -> None:
    conn = await connect(fleet)
    process = await conn.create_process("echo started; exec sleep 60")
    assert await process.stdout.readline() == "started\n"
    fleet.guest.disconnect()  # the guest's SSH server drops the pool node's login
    async with asyncio.timeout(30):
        await conn.wait_closed()
    await until(lambda: bool(fleet.closed_reasons()))
    (lost,) = fleet.events("honeyfleet.guest.lost")
    assert "lost its SSH login" in lost["reason"], lost
    assert fleet.closed_reasons() == [lost["reason"]]


async def test_a_broken_sessions_stream_ends_each_session_on_it(
    fleet: Fleet, fleet_pki: FleetPki
) -> None:
    first, second = await connect(fleet), await connect(fleet)
    procs = [await conn.create_process("echo started; exec sleep 60") for conn in (first, second)]
    for proc in procs:
        assert await proc.stdout.readline() == "started\n"
    # Another session on the same stream comes and goes: the held ones stay.
    result = await first.run("echo third", check=False)
    assert (result.stdout, result.exit_status) == ("third\n", 0)
    assert all(proc.exit_status is None for proc in procs)
    # Cutting the sensor's stream on the node (as revoking its certificate does) ends
    # both held sessions, each saying why.
    assert fleet.node.authorizer is not None
    files = fleet_pki.files(Role.SENSOR, "sensor-1")
    serial = x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number
    fleet.node.authorizer.update_revoked({serial})
    async with asyncio.timeout(30):
        for conn in (first, second):
            await conn.wait_closed()
    await until(lambda: len(fleet.closed_reasons()) == 2)
    reasons = fleet.closed_reasons()
    assert all(reason.startswith("tunnel broke") for reason in reasons), reasons
    assert sorted(e["reason"] for e in fleet.events("honeyfleet.guest.lost")) == sorted(reasons)
