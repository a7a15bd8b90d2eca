"""The Telnet sensor end to end: Debian's telnet (on a pty), telnetlib3's client and raw
sockets -> sensor -> real controller, real pool node (static backend, real TunnelService)
-> a loopback telnetd with a real login and shell (tests/telnetd.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import telnetlib3

from controller.server import Controller
from honeyfleet.pki.identity import Role
from poolnode.server import PoolNode
from sensor import linger
from sensor.config import SensorConfig
from sensor.service import Sensor
from sensor.session.state import SessionState
from sensor.telnet.login import LoginState
from sensor.telnet.session import TelnetSession
from tests.conftest import (
    ControllerFactory,
    FleetPki,
    bounded,
    require_tool,
    start_one_guest_node,
    until,
)
from tests.sshd import Sshd
from tests.telnetd import PASSWORD, Telnetd
from tests.terminal import Terminal, Transcript

USERDB = "root:x:!root\nroot:x:*\nadmin:x:!*\nadmin:x:admin\nubnt:x:ubnt\n"
IAC, SB, SE, WILL, WONT, DO, DONT = 255, 250, 240, 251, 252, 253, 254


@dataclass
class Fleet:
    """A controller, a pool node whose one guest is a Telnetd, and a sensor."""

    controller: Controller
    node: PoolNode
    guest: Telnetd
    sensor: Sensor
    port: int
    json_log: Path

    def events(self, eventid: str | None = None) -> list[dict[str, Any]]:
        """Events the sensor wrote to its JSON lines file."""
        if not self.json_log.exists():
            return []
        lines = [json.loads(line) for line in self.json_log.read_text().splitlines()]
        return [e for e in lines if eventid is None or e["eventid"] == eventid]

    def closed(self, count: int = 1) -> Callable[[], bool]:
        """A predicate: ``count`` sessions have ended."""
        return lambda: len(self.events("cowrie.session.closed")) >= count

    def released(self) -> Callable[[], bool]:
        """A predicate: no lease is active."""
        return lambda: not self.controller.leases.active


@contextlib.asynccontextmanager
async def start_fleet(
    fleet_pki: FleetPki,
    start_controller: ControllerFactory,
    tmp: Path,
    guest: Telnetd,
    **sensor: Any,
) -> AsyncIterator[Fleet]:
    """Everything on loopback, started in order (guest, controller, pool node, sensor) and
    stopped afterwards: every part that started, even if a later one failed to (the
    controller stops with its fixture), each step bounded in time."""
    async with contextlib.AsyncExitStack() as teardown:
        telnet_port = await guest.start()
        teardown.push_async_callback(bounded, guest.stop)
        # The node's warm login (Telnet sessions do not use it, but guests need one).
        sshd = Sshd(tmp / "guest-home", password=PASSWORD)
        ssh_port = await sshd.start()
        teardown.push_async_callback(bounded, sshd.stop)
        controller, address = await start_controller()
        node = await start_one_guest_node(
            fleet_pki,
            controller,
            address,
            f"127.0.0.1:{ssh_port}:{telnet_port}",
            tmp / "pool",
            backend_pass=PASSWORD,
        )
        teardown.push_async_callback(bounded, node.stop, grace=0)
        tls = fleet_pki.files(Role.SENSOR, "sensor-1")
        (tmp / "userdb.txt").write_text(USERDB)
        config = SensorConfig(
            controller=address,
            state_dir=tmp / "sensor",
            tls_ca=tls.ca,
            tls_cert=tls.cert,
            tls_key=tls.key,
            ssh_listen=("127.0.0.1:0",),
            telnet_listen=("127.0.0.1:0",),
            telnet_greeting=guest.greeting,
            telnet_login_fail_delay=0.0,
            userdb=tmp / "userdb.txt",
            json_log=tmp / "cowrie.json",
            lease_timeout=5.0,
            guest_login_timeout=10.0,
            login_grace_time=30.0,
            # Every client comes from 127.0.0.1: penalties are tested on their own.
            per_source_penalties=False,
        )
        sensor_ = Sensor(replace(config, **sensor))
        await sensor_.start()  # a start that fails undoes itself
        teardown.push_async_callback(bounded, sensor_.stop)
        yield Fleet(controller, node, guest, sensor_, sensor_.telnet_ports[0], tmp / "cowrie.json")


@pytest.fixture
async def fleet(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """The default fleet: spoofing on, a busybox-like guest."""
    async with start_fleet(fleet_pki, start_controller, tmp_path, Telnetd()) as f:
        yield f


@contextlib.asynccontextmanager
async def telnet(fleet: Fleet, *args: str) -> AsyncIterator[Terminal]:
    """Debian's telnet client on a pty, connected to the sensor."""
    tool = require_tool("telnet", "telnet")
    term = await Terminal.spawn(tool, *args, "127.0.0.1", str(fleet.port))
    try:
        yield term
    finally:
        await term.close()


