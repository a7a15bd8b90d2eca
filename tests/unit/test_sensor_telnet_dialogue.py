"""The login dialogue on its own: what the attacker sees and what the guest is sent.

The host is a small recorder of what the dialogue asked for; guest output is scripted
after busybox login, and the asserts read like the two screens.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sensor.config import SensorConfig
from sensor.telnet.dialogue import Dialogue
from sensor.telnet.login import LoginState
from sensor.userdb import UserDB

BANNER = b"\r\nDebian GNU/Linux 12\r\n"
PROMPT = b"srv04 login: "
CONFIG = SensorConfig(telnet_greeting=(BANNER + PROMPT).decode())
USERDB = UserDB.parse("root:x:!root\nroot:x:*\n")
LEASE = ("root", "lease-secret")


class Events:
    """Records emitted events as (eventid, fields)."""

    def __init__(self) -> None:
        self.emitted: list[tuple[str, dict[str, Any]]] = []

    def emit(self, eventid: str, template: str, **fields: Any) -> None:
        self.emitted.append((eventid, fields))

    def logins(self) -> list[tuple[str, str, str]]:
        return [
            (eventid.rsplit(".", 1)[1], f["username"], f["password"])
            for eventid, f in self.emitted
            if eventid.startswith("cowrie.login.")
        ]


class Host:
    """A connection that records what the dialogue does."""

    def __init__(self, config: SensorConfig = CONFIG) -> None:
        self.events = Events()
        self.screen = bytearray()
        self.guest = bytearray()
        self.recorded = bytearray()
        self.calls: list[str] = []
        self.typed_ahead = b""
        self.dialogue = Dialogue(self, config, USERDB)

    def show(self, data: bytes) -> None:
        self.screen += data

    def echo(self, data: bytes) -> None:
        self.screen += data

    def record_input(self, data: bytes) -> None:
        self.recorded += data

    def send_guest(self, data: bytes) -> None:
        self.guest += data

    def login_attempt(
        self, username: str, password: str, *, accepted: bool, penalise: bool = True
    ) -> None:
        outcome = "success" if accepted else "failed"
        self.events.emit(f"cowrie.login.{outcome}", "", username=username, password=password)

    def want_guest(self) -> None:
        self.calls.append("want_guest")

    def refuse(self) -> None:
        self.calls.append("refuse")

    def logged_in(self, typed_ahead: bytes) -> None:
        self.calls.append("logged_in")
        self.typed_ahead = typed_ahead

    def too_many_attempts(self) -> None:
        self.calls.append("too_many_attempts")

    def awaiting_verdict(self, attempt: int) -> None:
        self.calls.append(f"awaiting_verdict {attempt}")

    def take(self) -> tuple[bytes, bytes]:
        """(screen, guest) since the last take."""
        seen = (bytes(self.screen), bytes(self.guest))
        self.screen.clear()
        self.guest.clear()
        return seen


def attached(host: Host) -> None:
    """The guest connects and prints busybox's greeting."""
    host.dialogue.guest_attached(*LEASE)
    host.dialogue.guest_data(b"\r\r\nDebian GNU/Linux 12\r\n\r\r\nsrv04 login: ")


def test_accepted_login_spoofs_the_lease_credentials_and_hides_the_guest_dialogue() -> None:
    host = Host()
    host.dialogue.start(None)
    assert host.take() == (BANNER + PROMPT, b"")
    host.dialogue.attacker_data(b"root\r\0")
    # A username alone is worth no guest.
    assert host.calls == [] and host.dialogue.state is LoginState.LOCAL
    assert host.take() == (b"root\r\nPassword: ", b"")
    host.dialogue.attacker_data(b"toor\r\0ls\r\0")  # typed ahead of the guest
    assert host.calls == ["want_guest"] and host.dialogue.state is LoginState.CONNECTING
    assert host.events.logins() == []  # not in yet: no success to report
    attached(host)
    assert host.take() == (b"", b"root\r\0")  # the lease's name, hidden
    host.dialogue.guest_data(b"root\r\nPass")
    host.dialogue.guest_data(b"word: ")
    assert host.take() == (b"", b"lease-secret\r\0")
    assert host.dialogue.state is LoginState.LOGGED_IN
    assert host.calls == ["want_guest", "logged_in"] and host.typed_ahead == b"ls\r\0"
    assert host.events.logins() == [("success", "root", "toor")]
    host.dialogue.guest_data(b"\r\n~ # ")
    assert host.take() == (b"\r\n~ # ", b"")
    assert bytes(host.recorded) == b"root\r\0"  # never the password


def test_a_login_the_userdb_refuses_never_leases_a_guest() -> None:
    host = Host()
    host.dialogue.start(None)
    host.dialogue.attacker_data(b"root\r\nroot\r\n")
    assert host.calls == ["refuse"] and host.dialogue.state is LoginState.LOCAL
    assert host.events.logins() == [("failed", "root", "root")]
    assert host.take()[0].endswith(b"Password: \r\n")
    host.dialogue.refused()
    assert host.take() == (b"Login incorrect\r\n" + PROMPT, b"")


def test_refused_login_lets_the_guest_refuse_then_the_attacker_answers_the_guest() -> None:
    host = Host(replace(CONFIG, telnet_spoof_authentication=False))
    host.dialogue.start(None)
    host.dialogue.attacker_data(b"root\r\nroot\r\n")
    attached(host)
    host.dialogue.guest_data(b"root\r\nPassword: ")
    assert host.take()[1] == b"root\r\nroot\r\n"
    assert host.dialogue.state is LoginState.VERIFYING
    host.dialogue.guest_data(b"\r\n")
    host.dialogue.guest_data(b"Login incorrect\r\nsrv04 login: ")
    assert host.take() == (b"\r\nLogin incorrect\r\nsrv04 login: ", b"")
    assert host.dialogue.state is LoginState.USERNAME
    host.dialogue.attacker_data(b"ad\x7fdmin\r\n")  # echoed by the sensor, held from the guest
    assert host.take() == (b"ad\b \bdmin\r\n", b"admin\r\n")
    host.dialogue.guest_data(b"admin\r\nPassword: ")  # the guest's echo is not shown again
    assert host.take() == (b"Password: ", b"")
    host.dialogue.attacker_data(b"x\r\n")
    assert host.take() == (b"", b"x\r\n")
    assert host.events.logins() == [("failed", "root", "root")]  # x: the guest's to judge


def test_a_username_from_negotiation_goes_straight_to_the_password() -> None:
    host = Host()
    host.dialogue.start("root")
    assert host.take() == (BANNER + b"Password: ", b"")
    assert host.calls == []
    host.dialogue.attacker_data(b"toor\r\0")
    assert host.calls == ["want_guest"]
    host.dialogue.guest_attached(*LEASE)
    host.dialogue.guest_data(b"\r\nPassword: ")  # the guest took USER and skipped the name
    assert host.take() == (b"", b"lease-secret\r\0")
    assert host.events.logins() == [("success", "root", "toor")]


def test_a_username_from_negotiation_answers_a_guest_that_asks_anyway() -> None:
    host = Host()
    host.dialogue.start("root")
    host.dialogue.attacker_data(b"toor\r\0")
    attached(host)
    assert host.take() == (BANNER + b"Password: ", b"root\r\0")


def test_without_a_guest_a_password_gets_an_ordinary_failed_login() -> None:
    host = Host()
    host.dialogue.start(None)
    host.dialogue.attacker_data(b"root\r\n")
    host.take()
    host.dialogue.attacker_data(b"toor\r\n")
    host.dialogue.guest_unavailable()
    assert host.dialogue.state is LoginState.LOCAL
    assert host.calls == ["want_guest", "refuse"]
    # Good credentials, but nobody let in: a failed login.
    assert host.events.logins() == [("failed", "root", "toor")]
    host.dialogue.refused()
    assert host.take() == (b"\r\nLogin incorrect\r\n" + PROMPT, b"")
    host.dialogue.attacker_data(b"root\r\ntoor\r\n")
    assert host.calls[-1] == "want_guest"  # the next login tries again


def test_a_guest_that_fails_after_the_password_was_typed_refuses_at_once() -> None:
    host = Host()
    host.dialogue.start(None)
    host.dialogue.attacker_data(b"root\r\ntoor\r\n")
    host.dialogue.guest_unavailable()
    assert host.calls == ["want_guest", "refuse"]
    assert host.take()[0].endswith(b"Password: \r\n")