async def test_debian_telnet_logs_in_runs_commands_and_is_recorded(fleet: Fleet) -> None:
    async with telnet(fleet) as term:
        await term.expect(rb"srv04 login: ")
        term.send(b"root\r")
        await term.expect(rb"Password: ")
        term.send(b"toor\r")
        await term.expect(rb"srv04:~# ")
        term.send(b"echo hello from the $((6*7))th guest\r")
        await term.expect(rb"hello from the 42th guest")
        await term.expect(rb"srv04:~# ")
        term.send(b"exit\r")
        await term.expect(rb"Connection closed by foreign host")
    await until(fleet.closed())
    login = fleet.events("cowrie.login.success")[0]
    assert (login["username"], login["password"]) == ("root", "toor")
    assert login["message"] == "login attempt [root/toor] succeeded"
    # The guest was given the lease's credentials, not the attacker's.
    assert fleet.guest.attempts == [("root", PASSWORD)]
    commands = [e["input"] for e in fleet.events("cowrie.command.input")]
    assert commands == ["echo hello from the $((6*7))th guest", "exit"]
    for key in ("lease", "guest", "pool_node"):
        assert fleet.events("cowrie.command.input")[0][key], key
    events = fleet.events()
    assert {e["protocol"] for e in events} == {"telnet"}
    assert len({e["session"] for e in events}) == 1
    connect = fleet.events("cowrie.session.connect")[0]
    assert connect["message"].startswith(f"New connection: 127.0.0.1:{connect['src_port']} (")
    options = fleet.events("honeyfleet.telnet.options")[0]
    assert "WILL TTYPE" in options["options"] and "DO ECHO" in options["options"]
    assert options["ttype"].lower() == "xterm"
    size = fleet.events("cowrie.client.size")[0]
    assert (size["width"], size["height"]) == (80, 24)
    # The recording replays the session without the password.
    closed = fleet.events("cowrie.log.closed")[0]
    lines = [json.loads(line) for line in Path(closed["ttylog"]).read_text().splitlines()]
    typed = "".join(text for _, kind, text in lines[1:] if kind == "i")
    shown = "".join(text for _, kind, text in lines[1:] if kind == "o")
    assert "root" in typed and "echo hello" in typed and "toor" not in typed
    assert "srv04 login: " in shown and "hello from the 42th guest" in shown
    assert PASSWORD not in fleet.json_log.read_text()
    await until(fleet.released())


class Bot(Transcript):
    """A raw-socket Telnet client, as scanning bots are: refuses every option, sends bytes
    exactly as given, and keeps what the server shows (telnet commands stripped)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__()
        self.reader = reader
        self.writer = writer
        self._task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, port: int, *, rcvbuf: int | None = None) -> Bot:
        """Connect to the sensor (with a receive buffer of ``rcvbuf`` bytes, if given)."""
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(*await asyncio.open_connection(sock=sock))

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await self.reader.read(65536):
                self.shown(self._strip(chunk))
        self.hung_up()

    def _strip(self, chunk: bytes) -> bytes:
        """Answer DO with WONT and WILL with DONT; drop subnegotiations."""
        out, i = bytearray(), 0
        while i < len(chunk):
            byte = chunk[i]
            if byte != IAC or i + 1 >= len(chunk):
                out.append(byte)
                i += 1
            elif chunk[i + 1] in (DO, DONT, WILL, WONT) and i + 2 < len(chunk):
                answer = {DO: WONT, WILL: DONT}.get(chunk[i + 1])
                if answer is not None:
                    self.writer.write(bytes([IAC, answer, chunk[i + 2]]))
                i += 3
            elif chunk[i + 1] == SB:
                end = chunk.find(bytes([IAC, SE]), i)
                i = len(chunk) if end < 0 else end + 2
            else:
                i += 2
        return bytes(out)

    async def closed(self, timeout: float = 20.0) -> None:
        """Wait until the sensor hangs up."""
        async with asyncio.timeout(timeout):
            await self._task

    def send(self, data: bytes) -> None:
        """Send bytes as they are."""
        self.writer.write(data)

    def close(self) -> None:
        """Hang up."""
        self.writer.close()
        self._task.cancel()


async def test_wrong_password_is_refused_without_a_guest_then_a_retry_logs_in(
    fleet: Fleet,
) -> None:
    async with telnet(fleet) as term:
        await term.expect(rb"srv04 login: ")
        term.send(b"root\r")
        await term.expect(rb"Password: ")
        term.send(b"root\r")  # root:x:!root
        # Refused by the userdb: login's own refusal and prompt, and no guest leased.
        await term.expect(rb"Login incorrect\r\nsrv04 login: ")
        assert fleet.node.pool.snapshot().guest_counts.pristine == 1
        term.send(b"ubnt\r")
        await term.expect(rb"ubnt\r\nPassword: ")
        term.send(b"ubnt\r")
        await term.expect(rb"srv04:~# ")
        term.send(b"id -un\r")
        await term.expect(rb"\r\nroot\r\n")
    await until(fleet.closed())
    failed = fleet.events("cowrie.login.failed")
    assert [(e["username"], e["password"]) for e in failed] == [("root", "root")]
    assert failed[0]["message"] == "login attempt [root/root] failed"
    success = fleet.events("cowrie.login.success")
    assert [(e["username"], e["password"]) for e in success] == [("ubnt", "ubnt")]
    # Only the accepted login reached the guest (with the lease's credentials).
    assert fleet.guest.attempts == [("root", PASSWORD)]
    assert [e["input"] for e in fleet.events("cowrie.command.input")] == ["id -un"]
    # The guest's echo of the lease's username never reached the attacker.
    assert bytes(term.output).count(b"root\r\n") == 2  # typed once, `id -un` once


@pytest.fixture
async def unspoofed(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """Spoofing off: the guest decides."""
    async with start_fleet(
        fleet_pki, start_controller, tmp_path, Telnetd(), telnet_spoof_authentication=False
    ) as f:
        yield f


async def test_without_spoofing_only_the_guests_own_credentials_work(unspoofed: Fleet) -> None:
    bot = await Bot.connect(unspoofed.port)
    await bot.expect(rb"srv04 login: ")
    bot.send(b"root\r\ntoor\r\n")  # the userdb would accept; the guest does not
    await bot.expect(rb"Login incorrect\r\nsrv04 login: ")
    bot.send(f"root\r\n{PASSWORD}\r\n".encode())
    await bot.expect(rb"srv04:~# ")
    bot.send(b"echo in\r\n")
    await bot.expect(rb"\r\nin\r\n")
    # Telnet's Interrupt Process reaches the shell as the Ctrl-C a pty understands.
    received = len(unspoofed.guest.received)
    bot.send(bytes([IAC, 244]))
    await until(lambda: b"\x03" in unspoofed.guest.received[received:])
    bot.close()
    await until(unspoofed.closed())
    assert unspoofed.guest.attempts == [("root", "toor"), ("root", PASSWORD)]
    failed = unspoofed.events("cowrie.login.failed")
    assert [(e["username"], e["password"]) for e in failed] == [("root", "toor")]
    success = unspoofed.events("cowrie.login.success")
    assert [(e["username"], e["password"]) for e in success] == [("root", PASSWORD)]
    assert [e["input"] for e in unspoofed.events("cowrie.command.input")] == ["echo in"]


@pytest.fixture
async def ubuntu(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """A guest that takes USER from NEW-ENVIRON and skips the username, as Ubuntu's does."""
    guest = Telnetd(environ=True, hostname="ubuntu", banner="Ubuntu 22.04.4 LTS")
    async with start_fleet(fleet_pki, start_controller, tmp_path, guest) as f:
        yield f