def test_without_spoofing_the_guest_decides() -> None:
    host = Host(replace(CONFIG, telnet_spoof_authentication=False))
    host.dialogue.start(None)
    host.dialogue.attacker_data(b"admin\r\nadmin\r\n")
    assert host.events.logins() == []
    attached(host)
    host.dialogue.guest_data(b"admin\r\nPassword: ")
    assert host.take()[1] == b"admin\r\nadmin\r\n"
    assert host.calls[-1] == "awaiting_verdict 1"
    host.dialogue.guest_data(b"\r\nLogin incorrect\r\nsrv04 login: ")
    assert host.events.logins() == [("failed", "admin", "admin")]
    host.dialogue.attacker_data(b"root\r\n")
    host.dialogue.guest_data(b"root\r\nPassword: ")
    host.dialogue.attacker_data(b"lease-secret\r\n")
    host.dialogue.guest_data(b"\r\nWelcome\r\n")
    assert host.dialogue.state is LoginState.VERIFYING
    host.dialogue.guest_data(b"srv04:~# ")
    assert host.dialogue.state is LoginState.LOGGED_IN
    assert host.events.logins()[-1] == ("success", "root", "lease-secret")


def test_without_spoofing_no_verdict_in_time_counts_as_logged_in() -> None:
    host = Host(replace(CONFIG, telnet_spoof_authentication=False))
    host.dialogue.start(None)
    host.dialogue.attacker_data(b"root\r\nx\r\n")
    attached(host)
    host.dialogue.guest_data(b"root\r\nPassword: ")
    host.dialogue.guest_data(b"\r\nrouter(config)")
    host.dialogue.no_verdict(0)  # an earlier attempt's timer: ignored
    assert host.dialogue.state is LoginState.VERIFYING
    host.dialogue.no_verdict(1)
    assert host.dialogue.state is LoginState.LOGGED_IN
    assert host.events.logins() == [("success", "root", "x")]


def test_a_shells_password_prompt_after_login_is_left_alone() -> None:
    host = Host()
    host.dialogue.start(None)
    host.dialogue.attacker_data(b"root\r\ntoor\r\n")
    attached(host)
    host.dialogue.guest_data(b"root\r\nPassword: ")
    host.take()
    host.dialogue.guest_data(b"~ # su nobody\r\nPassword: ")
    assert host.take() == (b"~ # su nobody\r\nPassword: ", b"")
    assert host.dialogue.state is LoginState.LOGGED_IN


def test_guest_output_with_cr_nul_line_ends() -> None:
    host = Host(replace(CONFIG, telnet_spoof_authentication=False))
    host.dialogue.start(None)
    host.dialogue.attacker_data(b"root\r\0root\r\0")
    host.dialogue.guest_attached(*LEASE)
    host.dialogue.guest_data(b"Ubuntu 18.04\r\0ubuntu login: ")
    host.dialogue.guest_data(b"root\r\0Password: ")
    host.dialogue.guest_data(b"\r\0Login incorrect\r\0ubuntu login: ")
    assert host.dialogue.state is LoginState.USERNAME
    assert host.take()[0].endswith(b"\r\0Login incorrect\r\0ubuntu login: ")


def test_attempts_are_bounded() -> None:
    host = Host(replace(CONFIG, max_auth_attempts=2))
    host.dialogue.start(None)
    host.dialogue.attacker_data(b"root\r\nroot\r\n")
    host.dialogue.refused()
    host.dialogue.attacker_data(b"root\r\nroot\r\n")
    host.dialogue.refused()
    host.dialogue.attacker_data(b"root\r\nroot\r\n")
    assert host.calls[-1] == "too_many_attempts"
    assert len(host.events.logins()) == 2


def test_the_default_greeting_is_telnetds_naming_the_client() -> None:
    host = Host(SensorConfig())
    host.dialogue = Dialogue(host, SensorConfig(), USERDB, "198.51.100.7")
    host.dialogue.start(None)
    assert bytes(host.screen) == (
        b"\r\nLinux 6.1.0-57-amd64 (198.51.100.7) (pts/0)\r\n\r\nsrv04 login: "
    )