async def test_new_environ_user_is_captured_and_the_guest_skips_to_the_password(
    ubuntu: Fleet,
) -> None:
    async with telnet(ubuntu, "-l", "ubnt") as term:
        # telnetd's login asks only for the password when the client sent USER.
        await term.expect(rb"Ubuntu 22.04.4 LTS\r\nPassword: ")
        assert b"login: " not in term.output
        term.send(b"ubnt\r")
        await term.expect(rb"ubuntu:~# ")
        term.send(b"exit\r")
        await term.expect(rb"Connection closed by foreign host")
    await until(ubuntu.closed())
    var = next(e for e in ubuntu.events("cowrie.client.var") if e["name"] == "USER")
    assert var["value"] == "ubnt" and var["message"] == "Telnet NEW-ENVIRON: USER=ubnt"
    success = ubuntu.events("cowrie.login.success")[0]
    assert (success["username"], success["password"]) == ("ubnt", "ubnt")
    # The guest was told the lease's username and skipped straight to the password.
    assert ubuntu.guest.users == ["root"]
    assert ubuntu.guest.attempts == [("root", PASSWORD)]


async def test_user_minus_f_is_an_exploit_attempt_and_never_reaches_the_guest(
    ubuntu: Fleet,
) -> None:
    bot = await Bot.connect(ubuntu.port)
    bot.send(bytes([IAC, WILL, 39, IAC, SB, 39, 0, 0]) + b"USER\x01-f root" + bytes([IAC, SE]))
    # No username was taken from it: the ordinary login prompt.
    await bot.expect(rb"ubuntu login: ")
    bot.send(b"root\r\ntoor\r\n")
    await bot.expect(rb"ubuntu:~# ")
    bot.close()
    await until(ubuntu.closed())
    exploit = ubuntu.events("cowrie.telnet.exploit_attempt")
    assert len(exploit) == 1 and exploit[0]["value"] == "-f root"
    assert exploit[0]["cve"] == "CVE-2026-24061"
    assert ubuntu.guest.users == []
    assert b"-f" not in ubuntu.guest.received


@pytest.mark.parametrize("guest_newline", [b"\r\n", b"\r\0", b"\n"], ids=["crlf", "crnul", "lf"])
@pytest.mark.parametrize("enter", [b"\r\n", b"\r\0", b"\n"], ids=["crlf", "crnul", "lf"])
async def test_line_endings_work_in_both_directions(
    fleet_pki: FleetPki,
    start_controller: ControllerFactory,
    tmp_path: Path,
    guest_newline: bytes,
    enter: bytes,
) -> None:
    guest = Telnetd(newline=guest_newline)
    async with start_fleet(fleet_pki, start_controller, tmp_path, guest) as fleet:
        bot = await Bot.connect(fleet.port)
        await bot.expect(rb"srv04 login: ")
        bot.send(b"root" + enter)
        await bot.expect(rb"Password: ")
        bot.send(b"root" + enter)  # refused (root:x:!root) by the sensor, without a guest
        await bot.expect(rb"Login incorrect\r\n(?s:.*)srv04 login: ")
        # Typed ahead of the guest's prompts; outputs differ from their commands' echo.
        bot.send(b"root" + enter + b"toor" + enter + b"expr 20 + 22" + enter)
        await bot.expect(rb"42\r\n")
        bot.send(b"expr 30 + 33" + enter)
        await bot.expect(rb"63\r\n")
        bot.close()
        await until(fleet.closed())
        commands = [e["input"] for e in fleet.events("cowrie.command.input")]
        assert commands == ["expr 20 + 22", "expr 30 + 33"]
        assert fleet.guest.attempts == [("root", PASSWORD)]


async def test_a_connection_that_never_logs_in_takes_no_lease(fleet: Fleet) -> None:
    bot = await Bot.connect(fleet.port)
    await bot.expect(rb"srv04 login: ")
    bot.close()
    await until(fleet.closed())
    assert not fleet.events("cowrie.login.failed") and not fleet.events("honeyfleet.lease.failed")
    assert fleet.node.pool.snapshot().guest_counts.pristine == 1
    assert not fleet.events("cowrie.log.closed")  # nothing typed, nothing recorded


async def test_a_scanner_that_types_usernames_and_wrong_passwords_never_holds_a_guest(
    fleet: Fleet,
) -> None:
    bot = await Bot.connect(fleet.port)
    await bot.expect(rb"srv04 login: ")
    for name in (b"root", b"admin", b"root"):
        bot.send(name + b"\r\n")
        await bot.expect(rb"Password: ")
        bot.send(b"root\r\n")  # refused by the userdb for both
        await bot.expect(rb"Login incorrect\r\nsrv04 login: ")
    bot.send(b"admin\r\n")  # and a username left hanging at the password prompt
    await bot.expect(rb"Password: ")
    # No guest was ever leased: the pool's one guest is untouched.
    assert fleet.node.pool.snapshot().guest_counts.pristine == 1
    assert not fleet.controller.leases.active
    bot.close()
    await until(fleet.closed())
    assert fleet.node.pool.snapshot().guest_counts.pristine == 1
    assert not fleet.events("honeyfleet.lease.failed") and fleet.guest.attempts == []
    assert len(fleet.events("cowrie.login.failed")) == 3


@pytest.fixture
async def leaseless(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """A sensor whose leases must carry a label no pool node has."""
    async with start_fleet(
        fleet_pki,
        start_controller,
        tmp_path,
        Telnetd(),
        guest_labels={"image": "no-such-image"},
        lease_timeout=1.0,
    ) as f:
        yield f


async def test_without_a_guest_the_attacker_sees_an_ordinary_failed_login(
    leaseless: Fleet,
) -> None:
    async with telnet(leaseless) as term:
        for _ in range(2):
            await term.expect(rb"srv04 login: ")
            term.send(b"root\r")
            await term.expect(rb"Password: ")
            term.send(b"toor\r")
            await term.expect(rb"\r\nLogin incorrect\r\n")
        await term.expect(rb"srv04 login: ")
    await until(leaseless.closed())
    assert len(leaseless.events("honeyfleet.lease.failed")) == 2
    # Good credentials, but nobody was let in: the events say failed, and why.
    assert not leaseless.events("cowrie.login.success")
    failed = leaseless.events("cowrie.login.failed")
    assert [(e["username"], e["password"]) for e in failed] == [("root", "toor")] * 2
    assert leaseless.guest.attempts == []


@pytest.fixture
async def tight(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> AsyncIterator[Fleet]:
    """A fleet whose sensor has small Telnet bounds."""
    async with start_fleet(
        fleet_pki,
        start_controller,
        tmp_path,
        Telnetd(),
        max_connections_per_ip=2,
        telnet_max_subnegotiation=512,
        telnet_max_negotiations=40,
        refusal_event_interval=0.0,
    ) as f:
        yield f


async def test_negotiation_abuse_is_cut_off_while_other_sessions_keep_working(
    tight: Fleet,
) -> None:
    # A logged-in session, through telnetlib3's client, with CR LF line endings.
    reader, writer = await telnetlib3.open_connection(
        "127.0.0.1", tight.port, encoding=False, connect_minwait=0.0
    )

    async def shown(pattern: bytes) -> None:
        seen = b""
        async with asyncio.timeout(20):
            while not re.search(pattern, seen):
                chunk = await reader.read(4096)
                assert chunk, seen
                seen += chunk

    await shown(rb"srv04 login: ")
    writer.write(b"root\r\n")
    await shown(rb"Password: ")
    writer.write(b"toor\r\n")
    await shown(rb"srv04:~# ")
    # Tagged as a window size (which is not counted), but no window size is that long.
    fake_naws = bytes([IAC, SB, 31]) + b"\xff\xff\xfa" * 100 + bytes([IAC, SE])
    abuses = [
        ("subnegotiation longer than 512 bytes", bytes([IAC, SB, 24, 0]) + b"x" * 4000),
        ("more than 40 option negotiations", bytes([IAC, WILL, 1, IAC, WONT, 1] * 30)),
        ("more than 40 option negotiations", fake_naws * 41),
        ("MCCP2_COMPRESS started without agreement", bytes([IAC, SB, 86, IAC, SE]) + b"\x78"),
    ]
    for done, (_, abuse) in enumerate(abuses, 1):
        bot = await Bot.connect(tight.port)
        bot.send(abuse)
        await bot.closed()
        expected = [r for r, _ in abuses[:done]]
        # Its end is logged before its connection slot is given back: wait for both (only
        # the logged-in session left), or the next bot could be refused per address.
        await until(
            lambda expected=expected: (  # type: ignore[misc]
                sorted(e["reason"] for e in tight.events("cowrie.session.closed"))
                == sorted(expected)
                and len(open_sessions(tight)) == 1
            )
        )
    # Per source: the logged-in session and one more; a third is refused at once.
    held = await Bot.connect(tight.port)
    await held.expect(rb"srv04 login: ")
    refused = await Bot.connect(tight.port)
    await refused.closed()
    assert refused.output == b""
    await until(lambda: bool(tight.events("honeyfleet.session.refused")))
    event = tight.events("honeyfleet.session.refused")[0]
    assert event["reason"] == "max_connections_per_ip" and event["protocol"] == "telnet"
    held.close()
    # Through all of it, the first session still works.
    writer.write(b"echo still here\r\n")
    await shown(rb"\r\nstill here\r\n")
    writer.close()
    await until(tight.closed(6))
    assert [e["input"] for e in tight.events("cowrie.command.input")] == ["echo still here"]


async def test_an_idle_session_is_closed(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> None:
    async with start_fleet(
        fleet_pki, start_controller, tmp_path, Telnetd(), idle_timeout=0.5
    ) as fleet:
        bot = await Bot.connect(fleet.port)
        await bot.expect(rb"srv04 login: ")
        await bot.closed()
        await until(fleet.closed())
        assert fleet.events("cowrie.session.closed")[0]["reason"] == "idle for 0s"


async def test_log_raw_logs_both_directions_within_its_budget(
    fleet_pki: FleetPki,
    start_controller: ControllerFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sensor.events")
    async with start_fleet(
        fleet_pki, start_controller, tmp_path, Telnetd(), log_raw=True, log_raw_max_bytes=32
    ) as fleet:
        bot = await Bot.connect(fleet.port)
        await bot.expect(rb"srv04 login: ")
        bot.send(b"root\r\ntoor\r\n")
        await bot.expect(rb"srv04:~# ")
        bot.close()
        await until(fleet.closed())
    raw = [r.getMessage() for r in caplog.records if "] raw from " in r.getMessage()]
    # The bot's refusals (IAC WONT ...) as sent, and busybox-style negotiation from the guest.
    assert any("raw from attacker: b" in line and "\\xff\\xfc\\x18" in line for line in raw)
    assert any("raw from guest: b" in line and "\\xff\\xfd\\x01" in line for line in raw)
    for direction in ("attacker", "guest"):
        assert any(f"raw from {direction}: log_raw_max_bytes reached" in line for line in raw)


class MuteTelnetd(Telnetd):
    """A guest whose telnetd prints its banner but never a login prompt."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"\r\nDebian GNU/Linux 12\r\n")
        await reader.read()
        writer.close()


async def test_a_guest_without_a_login_prompt_is_given_up(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> None:
    async with start_fleet(
        fleet_pki, start_controller, tmp_path, MuteTelnetd(), guest_login_timeout=1.0
    ) as fleet:
        bot = await Bot.connect(fleet.port)
        await bot.expect(rb"srv04 login: ")
        bot.send(b"root\r\ntoor\r\n")
        await bot.expect(rb"\r\nLogin incorrect\r\nsrv04 login: ")
        # The JSON lines copy follows the spool's commit: wait for it.
        await until(lambda: bool(fleet.events("honeyfleet.guest.failed")))
        failed = fleet.events("honeyfleet.guest.failed")
        assert [e["reason"] for e in failed] == ["no login prompt from the guest in time"]
        await until(fleet.released())
        bot.close()


def open_sessions(fleet: Fleet) -> set[TelnetSession]:
    """The sensor's Telnet sessions whose connection has not ended."""
    assert fleet.sensor.admission is not None
    return {s for s in fleet.sensor.admission.connections if isinstance(s, TelnetSession)}


def the_session(fleet: Fleet) -> TelnetSession:
    """The sensor's one Telnet session."""
    (session,) = open_sessions(fleet)
    return session


async def test_timers_that_fire_after_the_session_closed_do_nothing(
    fleet_pki: FleetPki, start_controller: ControllerFactory, tmp_path: Path
) -> None:
    async with start_fleet(
        fleet_pki, start_controller, tmp_path, MuteTelnetd(), guest_login_timeout=20.0
    ) as fleet:
        bot = await Bot.connect(fleet.port)
        await bot.expect(rb"srv04 login: ")
        session = the_session(fleet)
        bot.send(b"root\r\ntoor\r\n")
        # Joined to a guest that never shows its login prompt.
        await until(lambda s=session: s.login_state is LoginState.WAITING)  # type: ignore[misc]
        assert "guest_late" in session.session.timers.armed
        bot.close()
        async with asyncio.timeout(20):
            await session.closed.wait()
        # Timers armed in the moment before close() (by a join or a dialogue still
        # running) are not armed at all after it, and the guest is not given up twice.
        session.awaiting_verdict(1)
        assert session.session.timers.armed == []
        assert not await session.session.abandon_guest("no login prompt from the guest in time")
        assert session.state is SessionState.CLOSED
        assert not fleet.events("honeyfleet.guest.failed")
        assert fleet.events()[-1]["eventid"] == "cowrie.session.closed"


async def test_a_vanished_pool_node_ends_the_session_cleanly(fleet: Fleet) -> None:
    bot = await Bot.connect(fleet.port)
    await bot.expect(rb"srv04 login: ")
    bot.send(b"root\r\n")
    await bot.expect(rb"Password: ")
    bot.send(b"toor\r\n")
    bot.send(b"expr 20 + 22\r\n")
    await bot.expect(rb"42\r\n")
    await fleet.node.stop(grace=0)  # its tunnels break under the running session
    await bot.closed()
    await until(fleet.closed())
    (closed,) = fleet.events("cowrie.session.closed")
    assert closed["reason"].startswith("tunnel broke"), closed
    assert [e["reason"] for e in fleet.events("honeyfleet.guest.lost")] == [closed["reason"]]


async def test_a_client_that_never_reads_is_let_go_soon_after_its_session_closes(
    fleet_pki: FleetPki,
    start_controller: ControllerFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(linger, "CLOSE_LINGER", 0.2)
    high = 64 * 1024
    async with start_fleet(
        fleet_pki, start_controller, tmp_path, Telnetd(), write_buffer_high=high
    ) as fleet:
        bot = await Bot.connect(fleet.port, rcvbuf=4096)
        await bot.expect(rb"srv04 login: ")
        bot.send(b"root\r\ntoor\r\n")
        await bot.expect(rb"srv04:~# ")
        transport = the_session(fleet)._transport
        # The client stops reading; the guest's output fills every buffer on the way.
        bot.writer.transport.pause_reading()  # type: ignore[attr-defined]
        bot.send(b"head -c 20000000 /dev/zero\r\n")
        await until(lambda t=transport: t.get_write_buffer_size() >= high, 60)  # type: ignore[misc]
        # A broken bound ends the session with bytes still queued for the client.
        bot.send(bytes([IAC, SB, 24, 0]) + b"x" * 5000)
        await until(fleet.closed())
        # The transport does not wait for a client that never reads: dropped, not held.
        await until(lambda t=transport: t.is_closing() and not t.get_write_buffer_size())  # type: ignore[misc]
        bot.close()


async def test_what_a_client_types_before_login_never_reaches_disk(fleet: Fleet) -> None:
    tty = fleet.sensor.config.recordings_dir
    bot = await Bot.connect(fleet.port)
    await bot.expect(rb"srv04 login: ")
    bot.writer.write(b"a" * 3000 + b"\r\n")
    await bot.expect(rb"Password: ")
    bot.writer.write(b"b" * 3000 + b"\r\n")  # wrong: the guest says so
    await bot.expect(rb"Login incorrect")
    assert not tty.exists() or not any(tty.iterdir()), "a recording before login is on disk"
    bot.close()
    await until(fleet.closed())
    assert not fleet.events("cowrie.log.closed")
    assert not tty.exists() or not any(tty.iterdir())
